"""The jobs a worker runs: one per slot, from the start of its process to its message's end."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from . import jobs, queues, statuses
from .capture import Output
from .child import JOB_LOG_FORMAT
from .errors import UnknownStatus
from .joblog import JobLog
from .logkeeping import LogKeeper
from .message import Message
from .outcome import Decision, Ended, Fate, Result, Stop, decide
from .ready import Ready
from .runners.shell import LOG_UNKNOWN_STATUS, exit_outcome, status_line
from .statuses import FINAL

log = logging.getLogger(__name__)

LOG_JOB_START = "job %s: starting %s %s from %s in slot %d"
LOG_JOB_END = "job %s: %s %s from %s ended %s in %.1f s%s"
LOG_JOB_DROPPED = "job %s: %s %s from %s not run: %s"
LOG_JOB_LOST = "job %s: %s %s from %s lost: %s"

#: The outcome in the log's metadata of an attempt withdrawn before it ran (see :meth:`Jobs.withdraw`).
NOT_RUN = "not run"

#: How the worker writes a record of the job's own into its log (as the job's process would).
_JOB_LOG_FORMATTER = logging.Formatter(JOB_LOG_FORMAT)


@dataclass
class RunningJob:
    """A job that holds a slot, from its start to its message's end."""

    slot: int
    queue: str
    message: Message
    delivery: object
    process: jobs.JobProcess | None
    started: float
    timeout: float | None
    last_final: str | None = None
    result: Result | None = None
    stop: Stop = Stop.NONE
    decision: Decision | None = None
    log: JobLog | None = None
    output: Output | None = None
    #: The program the job's process became (its exit status is the job's result), if it did.
    program: str | None = None

    @property
    def job_id(self) -> int:
        return self.message.job_id

    @property
    def deadline(self) -> float | None:
        return None if self.timeout is None else self.started + self.timeout

    def describe(self) -> tuple:
        request = self.message.request
        return (self.job_id, request.get_package(), request.get_version(), self.queue)


