"""A worker's job logs: each attempt's log opened, the logs of ended jobs closed off the next job's
way, and logs older than ``log_keep`` removed (:mod:`rbit.joblog` is one log, :mod:`rbit.logdir`
where they live)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from .joblog import JobLog
from .logdir import default_log_dir, sweep

log = logging.getLogger(__name__)

#: Seconds between two removals of job logs older than ``log_keep``.
SWEEP_PERIOD = 3600.0


class LogKeeper:
    """The job logs of a worker with *settings* (its ``[rbit]`` section)."""

    def __init__(self, settings, clock: Callable[[], float]):
        self.settings = settings
        self.log_dir = settings.log_dir or default_log_dir(os.environ)
        self.next_sweep = clock() + SWEEP_PERIOD
        #: The logs of jobs that ended, to be closed by close_ended: (log, last line, how the job ended).
        self._ended: list[tuple[JobLog, str, dict]] = []

    def open(self, job_id: int, fields: dict) -> JobLog:
        """A new attempt's log for *job_id* (*fields*: package, version, queue, slot), begun with a
        line of rbit's."""
        echo = None
        if self.settings.log_echo:
            output = logging.getLogger("rbit.output")
            echo = lambda line: output.info("job %s (%s): %s", job_id, fields["queue"], line)  # noqa: E731
        opened = JobLog.open(self.log_dir, job_id, self.settings.log_max, {"worker": self.settings.name, **fields},
                             echo=echo)
        opened.note(f"rbit: job {job_id}: {fields['package']} {fields['version']} from {fields['queue']}, attempt "
                    f"{opened.attempt}, worker {self.settings.name}, {time.strftime('%Y-%m-%d %H:%M:%S %z')}")
        return opened

    def ended(self, joblog: JobLog, line: str, **end) -> None:
        """*joblog*'s job has ended: its last *line* and how it ended (*end*) are written by
        :meth:`close_ended`, when the worker has nothing in the way (see :mod:`rbit.taking`)."""
        self._ended.append((joblog, line, end))

    def close_ended(self) -> None:
        """Close the logs of the jobs that ended since the last call: their last line, their metadata."""
        while self._ended:
            joblog, line, end = self._ended.pop(0)
            joblog.close(line, **end)

    def prepare(self, now: float) -> None:
        """Make the log directory and remove the logs older than ``log_keep`` (at start, then hourly)."""
        try:
            self.log_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("cannot make the job log directory %s (%s): job output is lost until it can", self.log_dir,
                        exc.strerror)
        self.sweep(now, ())

    def due(self, now: float) -> bool:
        """True when the hourly removal of old logs is due."""
        return now >= self.next_sweep

    def sweep(self, now: float, running) -> None:
        """Remove the logs older than ``log_keep``, but those of the *running* job ids."""
        self.next_sweep = now + SWEEP_PERIOD
        removed = sweep(self.log_dir, self.settings.log_keep, set(running))
        if removed:
            log.info("removed %d job log file(s) older than %g days from %s", removed, self.settings.log_keep,
                     self.log_dir)
