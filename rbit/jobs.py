"""Each job in its own process and process group, talking to the worker over a pipe.

Job processes are forked by a fork server (``multiprocessing``'s
``forkserver``): a small single-threaded process started once, so that a job
never inherits the worker's threads, sockets or broker connection. A job
process makes itself a session and process-group leader, so the worker can
stop everything it started with one ``killpg``. It watches its pipe to the
worker: if the worker dies, the pipe closes and the job kills its own group,
so that a restarted worker never finds the old build still running beside the
new one. It also holds the worker's lease (:mod:`rbit.lease`): if the worker
does not renew it in time (frozen, or cut off from the broker), the job kills
its own group when it runs out, before a peer may run the job again.

The worker's one message to the job process: ``("lease", deadline)``, a
:func:`rbit.lease.clock` value (the same clock in every process of a host).

A second pipe takes the job's output: its write end becomes the job process's
standard output and error (and so those of every program it starts), and its
log records are written there as lines. The worker reads it in large
non-blocking reads into the job's log (:mod:`rbit.joblog`); nothing in the job
process copies output. After the job's process group has ended the worker
reads the pipe dry, so nothing written before then is lost.

Messages from the job process to the worker, on the first pipe, each a tuple:

``("status", status, text)``
    the runner reported a status;
``("result", result)``
    how the runner ended, an :class:`rbit.outcome.Result` (``SKIPPED`` when
    PyBit's history says the job is not to run: see :mod:`rbit.history`).
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import select
import signal
import sys
import threading

from . import history, statuses
from .lease import clock as lease_clock
from .outcome import Ended, Result, call_runner

#: Seconds between SIGTERM and SIGKILL when a job's process group is stopped.
KILL_GRACE = 5.0

#: Bytes of one read of a job's output pipe, and the pipe's size asked for (Linux's
#: unprivileged maximum by default): a job writing fast fills it while the worker works.
OUTPUT_CHUNK = 1 << 20

#: How a log record of the job's looks in its log.
JOB_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: fcntl's F_SETPIPE_SZ (Linux).
_F_SETPIPE_SZ = 1031

#: Longest wait of the lifeline between two looks at the lease: a host thawed after a suspend
#: (whose waits do not count the time asleep) stops its jobs at most this late.
LIFELINE_TICK = 0.2

#: Modules every job needs; the fork server imports them once, so that no job
#: pays for them (unpickling a job's Message needs rbit.pybit, hence jsonpickle).
PRELOAD = ["rbit.jobs", "rbit.message", "rbit.pybit", "rbit.runners.python", "rbit.runners.shell"]

log = logging.getLogger(__name__)


def fork_context(preload=()) -> multiprocessing.context.ForkServerContext:
    """The context that starts job processes; its fork server starts now, with *preload* imported.

    Starting it here, not at the first job, keeps its start-up (a fresh
    interpreter importing the runners) out of the first job's pickup time.
    """
    _main_as_package_main()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(dict.fromkeys([*PRELOAD, *preload])))
    multiprocessing.forkserver.ensure_running()
    return context


def _main_as_package_main() -> None:
    """Keep job processes from running the ``rbit`` console script again.

    multiprocessing prepares each new process by running the parent's
    ``__main__`` again: from its file when it has no module spec, which for the
    console script means importing the CLI and click in every job; but not at
    all when ``__main__`` is a package's ``__main__`` module, as under
    ``python -m rbit``. Nothing a job needs lives in ``__main__``, so a main
    without a spec is described as ``rbit.__main__``: both ways of starting
    the worker then cost a job the same.
    """
    main = sys.modules.get("__main__")
    if main is not None and getattr(main, "__spec__", None) is None:
        main.__spec__ = importlib.util.find_spec("rbit.__main__")


def runner_modules(sections) -> list[str]:
    """The modules the runners of *sections* live in, for the fork server to preload."""
    modules = []
    for section in sections:
        modules.append(type(section.runner).__module__)
        function = getattr(section.runner, "function", None)
        if function is not None and getattr(function, "__module__", None):
            modules.append(function.__module__)
    return modules


class JobProcess:
    """The worker's handle on one job's process."""

    def __init__(self, context, runner, message, pybit=None, worker_name=None, log_level=logging.INFO):
        self.context = context
        self.runner = runner
        self.message = message
        self.pybit = pybit
        self.worker_name = worker_name
        self.log_level = log_level
        self.process = None
        self.conn = None
        self.kill_at = None
        self.closed = False
        #: True once the job's end of the pipe is closed: nothing more will come.
        self.eof = False
        #: The read end of the job's output pipe, and whether every writer has closed it.
        self.output = None
        self.output_eof = False

    def start(self, lease: float | None = None) -> None:
        """Start the job's process (not the job's clock: the caller keeps that), holding *lease*."""
        parent_end, child_end = self.context.Pipe(duplex=True)
        output, output_child = self.context.Pipe(duplex=False)
        if lease is not None:
            parent_end.send(("lease", lease))  # waiting in the pipe before the job's first instruction
        self.process = self.context.Process(
            target=child_main,
            args=(child_end, output_child, self.runner, self.message, self.pybit, self.worker_name,
                  self.log_level),
            name=f"rbit job {self.message.job_id}",
        )
        try:
            self.process.start()
        finally:
            child_end.close()
            output_child.close()
        self.conn = parent_end
        self.output = output
        os.set_blocking(output.fileno(), False)
        try:
            fcntl.fcntl(output.fileno(), _F_SETPIPE_SZ, OUTPUT_CHUNK)
        except OSError:  # over /proc/sys/fs/pipe-max-size: the default 64 KiB works too
            pass

    def read_output(self, limit: int = 4 * OUTPUT_CHUNK) -> list[bytes]:
        """What the job wrote since the last call, at most about *limit* bytes, without blocking."""
        chunks, total = [], 0
        while total < limit and not self.output_eof:
            try:
                chunk = os.read(self.output.fileno(), OUTPUT_CHUNK)
            except BlockingIOError:
                break
            if not chunk:
                self.output_eof = True
                break
            chunks.append(chunk)
            total += len(chunk)
        return chunks

    def group_gone(self) -> bool:
        """True once no process of the job's group is left (all it wrote is in the output pipe)."""
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # a member we may not signal (setuid): still there
            pass
        return False

    def renew(self, deadline: float) -> None:
        """The worker's lease now runs until *deadline*."""
        try:
            # Never block on a job that does not read (stopped, say): it keeps the earlier deadline.
            if select.select([], [self.conn.fileno()], [], 0)[1]:
                self.conn.send(("lease", deadline))
        except (OSError, ValueError):  # the job has ended; its exit is noticed elsewhere
            pass

    @property
    def pid(self) -> int:
        return self.process.pid

    def receive(self) -> list[tuple]:
        """Everything the job has sent so far, without blocking; sets :attr:`eof` at the end."""
        events = []
        try:
            while not self.closed and not self.eof and self.conn.poll():
                events.append(self.conn.recv())
        except (EOFError, OSError):
            self.eof = True
        return events

    def exited(self) -> bool:
        """True once the job's process has ended (the rest of its group is killed then)."""
        if self.process.exitcode is None:
            return False
        self.signal_group(signal.SIGKILL)
        return True

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def stop(self, now: float, grace: float = KILL_GRACE) -> None:
        """Ask the whole group to stop (SIGTERM); :meth:`tick` sends SIGKILL after *grace*."""
        if self.kill_at is None:
            self.kill_at = now + grace
            self.signal_group(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the whole group at once."""
        self.signal_group(signal.SIGKILL)

    def tick(self, now: float) -> None:
        """Escalate a stop that the group has ignored for its grace period."""
        if self.kill_at is not None and now >= self.kill_at:
            self.kill()

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            # The job has not made its process group yet (it does so first
            # thing): the process alone is all there is to stop.
            try:
                os.kill(self.process.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass
        except PermissionError:
            pass

    def close(self) -> None:
        """Release the pipe and reap the process."""
        if not self.closed and self.conn is not None:
            self.closed = True
            self.receive()
            self.conn.close()
            if self.output is not None:
                self.output.close()
            self.process.join(timeout=1)

    def describe_exit(self) -> str:
        code = self.process.exitcode
        if code is not None and code < 0:
            return f"the job's process was killed by {signal.Signals(-code).name}"
        return f"the job's process exited with status {code} before reporting a result"


# -- In the job's own process ------------------------------------------------


class _Channel:
    """The job's end of the pipe; sends from several threads, one at a time."""

    def __init__(self, conn):
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, *event):
        with self.lock:
            self.conn.send(event)


