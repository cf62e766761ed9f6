"""The job processes a worker keeps ready: one started and waiting for each slot's next job, and the guard.

A message then costs its job a message down a pipe, not a fork (:mod:`rbit.jobs`). There are as
many waiting processes as slots, busy or not: a busy slot's next process is forked while its job
runs, so that the fork stands neither between a message and its job nor between two jobs. Every
process runs one job and is never used again.

The guard (:mod:`rbit.guard`) is told of each process just before it is handed its job, so that
no program a job's process becomes escapes it, and is told to forget it once its job has ended.
"""

from __future__ import annotations

import logging

from . import jobs
from .guard import Guard

log = logging.getLogger(__name__)


class Ready:
    """The waiting job processes of a worker with *size* slots, and its guard."""

    def __init__(self, size: int):
        self.size = size
        self.waiting: list[jobs.JobProcess] = []
        self.guard: Guard | None = None
        #: The worker's lease, which each process holds from its start (None: no lease).
        self.lease: float | None = None

    def fill(self, server) -> None:
        """Start processes until one waits for each slot; a process that died waiting is replaced."""
        if self.guard is None:
            self.guard = Guard(server, self.lease)
            self.guard.start()
        alive = []
        for process in self.waiting:
            if process.ready():
                alive.append(process)
            else:
                self.discard(process)
        self.waiting = alive
        while len(self.waiting) < self.size:
            try:
                self.waiting.append(self._start(server))
            except OSError as exc:
                log.error("cannot start a job process: %s", exc)
                return

    def take(self, server) -> jobs.JobProcess:
        """A waiting process for a job (one started now if none waits); OSError if none can start."""
        if not self.waiting:
            self.fill(server)
        return self.waiting.pop(0) if self.waiting else self._start(server)

    def _start(self, server) -> jobs.JobProcess:
        process = jobs.JobProcess(server, log_level=logging.getLogger().getEffectiveLevel())
        process.start(lease=self.lease)
        return process

    def watch(self, process: jobs.JobProcess) -> None:
        """*process* is about to be handed its job: the guard watches its group from now on
        (OSError if the fork server died before it said which process this is)."""
        if process.pid is None:
            raise OSError("the fork server that started it is gone")
        self.guard.watch(process.pid)

    def discard(self, process: jobs.JobProcess) -> None:
        """Let a process go: killed if it still runs, reaped, and forgotten by the guard."""
        process.kill()
        process.close()
        self.done(process)

    def done(self, process: jobs.JobProcess) -> None:
        """*process*'s group is gone (its job ended): the guard forgets it."""
        if self.guard is not None and process.pid is not None:
            self.guard.forget(process.pid)

    def renew(self, deadline: float | None) -> None:
        """The worker's lease now runs until *deadline*: tell every waiting process, and the guard."""
        self.lease = deadline
        for process in self.waiting:
            process.renew(deadline)
        if self.guard is not None:
            self.guard.renew(deadline)

    def close(self) -> None:
        """Let the waiting processes go, and the guard, as the worker stops (no job runs then: a job
        left in a slot has ended and only waits for its message's end)."""
        for process in self.waiting:
            self.discard(process)
        self.waiting = []
        if self.guard is not None:
            self.guard.close()
            self.guard = None