class Jobs:
    """The worker's slots: starts each job's process, follows its news, and decides its end."""

    def __init__(self, config, reporter, metrics, wakeup, clock: Callable[[], float], board=None):
        self.config = config
        self.settings = config.worker
        self.reporter = reporter
        self.metrics = metrics
        self.wakeup = wakeup
        self.clock = clock
        self.board = board
        self.logs = LogKeeper(self.settings, clock)
        #: The fork server that starts the job processes (rbit.forkserver), once there is one.
        self.forks = None
        self._watched_forks = None
        self.ready = Ready(self.settings.concurrency)
        self.slots: dict[int, RunningJob] = {}
        #: Each slot's next job, offered to its process (see :meth:`offer`); none if no process took it.
        self.offered: dict[int, RunningJob] = {}
        #: Jobs that ended, in order, whose messages wait for their end on the broker.
        self.finishing: list[RunningJob] = []

    def free_slot(self) -> int | None:
        return next((slot for slot in range(self.settings.concurrency) if slot not in self.slots), None)

    def running(self) -> list[RunningJob]:
        return [job for job in list(self.slots.values()) if job.decision is None]

    def holds(self, job_id: int) -> bool:
        return any(job.job_id == job_id for job in self.slots.values())

    def warm_up(self) -> None:
        """Have a job process started and waiting for each slot's next job (see :mod:`rbit.ready`),
        once there is a fork server to start them."""
        if self.forks is not None:
            self.ready.fill(self.forks)
            self._watch_forks()

    def _watch_forks(self) -> None:
        """Wake for the fork server's news (a process's exit among them); a new server's socket too."""
        if self.forks.sock is not None and self.forks.sock is not self._watched_forks:
            self.wakeup.watch(self.forks.fileno(), "forks")
            self.forks.on_exit = self.wakeup.wake  # an exit read elsewhere (a pid's wait, say) still wakes the loop
            self._watched_forks = self.forks.sock

    def cool_down(self) -> None:
        """Let the waiting job processes and the guard go: the worker stops."""
        self.ready.close()

    def offer(self, slot: int, queue: str, message: Message) -> None:
        """Hand *message*'s job to a waiting process for *slot*, to run at :meth:`start`, and open
        its log: both while the broker confirms the message's copy."""
        section = self.config.runner_for(queue)
        job = RunningJob(slot, queue, message, None, None, self.clock(), section.timeout)
        try:
            job.process = self._give(message, section.runner)
        except OSError:
            pass  # start tries again, and says why if no process takes the job then either
        job.log = self._open_log(job)
        self.offered[slot] = job

    def withdraw(self, slot: int) -> None:
        """The job offered for *slot* will not run (its message could not be held): its process goes,
        and its log says so."""
        job = self.offered.pop(slot, None)
        if job is None:
            return
        if job.process is not None:
            self.ready.discard(job.process)
        job.log.close(f"rbit: job {job.job_id} not run here: its message could not be held", outcome=NOT_RUN)
        if self.board is not None:
            self.board.ended(job.job_id, NOT_RUN, 0.0)

    def _give(self, message: Message, runner) -> jobs.JobProcess:
        """A waiting process offered *message*'s job; OSError if none takes it."""
        for _ in range(2):
            process = self.ready.take(self.forks)
            try:
                self.ready.watch(process)
                process.offer(runner, message, self.config.pybit, self.settings.name)
            except OSError as exc:  # it died waiting: one more try
                log.warning("a waiting job process was gone (%s); starting another", exc)
                self.ready.discard(process)
                continue
            return process
        raise OSError("no job process took the job")

    def _begin(self, job: RunningJob, runner) -> None:
        """Run *job* in the process it was offered to (or in another if that one is gone)."""
        if job.process is not None:
            try:
                job.process.go()
                return
            except OSError as exc:
                log.warning("the job process offered job %s was gone (%s); starting another", job.job_id, exc)
                self.ready.discard(job.process)
                job.process = None
        process = self._give(job.message, runner)
        try:
            process.go()
        except OSError:
            self.ready.discard(process)
            raise
        job.process = process

    def start(self, slot: int, delivery) -> None:
        """Run the job offered for *slot* (:meth:`offer`, always called first): its message, *delivery*,
        is held now."""
        job = self.offered.pop(slot)
        job.delivery, job.started = delivery, self.clock()
        self.slots[slot] = job
        try:
            self._begin(job, self.config.runner_for(job.queue).runner)
        except OSError as exc:
            log.error("job %s (%s): cannot start its process: %s", job.job_id, job.queue, exc)
            self._end(job, f"cannot start the job's process: {exc}")
            return
        log.info(LOG_JOB_START, *job.describe(), slot)
        process = job.process
        self.wakeup.watch(process.conn.fileno(), ("pipe", slot))  # its exit comes from the fork server
        job.output = Output(process, job.log, self.wakeup, ("output", slot), job.started)
        job.output.read(self.clock())
        self.warm_up()  # the slot's next process forks while this job runs, not between two jobs

    @staticmethod
    def _fields(job: RunningJob) -> dict:
        _, package, version, queue = job.describe()
        return {"package": package, "version": version, "queue": queue, "slot": job.slot}

    def _open_log(self, job: RunningJob) -> JobLog:
        """The job's log, opened; the live page follows it from now on (a reader of the file would
        otherwise take the job for ended)."""
        fields = self._fields(job)
        opened = self.logs.open(job.job_id, fields)
        if self.board is not None:
            self.board.started(job.job_id, fields, opened)
        return opened

    def service(self) -> None:
        """Read every job's news, stop jobs past their time, and end the jobs that exited."""
        if self.forks is not None:
            self.forks.read()  # pids and exits: the socket is emptied at each wake-up
        now = self.clock()
        if self.logs.due(now):
            self.logs.sweep(now, [job.job_id for job in self.slots.values()])
        for job in self.running():
            job.output.read(now)
            self._news(job)
            if job.process.eof:
                self.wakeup.unwatch(("pipe", job.slot))  # a closed pipe stays readable: stop waking on it
            if job.output.ending is None:
                if job.deadline is not None and now >= job.deadline and job.stop is Stop.NONE:
                    log.warning("job %s (%s): timed out after %g s; stopping it", job.job_id, job.queue, job.timeout)
                    self.stop(job, Stop.TIMEOUT)
                job.process.tick(now)
                if job.process.exited():  # its group is killed now
                    self._news(job)
                    job.output.ending = now
            if job.output.ending is not None and job.output.drained(now):
                self._news(job, final=True)
                if job.result is None and job.program is not None:
                    job.result = _program_result(job.process.exitcode, job.program)
                self._end(job, job.process.describe_exit())

    def _news(self, job: RunningJob, final: bool = False) -> None:
        """What the job's process sent, and the status lines of the program it became."""
        for event in job.process.receive():
            self._on_event(job, event)
        if job.program is None:
            return
        for line in job.process.read_statuses(final):
            found = status_line(line)
            if found is not None:
                self._on_program_status(job, *found)
        if job.process.status_eof:
            self.wakeup.unwatch(("status", job.slot))

    def stop(self, job: RunningJob, why: Stop, grace: float = jobs.KILL_GRACE) -> None:
        """Stop *job*'s process group; the first reason given is the one that counts."""
        if job.stop is Stop.NONE:
            job.stop = why
        job.process.stop(self.clock(), grace)

    def renew(self, deadline: float) -> None:
        """The worker's lease now runs until *deadline*: tell every job process, and the guard."""
        for job in self.running():
            job.process.renew(deadline)
        self.ready.renew(deadline)

    def fence(self) -> int:
        """The lease ran out: kill every running job's group, forget every job's statuses not yet
        sent, and leave every message alone (a live peer puts it back). How many were running."""
        running = self.running()
        for job in list(self.slots.values()):
            if self.reporter.discard(job.job_id):
                log.info("job %s (%s): statuses not yet sent to PyBit are dropped", job.job_id, job.queue)
            if job.decision is not None:
                job.decision = decide(job.result, stop=Stop.FENCED)
            else:
                job.stop = Stop.FENCED
                job.process.kill()
        return len(running)

    def moments(self) -> list[float]:
        """When the running jobs next need attention (a timeout, a SIGKILL after SIGTERM, output)."""
        now = self.clock()
        return [m for job in self.running() for m in (job.deadline, job.process.kill_at, *job.output.moments(now))
                if m is not None]

    def finish(self, broker) -> None:
        """Give each ended job's message its one end, then free the slot.

        The slot's in-progress copy is purged without waiting: the slot's next
        copy goes on the same channel, after the purge (see
        :meth:`rbit.broker.Broker.purge_nowait`), and the purge stays unsure,
        for the worker to wait for where it must, until the broker is seen to do it.
        """
        while self.finishing:
            job = self.finishing[0]
            if job.decision.fate is Fate.LOST:
                log.warning(LOG_JOB_LOST, *job.describe(), job.decision.text)
                self.finishing.pop(0)
                del self.slots[job.slot]
                continue
            if job.decision.fate is Fate.DELAY:
                queues.delay(broker, job.delivery, job.queue, self.settings.blocked_delay)
            elif job.decision.fate is Fate.PUT_BACK:
                queues.put_back(broker, job.delivery, job.queue, self.settings.name)
            queues.release(broker, self.settings.name, job.slot, wait=False)
            self.finishing.pop(0)
            del self.slots[job.slot]

    def _on_event(self, job: RunningJob, event: tuple) -> None:
        kind = event[0]
        if kind == "status" and job.stop is Stop.FENCED:
            log.info("job %s (%s): %s not reported: the job was lost to a fence", job.job_id, job.queue, event[1])
        elif kind == "status":
            _, status, text = event
            self._report(job, status, text)
            if status in FINAL:
                job.last_final = status
        elif kind == "result":
            job.result = event[1]
        elif kind == "exec":
            job.program = event[1]
            self.wakeup.watch(job.process.status_pipe.fileno(), ("status", job.slot))

    def _on_program_status(self, job: RunningJob, status: str, text: str | None) -> None:
        """A status line of the program the job's process became; an unknown one is an error in
        the job's log and the worker's, and is not reported (as under ``rbit try``)."""
        try:
            statuses.check(status)
        except UnknownStatus as exc:
            record = logging.LogRecord("rbit.runners.shell", logging.ERROR, __file__, 0, LOG_UNKNOWN_STATUS, (exc,),
                                       None)
            job.log.note(_JOB_LOG_FORMATTER.format(record))
            log.error("job %s (%s): " + LOG_UNKNOWN_STATUS, job.job_id, job.queue, exc)
            return
        self._on_event(job, ("status", status, text))

    def _report(self, job: RunningJob, status: str, text: str | None = None) -> None:
        self.reporter.report(job.job_id, job.message.request.web_host, status, text, queue=job.queue)
        if self.board is not None:
            self.board.status(job.job_id, status)

    def _end(self, job: RunningJob, exit_text: str) -> None:
        """Decide how the job ended and report it; the message's end follows in :meth:`finish`."""
        self.wakeup.unwatch(("pipe", job.slot))
        self.wakeup.unwatch(("status", job.slot))
        if job.output is not None:
            job.output.close()
        if job.process is not None:
            job.process.close()
            self.ready.done(job.process)
        job.decision = decision = decide(job.result, last_final=job.last_final, stop=job.stop,
                                         exit_text=exit_text, timeout=job.timeout)
        if decision.status is not None:
            self._report(job, decision.status, decision.text)
        duration = self.clock() - job.started
        self.metrics.job_ended(job.queue, decision.outcome, duration)
        if decision.fate is Fate.DROP:
            log.info(LOG_JOB_DROPPED, *job.describe(), decision.text)
        elif decision.fate is Fate.LOST:
            pass  # one line when its slot is freed (rbit.running.LOG_JOB_LOST)
        else:
            log.info(LOG_JOB_END, *job.describe(), decision.outcome, duration,
                     f": {decision.text}" if decision.text else "")
        # Its last line and metadata wait: at the end of the loop's turn, or while the broker
        # confirms the copy of a job taken before then, they are off the next job's way.
        self.logs.ended(job.log, f"rbit: job {job.job_id} ended {decision.outcome} in {duration:.1f} s"
                        + (f": {decision.text}" if decision.text else ""), outcome=decision.outcome,
                        duration=round(duration, 3), text=decision.text)
        if self.board is not None:
            self.board.ended(job.job_id, decision.outcome, duration)
        self.finishing.append(job)


def _program_result(code: int | None, program: str) -> Result:
    """The result of a job whose process became *program* and exited with *code*."""
    outcome = exit_outcome(code, program)
    if outcome is None:
        return Result(Ended.RETURNED)
    return Result(Ended.RAISED, outcome.status, outcome.message)