def child_main(conn, output, runner, message, pybit, worker_name: str | None, log_level: int) -> None:
    """Run one job in this process; the entry point of every job process."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _redirect_output(output)
    channel = _Channel(conn)
    threading.Thread(target=_lifeline, args=(conn,), daemon=True).start()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(JOB_LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(min(log_level, logging.INFO))  # the job's log keeps its records at INFO even with -q

    def set_status(status, text=None):
        statuses.check(status)
        channel.send("status", status, text)

    try:
        result = _run(runner, message, pybit, worker_name, set_status)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):  # closed or replaced by the runner
                pass
    channel.send("result", result)


def _run(runner, message, pybit, worker_name, set_status):
    """Ask PyBit whether the job runs; if so, run it. How it ended, as an outcome.Result."""
    if pybit is not None:
        found = history.fetch(pybit, message.request.web_host, message.job_id)
        run, why = history.should_run(found, worker_name, message.recovered_from)
        if not run:
            return Result(Ended.SKIPPED, None, why)
    return call_runner(runner, message, set_status)


def _lifeline(conn):
    """If the worker goes away, or its lease runs out, take the whole job with it."""
    deadline = None
    try:
        while True:
            timeout = None if deadline is None else deadline - lease_clock()
            if timeout is not None and timeout <= 0:
                break  # the worker did not renew its lease: a peer may run this job soon
            if conn.poll(None if timeout is None else min(timeout, LIFELINE_TICK)):
                message = conn.recv()
                if isinstance(message, tuple) and len(message) == 2 and message[0] == "lease":
                    deadline = message[1]
    except (EOFError, OSError):
        pass
    os.killpg(0, signal.SIGKILL)


def _redirect_output(output) -> None:
    """Make the output pipe our standard output and error, line-buffered; stdin reads nothing."""
    os.dup2(output.fileno(), 1)
    os.dup2(output.fileno(), 2)
    output.close()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # A worker started without standard streams (a daemon) gives the fork server
    # none, and Python then sets sys.stdout and sys.stderr to None: give them back.
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(fd, "w", buffering=1, closefd=False))
        else:
            try:
                stream.reconfigure(line_buffering=True)
            except (AttributeError, ValueError):
                pass
