"""How a job ends, decided in one place: every combination of how the runner ended, what it
reported last and why the worker stopped it, with the status reported and the message's fate."""

import itertools

import pytest

from rbit import statuses
from rbit.errors import JobOutcome
from rbit.outcome import Ended, Fate, Result, Stop, call_runner, decide

RETURNED = Result(Ended.RETURNED)
SKIPPED = Result(Ended.SKIPPED, None, "PyBit's history ends in Done")
CRASHED = Result(Ended.CRASHED, None, "RuntimeError: kaboom")
FAILED = Result(Ended.RAISED, statuses.FAILED, "broke")
BLOCKED = Result(Ended.RAISED, statuses.BLOCKED, "deps")
ODD = Result(Ended.RAISED, statuses.UPLOADED, "not an end")

RESULTS = {"returned": RETURNED, "skipped": SKIPPED, "crashed": CRASHED, "failed": FAILED,
           "blocked": BLOCKED, "odd outcome": ODD, "no result": None}
LAST_FINAL = [None, statuses.DONE, statuses.FAILED, statuses.BLOCKED, statuses.CANCELLED]


def expected(result, last_final, stop):
    """The rule, written out as the README's life-of-a-job says it: (outcome, fate)."""
    if stop is Stop.FENCED:
        return "lost", Fate.LOST
    if stop is Stop.TIMEOUT:
        return statuses.FAILED, Fate.ACK
    if stop is Stop.CANCEL:
        return statuses.CANCELLED, Fate.ACK
    if stop is Stop.SHUTDOWN:
        return statuses.WAITING, Fate.PUT_BACK
    if result is None or result in (CRASHED, FAILED, ODD):
        return statuses.FAILED, Fate.ACK
    if result is SKIPPED:
        return "not run", Fate.DROP
    if result is BLOCKED:
        return statuses.BLOCKED, Fate.DELAY
    outcome = last_final or statuses.DONE
    return outcome, Fate.DELAY if outcome == statuses.BLOCKED else Fate.ACK


@pytest.mark.parametrize(
    "name, last_final, stop", list(itertools.product(RESULTS, LAST_FINAL, list(Stop))),
)
def test_every_combination(name, last_final, stop):
    """The status to report and the message's fate for every way a job can end: a stop by
    the worker wins (timeout: Failed; cancel: Cancelled, dropped; shutdown: Waiting, back on
    its queue; a fence: nothing reported, the message left for whoever puts it back); then what
    the runner raised (Blocked: delayed; Failed or any other exception:
    Failed); a runner that returned ends with its own last final status, else Done; a job
    PyBit's history does not want is dropped with nothing reported. A status the runner
    already reported is not reported twice."""
    result = RESULTS[name]
    decision = decide(result, last_final=last_final, stop=stop, exit_text="killed by SIGKILL", timeout=5)
    outcome, fate = expected(result, last_final, stop)
    assert (decision.outcome, decision.fate) == (outcome, fate)
    if fate is Fate.DROP:
        assert decision.status is None and decision.text == SKIPPED.text
    elif fate is Fate.LOST:
        assert decision.status is None
    elif outcome == last_final:
        assert decision.status is None
    else:
        assert decision.status == outcome


@pytest.mark.parametrize("stop, result, text", [
    (Stop.TIMEOUT, RETURNED, "timed out after 5 s"),
    (Stop.CANCEL, None, "cancelled from PyBit"),
    (Stop.SHUTDOWN, None, "the worker stopped; the job is back on its queue"),
    (Stop.FENCED, RETURNED, "this worker's lease ran out; the job is put back by a live peer, "
                            "or by this worker if none did"),
    (Stop.NONE, None, "killed by SIGKILL"),
    (Stop.NONE, FAILED, "broke"),
    (Stop.NONE, CRASHED, "RuntimeError: kaboom"),
    (Stop.NONE, ODD, "the runner raised an outcome with status 'Uploaded', which does not end a job"),
    (Stop.NONE, RETURNED, None),
])
def test_the_text_reported_says_why(stop, result, text):
    """The text that goes with the final status says why the job ended that way."""
    assert decide(result, stop=stop, exit_text="killed by SIGKILL", timeout=5).text == text


class Runner:
    def __init__(self, action):
        self.action = action

    def run(self, message, set_status):
        self.action(set_status)


class Strange(JobOutcome):
    status = "Bogus"


@pytest.mark.parametrize("action, ended, status", [
    (lambda set_status: None, Ended.RETURNED, None),
    (lambda set_status: set_status(statuses.DONE), Ended.RETURNED, None),
    (lambda set_status: (_ for _ in ()).throw(Strange("odd")), Ended.RAISED, "Bogus"),
    (lambda set_status: (_ for _ in ()).throw(KeyboardInterrupt()), Ended.CRASHED, None),
    (lambda set_status: (_ for _ in ()).throw(SystemExit(3)), Ended.CRASHED, None),
])
def test_call_runner_reports_building_and_catches_everything(action, ended, status):
    """The runner is called after Building is reported; whatever it raises, even SystemExit,
    ends the job, never its caller. An outcome with a status that does not end a job fails it."""
    reported = []
    result = call_runner(Runner(action), None, lambda s, text=None: reported.append(s))
    assert reported[0] == statuses.BUILDING
    assert (result.ended, result.status) == (ended, status)
    assert decide(result, last_final=None).outcome in (statuses.DONE, statuses.FAILED)
