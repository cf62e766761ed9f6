"""A job's output on its way to its log: the worker's loop reads the job's pipe in large reads, at
the job's own pace, and once the job's process group has ended reads it dry.

The pipe is read when the loop's selector says so, but after a read the pipe is left alone for
the time the job takes to write OUTPUT_BATCH bytes at its recent rate (at most OUTPUT_PAUSE): a
build that writes a line now and then costs the worker a few reads a second, not one per line,
and one that writes as fast as it can seldom finds the pipe full.
"""

from __future__ import annotations

from .jobs import OUTPUT_CHUNK, JobProcess
from .joblog import JobLog

#: Longest pause (seconds) after a read, and the bytes a read aims to find.
OUTPUT_PAUSE = 0.05
OUTPUT_BATCH = 256 << 10
#: A job's rate (bytes a second) before its first read: it rises at once, and halves a read.
OUTPUT_START_RATE = OUTPUT_BATCH / 0.002
#: Seconds between two looks at a killed group that has not yet gone.
DRAIN_POLL = 0.05
#: Longest wait (seconds) for a killed group to go: a process that SIGKILL cannot end
#: (uninterruptible, or another user's) must not keep the job from ending.
DRAIN_TIMEOUT = 10.0


class Output:
    """The worker's side of one job's output pipe."""

    def __init__(self, process: JobProcess, log: JobLog, wakeup, tag, now: float):
        self.process = process
        self.log = log
        self.wakeup = wakeup
        self.tag = tag
        #: When the job's process ended (its group killed), by the worker's clock.
        self.ending: float | None = None
        self.resume: float | None = None  # when the pipe is read next (None: when the selector says)
        self.watched = False
        self.read_at = now
        self.rate = OUTPUT_START_RATE

    def read(self, now: float, drain: bool = False) -> None:
        """Move what the job wrote into its log, unless the pipe is left alone until later."""
        if self.resume is not None and now < self.resume and not drain:
            return
        chunks = self.process.read_output()
        for chunk in chunks:
            self.log.write(chunk)
        count = sum(map(len, chunks))
        eof = self.process.output_eof
        self.resume = None
        if count and not eof:
            self.rate = max(count / max(now - self.read_at, 1e-4), self.rate / 2)
            self.read_at = now
            pause = min(OUTPUT_PAUSE, OUTPUT_BATCH / self.rate)
            if pause >= 0.001 and count < OUTPUT_CHUNK:  # a full pipe: the job waits for us
                self.resume = now + pause
        watch = not eof and self.resume is None
        if watch and not self.watched:
            self.wakeup.watch(self.process.output.fileno(), self.tag)
        elif not watch and self.watched:
            self.wakeup.unwatch(self.tag)  # at EOF a pipe stays readable: stop waking on it
        self.watched = watch

    def drained(self, now: float) -> bool:
        """True once all the ended job's group wrote is in its log: every writer closed the pipe,
        or the group is gone and the pipe is read dry (a process that left the group may still
        hold it)."""
        if self.process.output_eof:
            return True
        if self.process.group_gone():
            self.read(now, drain=True)
            return True
        if now - self.ending >= DRAIN_TIMEOUT:
            self.log.note(f"rbit: stopped reading the job's output: its process group did not end "
                          f"within {DRAIN_TIMEOUT:g} s of SIGKILL")
            return True
        return False

    def moments(self, now: float) -> list[float]:
        """When the pipe needs a look without the selector's word."""
        return [m for m in (self.resume, now + DRAIN_POLL if self.ending is not None else None) if m is not None]

    def close(self) -> None:
        self.wakeup.unwatch(self.tag)
