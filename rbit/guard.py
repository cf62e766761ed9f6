"""The guard: one small process that takes every job's process group with the worker, and ends them
all when the worker's lease runs out.

A job's own Python process does both itself (:mod:`rbit.child`'s lifeline); but a job whose
process became its program (``shell!``) has no Python left in it, and its program need not watch
anything. The guard watches for them all: the worker tells it, down a pipe, each job process's
group just before the process is handed its job (so no program it becomes escapes) and when its
job has ended, and each renewal of its lease. When the pipe closes (the worker is gone, killed
or not) it kills every group it knows and ends; when the lease runs out it kills them and waits
for a new lease, as the worker then fences its jobs (:mod:`rbit.liveness`).

The guard ignores SIGINT and SIGTERM: a Ctrl+C or a signal to the worker's process group asks
the worker to finish its jobs, and the guard must outlive that.
"""

from __future__ import annotations

import logging
import os
import signal
from multiprocessing.connection import Pipe

from .forkserver import GUARD, ForkServer
from .lease import clock as lease_clock

log = logging.getLogger(__name__)

#: Longest wait between two looks at the lease (as a job's lifeline: rbit.child.LIFELINE_TICK).
GUARD_TICK = 0.2


class Guard:
    """The worker's side of the guard; it is started again if it dies."""

    def __init__(self, server: ForkServer, lease: float | None = None):
        self.server = server
        self.groups: set[int] = set()
        self.lease = lease
        self.process = None
        self.conn = None

    def start(self) -> None:
        """Start the guard process, telling it what the last one knew."""
        child_end, self.conn = Pipe(duplex=False)  # (read end, write end)
        try:
            self.process = self.server.fork(GUARD, [child_end.fileno()])
        finally:
            child_end.close()
        self._send(("lease", self.lease))
        for group in self.groups:
            self._send(("watch", group))

    def watch(self, group: int) -> None:
        self.groups.add(group)
        self._send(("watch", group))

    def forget(self, group: int) -> None:
        self.groups.discard(group)
        self._send(("forget", group))

    def renew(self, deadline: float | None) -> None:
        self.lease = deadline
        self._send(("lease", deadline))

    def _send(self, message) -> None:
        if self.process is None:
            return
        try:
            self.conn.send(message)
        except OSError:
            log.error("the guard process is gone (exit status %s); starting a new one", self.process.exitcode)
            self.close()
            self.start()

    def close(self) -> None:
        """Let the guard go: it kills the groups it still watches."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.process is not None:
            self.process.join(timeout=1)
            self.process = None


def main(conn) -> None:
    """The guard process: watch the worker's pipe and its lease; kill every group when either ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    groups: set[int] = set()
    deadline = None
    try:
        while True:
            if groups and deadline is not None and lease_clock() >= deadline:
                _kill(groups)  # the worker fences these jobs too; new ones come with a new lease
                groups.clear()
            timeout = None  # with no job to watch there is nothing to stop: wait for the pipe alone
            if groups and deadline is not None:
                timeout = min(max(0.0, deadline - lease_clock()), GUARD_TICK)
            if not conn.poll(timeout):
                continue
            kind, value = conn.recv()
            if kind == "watch":
                groups.add(value)
            elif kind == "forget":
                groups.discard(value)
            elif kind == "lease":
                deadline = value
    except (EOFError, OSError):  # the worker is gone
        _kill(groups)


def _kill(groups) -> None:
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
