"""How a job ends: one pure decision from what happened to what is reported and what the message becomes.

The job's process, the worker and ``rbit try`` all come here, so a rule is
written once. :func:`call_runner` classifies how the runner itself ended;
:func:`decide` adds why the worker stopped the job, if it did, and returns
the status to report and the message's fate.
"""

from __future__ import annotations

import enum
import logging
import traceback
from dataclasses import dataclass

from . import statuses
from .errors import JobOutcome

log = logging.getLogger(__name__)


class Ended(enum.Enum):
    """How the runner ended, as seen from inside the job's process."""

    #: The runner returned.
    RETURNED = "returned"
    #: The runner raised ``rbit.Blocked``, ``rbit.Failed`` (or another JobOutcome).
    RAISED = "raised"
    #: The runner raised anything else.
    CRASHED = "crashed"
    #: The runner was not called: PyBit's history says the job is not to run.
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Result:
    """What the job's process sends back when the runner has ended."""

    ended: Ended
    #: With RAISED, the status the runner chose.
    status: str | None = None
    text: str | None = None


class Stop(enum.Enum):
    """Why the worker stopped a job's process, if it did."""

    NONE = "none"
    TIMEOUT = "timeout"
    CANCEL = "cancel"
    SHUTDOWN = "shutdown"
    #: The worker could not renew its lease: a live peer puts the job back (see rbit.lease).
    FENCED = "fenced"


class Fate(enum.Enum):
    """What becomes of the job's message."""

    #: The job ended: the message is acknowledged (its in-progress copy removed).
    ACK = "acknowledge"
    #: Blocked: the message waits in the delay queue, then returns to its queue.
    DELAY = "delay"
    #: The worker stopped before the job ended: the message goes back on its queue.
    PUT_BACK = "put back"
    #: The job was not run: the message is acknowledged and nothing is reported.
    DROP = "drop"
    #: The job was lost to a fence: nothing is reported and the message is left alone (its
    #: in-progress copy is for whoever puts it back: a live peer, or this worker when it joins again).
    LOST = "lost"


@dataclass(frozen=True)
class Decision:
    """The end of one job: the status to report now (None: nothing), and the message's fate."""

    status: str | None
    text: str | None
    fate: Fate
    #: The job's final status, for logs and metrics, whether or not it is reported now.
    outcome: str


def decide(result: Result | None, *, last_final: str | None = None, stop: Stop = Stop.NONE,
           exit_text: str = "the job's process ended before reporting a result",
           timeout: float | None = None) -> Decision:
    """The end of a job.

    *result* is what the job's process sent back (None if it sent nothing:
    it crashed or was killed); *last_final* the last final status the runner
    reported itself; *stop* why the worker stopped the job; *exit_text* how
    its process ended; *timeout* the runner section's timeout.
    """
    if stop is Stop.FENCED:
        return Decision(None, "this worker's lease ran out; the job is put back by a live peer, "
                              "or by this worker if none did", Fate.LOST, "lost")
    if stop is Stop.TIMEOUT:
        status, text = statuses.FAILED, f"timed out after {timeout:g} s"
    elif stop is Stop.CANCEL:
        status, text = statuses.CANCELLED, "cancelled from PyBit"
    elif stop is Stop.SHUTDOWN:
        status, text = statuses.WAITING, "the worker stopped; the job is back on its queue"
    elif result is None:
        status, text = statuses.FAILED, exit_text
    elif result.ended is Ended.SKIPPED:
        return Decision(None, result.text, Fate.DROP, "not run")
    elif result.ended is Ended.CRASHED:
        status, text = statuses.FAILED, result.text
    elif result.ended is Ended.RAISED:
        status, text = result.status, result.text
        if status not in statuses.FINAL:
            text = f"the runner raised an outcome with status {status!r}, which does not end a job"
            status = statuses.FAILED
    else:
        status, text = (last_final or statuses.DONE), None
    fate = {statuses.BLOCKED: Fate.DELAY, statuses.WAITING: Fate.PUT_BACK}.get(status, Fate.ACK)
    reported = None if status == last_final else status
    return Decision(reported, text if reported else None, fate, status)


def call_runner(runner, message, set_status) -> Result:
    """Report Building, call *runner* on *message*, and say how it ended.

    Everything the runner raises is caught here (KeyboardInterrupt and
    SystemExit too: the runner's end is the job's end, never the caller's).
    """
    try:
        set_status(statuses.BUILDING)
        runner.run(message, set_status)
    except JobOutcome as outcome:
        return Result(Ended.RAISED, outcome.status, outcome.message)
    except BaseException as exc:
        logging.getLogger("rbit.runner").error(
            "runner %r raised:\n%s", runner, traceback.format_exc().rstrip()
        )
        return Result(Ended.CRASHED, None, f"{type(exc).__name__}: {exc}")
    return Result(Ended.RETURNED)
