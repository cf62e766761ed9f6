"""The fork server: one small process that starts every job process, and the guard, by a plain fork.

The worker must not fork its job processes itself: it has threads (the status reporter, the
health server) and a broker connection that a child would inherit. So a fresh interpreter is
started once, imports what every job needs (the runners' modules among them), and then forks
one child per request; each child calls its entry point (:func:`rbit.child.main` or
:func:`rbit.guard.main`) with the descriptors the request carried, and exits.

multiprocessing's fork server does the same, but measured on a job that does nothing its child
cost about 6 ms of CPU before the job began (unpickling its ``Process`` and the parent's
preparation data, its bootstrap, ~1,100 pages copied on write) against under 2 ms for a plain
fork, and ``Process.start`` waits for the new process's pid. Here a request is one message and
nothing waits for its answer: the pid comes back when the worker next reads the socket.

The worker and the server talk over one ``SOCK_SEQPACKET`` socket pair, one message each way at
a time:

* worker to server: ``NUMBER KIND LEVEL`` (:data:`REQUEST`), with the child's descriptors attached;
* server to worker: :data:`RECORD` ``(b"p", request, pid)`` once the child is forked, and
  ``(b"x", pid, exit code)`` once it has exited and been reaped (a negative code is the signal
  that killed it, as :attr:`multiprocessing.Process.exitcode` says).

The server forks on request, reaps its children on SIGCHLD, and exits when the worker's end of
the socket closes; its children go on (each watches the worker on a pipe of its own). It
ignores SIGINT and SIGTERM, as the guard does: a Ctrl+C or a signal to the worker's process
group asks the worker to finish its jobs, whose exits the server must still report.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback

log = logging.getLogger(__name__)

#: What a child of the server runs, by request kind.
JOB, GUARD = 1, 2

#: A request: its number (the worker's), its kind and the log level of the child.
REQUEST = struct.Struct("=qii")
#: A record from the server: ``b"p"``, request number, pid; or ``b"x"``, pid, exit code.
RECORD = struct.Struct("=cqq")
#: Exit code of a child whose exit the server could not report (it died): multiprocessing's.
LOST = 255
#: Most descriptors one request carries.
MAX_FDS = 4


class Forked:
    """The worker's handle on one child of the fork server: its pid and exit code, once known."""

    def __init__(self, server: ForkServer, request: int):
        self.server = server
        self.request = request
        self._pid: int | None = None
        self._exitcode: int | None = None

    @property
    def pid(self) -> int | None:
        """The child's pid; waits for the server's answer if it has not come yet (None: the server
        died before it answered)."""
        if self._pid is None:
            self.server.read(until=lambda: self._pid is not None, timeout=None)
        return self._pid

    @property
    def exitcode(self) -> int | None:
        """The child's exit code, or None while it runs (never waits)."""
        if self._exitcode is None:
            self.server.read()
        return self._exitcode

    def join(self, timeout: float | None = None) -> None:
        """Wait at most *timeout* seconds for the child's exit to be reported."""
        if self._exitcode is None:
            self.server.read(until=lambda: self._exitcode is not None, timeout=timeout)

    def kill(self) -> None:
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class ForkServer:
    """The worker's side of the fork server; the server starts again if it dies."""

    def __init__(self, preload=()):
        self.preload = list(dict.fromkeys(preload))
        self.process: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self._requests = 0
        #: Children whose pid has not come yet, by request; children still running, by pid.
        self._starting: dict[int, Forked] = {}
        self._running: dict[int, Forked] = {}
        #: Called when an exit is taken in, wherever it is read: whoever waits for exits on
        #: :meth:`fileno` would otherwise find the socket emptied (the worker's wake-up).
        self.on_exit = lambda: None

    def start(self) -> None:
        """Start the server; it has imported :attr:`preload` when this returns."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        code = (f"import sys; sys.path[:] = {sys.path!r}; from rbit.forkserver import main; "
                f"main({theirs.fileno()}, {json.dumps(self.preload)!r})")
        try:
            self.process = subprocess.Popen([sys.executable, *subprocess._args_from_interpreter_flags(), "-c", code],
                                            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.sock = ours
        ready = ours.recv(RECORD.size)  # the server says it has imported everything
        if not ready:
            self.close()
            raise OSError("the fork server exited as it started")

    def fileno(self) -> int:
        """The socket to watch: readable when the server has news (a pid, an exit)."""
        return self.sock.fileno()

    def fork(self, kind: int, fds: list[int], log_level: int = logging.INFO) -> Forked:
        """Ask for a child running *kind* with *fds* (the caller closes its copies); OSError if none can start."""
        if self.sock is None or self.process.poll() is not None:
            if self.sock is not None:
                log.error("the fork server is gone (exit status %s); starting a new one", self.process.returncode)
                self.close()
            self.start()
        self._requests += 1
        child = Forked(self, self._requests)
        socket.send_fds(self.sock, [REQUEST.pack(child.request, kind, log_level)], fds)
        self._starting[child.request] = child
        return child

    def read(self, until=lambda: True, timeout: float | None = 0.0) -> None:
        """Take in what the server has said; with *until*, wait (at most *timeout*, None: for ever)
        until it holds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.sock is not None:
            while True:
                try:
                    record = self.sock.recv(RECORD.size, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError:
                    record = b""
                if not record:
                    self._lost()
                    return
                self._record(*RECORD.unpack(record))
            if until():
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            select.select([self.sock], [], [], left)

    def _record(self, kind: bytes, first: int, second: int) -> None:
        if kind == b"p":
            child = self._starting.pop(first, None)
            if child is not None:
                child._pid = second
                self._running[second] = child
        else:
            child = self._running.pop(first, None)
            if child is not None:
                child._exitcode = second
                self.on_exit()

    def _lost(self) -> None:
        """The server is gone: its children's exits will not be reported. A child that is gone
        already has exited; one that runs on is taken as gone (its job process watches the worker
        on its own pipe and ends with it)."""
        log.error("the fork server is gone; its children's exit statuses are lost")
        for child in [*self._starting.values(), *self._running.values()]:
            child._exitcode = LOST  # one whose pid never came keeps None: there is nothing to signal
        self.on_exit()
        self._starting.clear()
        self._running.clear()
        self.close()

    def close(self) -> None:
        """Let the server go (it exits when its socket closes)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- The server -----------------------------------------------------------------------------


def main(fd: int, preload: str) -> None:
    """The server: import *preload* (a JSON list), then fork on each request until the worker goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for name in json.loads(preload):
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 -- the job that needs it fails, and says why
            print(f"rbit: the fork server cannot import {name}: {exc}", file=sys.stderr, flush=True)
    # What is imported now is shared by every child until one writes to it: the cyclic garbage
    # collector of a child would write to every object it looks at, so it looks at none of these.
    gc.freeze()
    control = socket.socket(fileno=fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    control.send(RECORD.pack(b"r", 0, 0))
    try:
        _serve(control, wake_r, wake_w)
    except ConnectionError:  # a record for a worker that is gone: so is its server
        pass


def _serve(control, wake_r: int, wake_w: int) -> None:
    """Fork on each request and report each exit, until the worker goes (ConnectionError if it goes
    while a record is on its way to it)."""
    while True:
        readable = select.select([control, wake_r], [], [])[0]
        if wake_r in readable:
            _drain(wake_r)
            _reap(control)
        if control in readable:
            try:
                data, fds, _, _ = socket.recv_fds(control, REQUEST.size, MAX_FDS)
            except ConnectionError:
                data, fds = b"", []
            if not data:
                return  # the worker is gone
            request, kind, level = REQUEST.unpack(data)
            pid = os.fork()
            if pid == 0:
                _child(kind, level, fds, (control.fileno(), wake_r, wake_w))
            for child_fd in fds:
                os.close(child_fd)
            control.send(RECORD.pack(b"p", request, pid))


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _reap(control) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        control.send(RECORD.pack(b"x", pid, os.waitstatus_to_exitcode(status)))


def _child(kind: int, level: int, fds: list[int], unused: tuple) -> None:
    """In the new child: drop the server's descriptors and handlers, run the entry point, exit."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for name in ("SIGCHLD", "SIGINT", "SIGTERM"):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        for fd in unused:
            os.close(fd)
        from multiprocessing.connection import Connection

        if kind == JOB:
            from . import child

            conn, output, status = fds
            child.main(Connection(conn), Connection(output, readable=False), Connection(status, readable=False),
                       level)
        elif kind == GUARD:
            from . import guard

            guard.main(Connection(fds[0], writable=False))
        code = 0
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 -- said on the child's standard error, which the job's log takes
        traceback.print_exc()
    finally:
        for thread in threading.enumerate():  # as a Python program's end waits for them
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        os._exit(code)
