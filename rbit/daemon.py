"""Detaching from the terminal with python-daemon, holding a pid file that a stale one cannot block."""

import logging
import os
import signal

import daemon
from daemon.pidfile import TimeoutPIDLockFile

from .errors import RbitError

log = logging.getLogger(__name__)


def clear_stale_pidfile(path):
    """Remove *path* if the process it names is gone; raise if it is alive."""
    try:
        with open(path) as handle:
            pid = int(handle.read().split()[0])
    except FileNotFoundError:
        return
    except (ValueError, IndexError, OSError):
        log.warning("removing unreadable pid file %s", path)
        os.unlink(path)
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        log.warning("removing stale pid file %s (process %d is gone)", path, pid)
        os.unlink(path)
        return
    except PermissionError:
        pass
    raise RbitError(f"pid file {path} names process {pid}, which is running")


def daemonize(pidfile=None, workdir="/", umask=0o022, keep=()):
    """Become a daemon; *keep* are logging handlers whose files stay open."""
    lock = None
    if pidfile:
        pidfile = os.path.abspath(pidfile)
        clear_stale_pidfile(pidfile)
        lock = TimeoutPIDLockFile(pidfile, acquire_timeout=0)
    preserve = [handler.stream for handler in keep if getattr(handler, "stream", None) is not None]
    context = daemon.DaemonContext(
        working_directory=workdir,
        umask=umask,
        pidfile=lock,
        files_preserve=preserve,
        # The worker installs its own handlers for a graceful stop.
        signal_map={signal.SIGTERM: None, signal.SIGHUP: None, signal.SIGTTIN: None,
                    signal.SIGTTOU: None, signal.SIGTSTP: None},
    )
    try:
        context.open()
    except Exception as exc:
        raise RbitError(f"cannot become a daemon: {exc}") from exc
    # python-daemon reopens /dev/null on 0-2 close-on-exec; the fork server that
    # starts the jobs is exec'd and needs standard streams to hand them on.
    for fd in (0, 1, 2):
        os.set_inheritable(fd, True)
    return context
