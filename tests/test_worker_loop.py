"""The worker's loop on an in-memory broker: each way a job ends, stopping, cancelling, duplicates
and a lost connection, in milliseconds and without RabbitMQ.

Each test builds a real :class:`rbit.worker.Worker` on a :class:`tests.memory_broker.MemoryBroker`,
with a recording reporter instead of PyBit, and turns its loop (:meth:`Worker.loop`) until
what it checks has happened. Jobs run in real processes, forked by one fork server for the
whole session, with the runners below. tests/test_worker.py checks the same behaviour
end to end against RabbitMQ.
"""

import logging
import os
import time
from dataclasses import dataclass

import pytest

import rbit
from rbit import config as rbit_config
from rbit import jobs, queues
from rbit.delivery import Outgoing
from rbit.errors import ConnectionLost, JobOutcome, NameInUse, QueueLocked, QueueMissing
from rbit.logdir import read_meta
from rbit.queues import (
    HEADER_QUEUE,
    HEADER_REASON,
    HEADER_RECOVERED,
    PYBIT_EXCHANGE,
    QueueSpec,
)
from rbit.running import NOT_RUN
from rbit.worker import CANCELS, JOBS, Worker

from .harness import alive, wait_until, write_config
from .memory_broker import MemoryBroker, MemoryServer
from .pybit_models import cancel_body, request_body

#: How the job processes import the runners below (the fork server preloads this module).
RUNNERS = "tests.test_worker_loop"

#: The build queue every test serves, and PyBit's routing key for it (request_body's defaults).
QUEUE, KEY = "cnx_any_latex_pdf", "cnx.any.latex.pdf"

#: Longest a runner waits for its release file, so that a failed test never leaves a job behind
#: (``release_timeout`` in the runner's section, for a test that keeps a job running longer).
RELEASE_TIMEOUT = 5.0


# -- runners, run by the worker in its job processes ---------------------------------


class Bogus(JobOutcome):
    """An outcome whose status PyBit does not know."""

    status = "Bogus"


def behave(message, set_status, settings):
    """Write the job id down, then do what the package name says."""
    job_id = message.request.get_job_id()
    with open(settings["record"], "a", encoding="utf-8") as handle:
        handle.write(f"{job_id} {int(message.redelivered)}\n")
    action = message.request.get_package()
    if action == "fail":
        raise rbit.Failed("the build broke on purpose")
    if action == "crash":
        raise RuntimeError("kaboom")
    if action == "bogus":
        raise Bogus("no such status")
    if action == "blocked-once":
        marker = f"{settings['record']}.blocked.{job_id}"
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise rbit.Blocked("missing build dependencies")
    if action == "wait":
        release = f"{settings['release']}.{job_id}"
        deadline = time.monotonic() + float(settings.get("release_timeout", RELEASE_TIMEOUT))
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.005)


# -- the fake PyBit and the worker's harness --------------------------------------------


@dataclass(frozen=True)
class Report:
    job_id: int
    web_host: str
    status: str
    text: str | None
    queue: str | None


class RecordingReporter:
    """Stands for rbit.reporting.StatusReporter: keeps every report, in order."""

    backlog = 0

    def __init__(self):
        self.reports = []

    def report(self, job_id, web_host, status, text=None, queue=None):
        self.reports.append(Report(job_id, web_host, status, text, queue))

    def statuses(self, job_id):
        return [report.status for report in self.reports if report.job_id == job_id]

    def discard(self, job_id):
        return 0  # nothing waits here: every report is taken at once

    def text(self, job_id, status):
        return next(report.text for report in self.reports if report.job_id == job_id and report.status == status)

    def start(self):
        pass

    def stop(self, timeout=None):
        pass


@pytest.fixture(scope="session")
def forks():
    """The fork server that starts every job process, started once, with the runners imported."""
    server = jobs.fork_server([RUNNERS])
    yield server
    server.close()


@pytest.fixture
def server():
    made = MemoryServer()
    yield made
    made.close()


class Harness:
    """Makes workers on one MemoryServer, publishes as PyBit does, and releases waiting jobs."""

    def __init__(self, tmp_path, server, forks):
        self.tmp_path = tmp_path
        self.server = server
        self.forks = forks
        self.record = tmp_path / "record"
        self.workers = []

    def worker(self, name="w1", connect=True, timeout=None, **rbit_keys):
        runner = {"runner": f"python!{RUNNERS}:behave", "record": self.record, "release": self.tmp_path / "release"}
        if timeout is not None:
            runner["timeout"] = timeout
        # polling_time only bounds a wait that no news ends: the tests see no such wait.
        keys = {"polling_time": "1", **rbit_keys}
        path = write_config(self.tmp_path / f"{name}.ini", name=name, vhost=None, runners={QUEUE: runner},
                            rbit=keys, amqp={"heartbeat": "0"})
        worker = Worker(rbit_config.load(path), MemoryBroker(self.server, name), reporter=RecordingReporter(),
                        forks=self.forks)
        self.workers.append(worker)
        if connect:
            assert worker._connect()
        return worker

    def publish(self, job_id, package="done", **fields):
        """A build request to PyBit's exchange, as PyBit's controller publishes it."""
        self.server.publish(request_body(job_id, package=package, **fields), KEY)

    def release(self, job_id):
        (self.tmp_path / f"release.{job_id}").touch()

    def runs(self):
        """(job id, redelivered) of every runner call so far."""
        if not self.record.exists():
            return []
        return [tuple(int(word) for word in line.split()) for line in self.record.read_text().splitlines()]

    def stop(self, worker):
        """Stop *worker* as a first signal does (unless it is done already), and let it go."""
        if not worker._done():
            worker.request_stop()
            turn_until(worker, worker._done)
        worker._shutdown()
        self.workers.remove(worker)

    def close(self):
        for worker in self.workers:
            let_go(worker)


def let_go(worker):
    """Kill every job *worker* still runs and shut it down, as a test that is over does."""
    for job in worker.running():
        job.process.kill()
        job.process.close()
    worker.slots.clear()
    worker._shutdown()


@pytest.fixture
def harness(tmp_path, server, forks):
    made = Harness(tmp_path, server, forks)
    yield made
    made.close()


def turn_until(worker, predicate, timeout=3.0):
    """Turn *worker*'s loop until *predicate()* is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the worker never got there"
        worker.loop()


def reports(worker):
    return worker.reporter


def in_progress(worker, slot=0):
    return queues.in_progress_name(worker.settings.name, slot)


def nothing_left(server, worker):
    """The message had its one end: nothing on its queue, unacknowledged or in progress."""
    return (server.depth(QUEUE), server.unacked(), server.depth(in_progress(worker))) == (0, [], 0)


# -- How a job ends --------------------------------------------------------------------


def test_a_runner_that_returns_reports_building_then_done_and_its_message_ends(harness, server):
    """A runner that returns: the worker reports Building, then Done when it returns; the message is
    acknowledged and its in-progress copy removed."""
    worker = harness.worker()
    harness.publish(1)
    turn_until(worker, lambda: not worker.slots and reports(worker).statuses(1))
    assert reports(worker).statuses(1) == ["Building", "Done"]
    assert reports(worker).reports[-1].queue == QUEUE
    assert nothing_left(server, worker)
    assert harness.runs() == [(1, 0)]


def test_rbit_failed_reports_failed_with_its_text(harness, server):
    """``raise rbit.Failed(text)``: reported Failed, with the text; the message is acknowledged."""
    worker = harness.worker()
    harness.publish(2, "fail")
    turn_until(worker, lambda: not worker.slots and "Failed" in reports(worker).statuses(2))
    assert reports(worker).statuses(2) == ["Building", "Failed"]
    assert reports(worker).text(2, "Failed") == "the build broke on purpose"
    assert nothing_left(server, worker)


def test_any_other_exception_reports_failed(harness, server):
    """Any other exception: Failed, and the worker goes on."""
    worker = harness.worker()
    harness.publish(3, "crash")
    turn_until(worker, lambda: not worker.slots and "Failed" in reports(worker).statuses(3))
    assert reports(worker).text(3, "Failed") == "RuntimeError: kaboom"
    assert nothing_left(server, worker)


def test_blocked_waits_in_the_delay_queue_then_is_offered_again(harness, server):
    """``raise rbit.Blocked(text)``: reported Blocked; the message waits in the delay queue, whose
    messages expire after ``blocked_delay`` and return to the build queue: the job is offered again."""
    worker = harness.worker(blocked_delay="2")
    delay = queues.delay_queue(QUEUE, 2).name
    assert delay == f"rbit.delay.{QUEUE}.2000ms"
    harness.publish(4, "blocked-once")
    turn_until(worker, lambda: not worker.slots and "Blocked" in reports(worker).statuses(4))
    assert reports(worker).statuses(4) == ["Building", "Blocked"]
    assert reports(worker).text(4, "Blocked") == "missing build dependencies"
    assert server.depth(delay) == 1
    assert nothing_left(server, worker)

    assert server.expire(delay) == 1  # blocked_delay has passed
    turn_until(worker, lambda: not worker.slots and "Done" in reports(worker).statuses(4))
    assert reports(worker).statuses(4) == ["Building", "Blocked", "Building", "Done"]
    assert [job_id for job_id, _ in harness.runs()] == [4, 4]
    assert server.depth(delay) == 0
    assert nothing_left(server, worker)


def test_an_outcome_with_a_status_that_ends_no_job_fails_and_the_worker_goes_on(harness, server):
    """A runner that raises an outcome with a status PyBit does not know: the job fails (the unknown
    status never reaches PyBit) and the worker takes the next job."""
    worker = harness.worker()
    harness.publish(5, "bogus")
    turn_until(worker, lambda: not worker.slots and "Failed" in reports(worker).statuses(5))
    assert reports(worker).statuses(5) == ["Building", "Failed"]
    assert "'Bogus'" in reports(worker).text(5, "Failed")
    harness.publish(6)
    turn_until(worker, lambda: not worker.slots and "Done" in reports(worker).statuses(6))
    assert nothing_left(server, worker)


def test_a_job_past_its_timeout_is_stopped_and_failed(harness, server):
    """The runner hangs past ``timeout``: its process group is stopped; Failed."""
    # Long enough for the job's process to have made its process group, even
    # when the fork server must import this module for each job.
    worker = harness.worker(timeout="0.5")
    harness.publish(7, "wait")
    turn_until(worker, lambda: not worker.slots and "Failed" in reports(worker).statuses(7))
    assert reports(worker).statuses(7) == ["Building", "Failed"]
    assert reports(worker).text(7, "Failed") == "timed out after 0.5 s"
    assert nothing_left(server, worker)


def test_a_bad_message_goes_unchanged_to_the_rejected_queue_with_why_and_whence(harness, server):
    """A message that is not a valid build request goes to the rejected queue, unchanged, with the
    headers ``x-rbit-reason`` and ``x-rbit-queue``; nothing is reported and no job runs."""
    worker = harness.worker()
    server.publish(b'{"not": "a build request"}', KEY)
    rejected = worker.settings.rejected_queue
    turn_until(worker, lambda: server.depth(rejected) == 1)
    [message] = server.messages(rejected)
    assert message.body == b'{"not": "a build request"}'
    assert message.headers[HEADER_QUEUE] == QUEUE
    assert message.headers[HEADER_REASON]
    assert reports(worker).reports == [] and harness.runs() == []
    assert nothing_left(server, worker)


# -- Stopping -------------------------------------------------------------------------


def test_a_stopping_worker_takes_no_new_job_and_lets_the_running_one_finish(harness, server):
    """First SIGTERM or SIGINT: no new job; running jobs get ``shutdown_grace`` seconds to finish,
    and one that finishes in time ends as usual."""
    worker = harness.worker(concurrency="2")
    harness.publish(10, "wait")
    turn_until(worker, lambda: reports(worker).statuses(10) == ["Building"])
    worker.request_stop()
    worker.loop()
    assert not worker.broker.consuming(JOBS)
    harness.publish(11)
    harness.release(10)
    turn_until(worker, worker._done)
    assert reports(worker).statuses(10) == ["Building", "Done"]
    assert reports(worker).statuses(11) == []
    [message] = server.messages(QUEUE)
    assert message.body == request_body(11, package="done").encode()
    assert not message.redelivered  # never even handed to the stopping worker
    assert server.unacked() == [] and server.depth(in_progress(worker)) == 0


def test_a_job_still_running_after_the_shutdown_grace_goes_back_on_its_queue(harness, server):
    """First SIGTERM or SIGINT: after ``shutdown_grace`` the running job's process group is stopped,
    its message goes back on its queue (naming the worker in ``x-rbit-recovered``) and Waiting is
    reported."""
    worker = harness.worker(shutdown_grace="0.05")
    harness.publish(12, "wait")
    turn_until(worker, lambda: reports(worker).statuses(12) == ["Building"])
    worker.request_stop()
    turn_until(worker, worker._done)
    assert reports(worker).statuses(12) == ["Building", "Waiting"]
    assert reports(worker).text(12, "Waiting") == "the worker stopped; the job is back on its queue"
    [message] = server.messages(QUEUE)
    assert message.body == request_body(12, package="wait").encode()
    assert message.headers[HEADER_RECOVERED] == "w1"
    assert server.unacked() == [] and server.depth(in_progress(worker)) == 0


# -- Cancelling -----------------------------------------------------------------------


def test_a_cancel_request_stops_the_job_which_is_cancelled_and_its_message_dropped(harness, server):
    """PyBit cancels the job: a CancelRequest to the worker's name stops the job's process group;
    Cancelled; the message is dropped."""
    worker = harness.worker()
    harness.publish(20, "wait")
    turn_until(worker, lambda: reports(worker).statuses(20) == ["Building"])
    server.publish(cancel_body(20, "w1"), "w1")
    turn_until(worker, lambda: not worker.slots and "Cancelled" in reports(worker).statuses(20))
    assert reports(worker).statuses(20) == ["Building", "Cancelled"]
    assert reports(worker).text(20, "Cancelled") == "cancelled from PyBit"
    assert nothing_left(server, worker)
    assert server.depth("w1") == 0


# -- Duplicates and lost connections -----------------------------------------------------


def test_a_duplicate_of_a_running_job_is_dropped(harness, server, caplog):
    """A worker that receives a job again while the job runs drops the duplicate: it is
    acknowledged, not held, and the job runs once."""
    worker = harness.worker(concurrency="2")
    harness.publish(30, "wait")
    turn_until(worker, lambda: reports(worker).statuses(30) == ["Building"])
    harness.publish(30, "wait")
    with caplog.at_level(logging.WARNING, logger="rbit.taking"):
        turn_until(worker, lambda: server.depth(QUEUE) == 0 and not server.unacked())
    assert "job 30 (cnx_any_latex_pdf): already running here; dropping the duplicate" in caplog.text
    assert server.depth(in_progress(worker, 1)) == 0
    harness.release(30)
    turn_until(worker, lambda: not worker.slots)
    assert reports(worker).statuses(30) == ["Building", "Done"]
    assert harness.runs() == [(30, 0)]
    assert nothing_left(server, worker)


def test_the_job_keeps_running_while_the_worker_reconnects(harness, server):
    """The broker restarts or the network drops: the job keeps running, the worker reconnects, then
    finishes the job's message. The job is reported once and not run again."""
    worker = harness.worker()
    harness.publish(40, "wait")
    turn_until(worker, lambda: reports(worker).statuses(40) == ["Building"])
    [copy] = server.messages(in_progress(worker))
    assert copy.headers[HEADER_QUEUE] == QUEUE

    worker.broker.fail()
    turn_until(worker, lambda: worker.broker.connections == 2)
    assert worker.running() and worker.metrics.reconnects._value.get() == 1
    assert server.depth(in_progress(worker)) == 1 and server.depth(QUEUE) == 0
    harness.release(40)
    turn_until(worker, lambda: not worker.slots)
    assert reports(worker).statuses(40) == ["Building", "Done"]
    assert harness.runs() == [(40, 0)]
    assert nothing_left(server, worker)


def test_a_job_that_ends_while_the_broker_is_away_finishes_its_message_after_reconnecting(harness, server):
    """The broker is away when the job ends: the end is reported at once, and the in-progress copy is
    removed once the worker has reconnected. The job is reported once and not run again."""
    worker = harness.worker()
    harness.publish(41, "wait")
    turn_until(worker, lambda: reports(worker).statuses(41) == ["Building"])
    copies_while_away = []

    def job_ended():
        if worker.jobs.finishing:
            copies_while_away.append(server.depth(in_progress(worker)))
        return bool(worker.jobs.finishing)

    worker.broker.fail()
    worker.broker.refuse(until=job_ended)
    harness.release(41)
    turn_until(worker, lambda: worker.broker.connections == 2)
    assert copies_while_away == [1]
    assert not worker.slots
    assert reports(worker).statuses(41) == ["Building", "Done"]
    assert harness.runs() == [(41, 0)]
    assert nothing_left(server, worker)


def test_a_purge_lost_with_the_connection_is_done_again_before_anything_is_consumed(harness, server):
    """The connection drops with an ended job's purge on its way: the slot was free at once, and
    the purge is unsure; once connected again the worker purges again, waiting, before it consumes:
    the copy is gone, and a later start, which puts back whatever copy it finds, does not run the
    job again."""
    worker = harness.worker()
    worker.broker.drop_after("purge_nowait", answered=True)
    while_away = []

    def connecting_again():
        while_away.append((server.depth(in_progress(worker)), worker.broker.unsure_purges))
        return True

    worker.broker.refuse(until=connecting_again)
    harness.publish(43)
    turn_until(worker, lambda: worker.broker.connections == 2)
    assert while_away == [(1, {in_progress(worker)})]
    assert not worker.broker.unsure_purges and nothing_left(server, worker)

    harness.stop(worker)
    again = harness.worker("w1")
    assert server.depth(QUEUE) == 0 and server.unacked() == []
    assert harness.runs() == [(43, 0)] and reports(again).reports == []


def test_a_stop_waits_for_the_broker_to_purge_an_ended_jobs_copy(harness, server):
    """First SIGTERM, and the connection drops with the running job's purge on its way as the job
    ends: the worker does not stop while the purge is unsure; it waits for the broker, purges
    again, waiting, and stops with nothing left in progress."""
    worker = harness.worker()
    harness.publish(44, "wait")
    turn_until(worker, lambda: reports(worker).statuses(44) == ["Building"])
    worker.broker.drop_after("purge_nowait", answered=True)
    worker.broker.refuse(times=3)
    worker.request_stop()
    harness.release(44)
    turn_until(worker, worker._done)
    assert worker.broker.connections == 2
    assert reports(worker).statuses(44) == ["Building", "Done"]
    assert not worker.broker.unsure_purges and nothing_left(server, worker)


def test_a_second_signal_with_the_broker_away_kills_the_job_and_leaves_its_copy_for_the_next_start(
        harness, server):
    """Second SIGTERM or SIGINT: running jobs are killed at once; if the broker is away, their messages
    stay in the in-progress queue for the next start, which puts them back on their queues."""
    worker = harness.worker()
    harness.publish(90, "wait")
    turn_until(worker, lambda: reports(worker).statuses(90) == ["Building"])
    assert wait_until(lambda: harness.runs() == [(90, 0)], timeout=3)  # the runner has begun
    worker.broker.fail()
    worker.broker.refuse(until=lambda: False)
    worker.request_stop()
    worker.request_stop()
    turn_until(worker, worker._done)
    assert reports(worker).statuses(90) == ["Building", "Waiting"]
    assert server.depth(in_progress(worker)) == 1 and server.depth(QUEUE) == 0

    harness.stop(worker)
    harness.release(90)
    again = harness.worker("w1")
    turn_until(again, lambda: not again.slots and "Done" in reports(again).statuses(90))
    assert harness.runs() == [(90, 0), (90, 1)]
    assert nothing_left(server, again)


@pytest.mark.parametrize("answered", [True, False], ids=["before the acknowledgement", "before the confirm"])
def test_a_copy_whose_original_came_back_does_not_outlive_it(harness, server, answered):
    """The connection breaks after the in-progress copy reached the broker but before the original
    was acknowledged: the original comes back and runs (here on a second worker), and the first
    worker removes its copy when it reconnects, so that its next start does not run the job again."""
    first, second = harness.worker("w1"), harness.worker("w2")  # w1 consumes first: it gets the job
    logs = first.jobs.logs.log_dir / "80"
    earlier = set(logs.glob("*.log"))  # the log directory outlives a test
    first.broker.drop_after("publish", lambda message, routing_key, *_: routing_key == in_progress(first),
                            answered=answered)
    harness.publish(80)
    turn_until(first, lambda: first.broker.connections == 2)
    assert not first.slots and server.depth(in_progress(first)) == 0
    turn_until(second, lambda: not second.slots and "Done" in reports(second).statuses(80))

    harness.stop(first)
    harness.worker("w1")  # starts again, recovering what it left unfinished: nothing
    assert server.depth(QUEUE) == 0 and server.unacked() == []
    assert reports(first).reports == [] and reports(second).statuses(80) == ["Building", "Done"]
    assert harness.runs() == [(80, 1)]
    # The first worker had opened the job's log while the copy was confirmed: it says the job did not run.
    attempts = [path for path in set(logs.glob("*.log")) - earlier if read_meta(path).get("worker") == "w1"]
    assert [read_meta(path)["outcome"] for path in attempts] == [NOT_RUN]
    assert "not run here: its message could not be held" in attempts[0].read_text()


# -- Holding only what it runs -----------------------------------------------------------


def test_a_worker_holds_no_message_it_is_not_running(harness, server):
    """The worker never holds a message it is not running, and an idle worker beside it gets the
    next job at once."""
    first = harness.worker("w1")
    harness.publish(50, "wait")
    turn_until(first, lambda: reports(first).statuses(50) == ["Building"])
    harness.publish(51, "wait")
    assert not first.broker.consuming(JOBS)
    assert server.depth(QUEUE) == 1 and server.unacked() == []

    second = harness.worker("w2")
    turn_until(second, lambda: reports(second).statuses(51) == ["Building"])
    assert server.depth(QUEUE) == 0
    assert reports(first).statuses(51) == [] and reports(second).statuses(50) == []
    assert wait_until(lambda: sorted(job_id for job_id, _ in harness.runs()) == [50, 51], timeout=3)


def test_a_freed_slot_takes_the_next_job_while_the_others_run(harness, server):
    """With every slot busy the next message stays ready on its queue; the moment a job ends, its
    slot takes the next one, while the other job goes on."""
    worker = harness.worker(concurrency="2")
    harness.publish(60, "wait")
    harness.publish(61, "wait")
    harness.publish(62)
    turn_until(worker, lambda: reports(worker).statuses(60) == reports(worker).statuses(61) == ["Building"])
    assert server.depth(QUEUE) == 1 and server.unacked() == []
    harness.release(60)
    turn_until(worker, lambda: reports(worker).statuses(62) == ["Building", "Done"])
    assert reports(worker).statuses(61) == ["Building"]
    harness.release(61)
    turn_until(worker, lambda: not worker.slots)
    assert sorted(job_id for job_id, _ in harness.runs()) == [60, 61, 62]
    assert server.depth(QUEUE) == 0 and server.unacked() == []


def test_a_started_process_waits_for_each_slots_next_job_and_runs_one_job_only(harness, server):
    """Before a message arrives, a job process is started and waits for each slot's next job, so
    that a job starts without a fork (a busy slot's next one is forked while its job runs); every
    job has a process of its own, never one that ran a job."""
    worker = harness.worker(concurrency="2")
    waiting = {process.pid for process in worker.jobs.ready.waiting}
    assert len(waiting) == 2 and all(alive(pid) for pid in waiting)
    harness.publish(70, "wait")
    turn_until(worker, lambda: reports(worker).statuses(70) == ["Building"])
    first = worker.slots[0].process.pid
    assert first in waiting
    now_waiting = {process.pid for process in worker.jobs.ready.waiting}
    assert len(now_waiting) == 2 and waiting - {first} < now_waiting and first not in now_waiting
    harness.release(70)
    turn_until(worker, lambda: not worker.slots)
    assert not alive(first)
    assert len(worker.jobs.ready.waiting) == 2 and first not in {process.pid for process in worker.jobs.ready.waiting}
    harness.publish(71)
    turn_until(worker, lambda: reports(worker).statuses(71) == ["Building", "Done"] and not worker.slots)
    assert harness.runs() == [(70, 0), (71, 0)]


def test_a_worker_puts_back_the_jobs_it_left_unfinished_when_it_starts_again(harness, server):
    """The worker was killed mid-job: the message stays in ``rbit.inprogress.NAME.SLOT``; when the
    worker starts again, it puts it back on its queue and the job runs again, to an end
    (``message.redelivered`` is true)."""
    worker = harness.worker(connect=False)
    leftover = MemoryBroker(server, "the worker's last run")
    leftover.connect()
    leftover.declare(QueueSpec(in_progress(worker)))
    leftover.publish(Outgoing(request_body(70), {HEADER_QUEUE: QUEUE}), in_progress(worker))
    leftover.close()
    assert worker._connect()
    turn_until(worker, lambda: not worker.slots and "Done" in reports(worker).statuses(70))
    assert harness.runs() == [(70, 1)]
    assert nothing_left(server, worker)


def test_two_workers_with_the_same_name_cannot_run_at_once(harness):
    """Being exclusive, the worker's own queue stops two workers with the same name from running
    at once."""
    harness.worker("w1")
    second = harness.worker("w1", connect=False)
    with pytest.raises(NameInUse):
        second._connect()


# -- The in-memory broker behaves as RabbitMQ does where the worker relies on it ---------


def test_a_cancel_queue_gone_as_it_was_declared_is_declared_again_on_a_new_connection(harness, server,
                                                                                        monkeypatch):
    """Just after a cluster node dies, the worker's cancel queue can be declared and then found
    missing (the cluster was still removing the one that lived on the dead node): the worker
    connects again, declares it anew and serves, instead of stopping."""
    worker = harness.worker(connect=False)
    consume, refused = worker.broker.consume, []

    def consume_once_missing(key, specs, callback, no_ack=False):
        if key == CANCELS and not refused:
            refused.append(key)
            raise QueueMissing(f"NOT_FOUND - no queue '{specs[0].name}' in vhost 'memory'")
        return consume(key, specs, callback, no_ack)

    monkeypatch.setattr(worker.broker, "consume", consume_once_missing)
    worker._reconnect(None)
    assert refused == [CANCELS] and worker.broker.connected and worker.broker.consuming(CANCELS)
    harness.publish(80)
    turn_until(worker, lambda: reports(worker).statuses(80) == ["Building", "Done"] and not worker.slots)


def test_memory_broker_prefetch_counts_unacknowledged_deliveries_across_consumers(server):
    """qos(1) with two consumed queues: one delivery at a time, the next once it is acknowledged;
    a requeued message comes back first, redelivered."""
    broker = MemoryBroker(server)
    broker.connect()
    specs = [QueueSpec("a"), QueueSpec("b")]
    for spec in specs:
        broker.declare(spec)
        broker.publish(Outgoing(spec.name), spec.name)
    got = []
    broker.qos(1)
    broker.consume("k", specs, lambda queue, delivery: got.append(delivery))
    broker.drain()
    assert [d.body for d in got] == [b"a"] and len(server.unacked()) == 1
    got[0].requeue()
    broker.drain()
    assert [(d.body, d.redelivered) for d in got[1:]] == [(b"a", True)]
    got[1].ack()
    broker.drain()
    assert [d.body for d in got[2:]] == [b"b"]


def test_memory_broker_dropped_connection_requeues_its_messages_and_frees_its_exclusive_queues(server):
    """A dropped connection: calls fail until connect(), unacknowledged messages go back redelivered,
    its exclusive queue goes (until then another connection finds it locked)."""
    first, second = MemoryBroker(server, "first"), MemoryBroker(server, "second")
    first.connect()
    second.connect()
    first.declare(QueueSpec("mine", routing_key="mine", durable=False, exclusive=True, auto_delete=True))
    with pytest.raises(QueueLocked):
        second.declare(QueueSpec("mine", routing_key="mine", durable=False, exclusive=True, auto_delete=True))
    first.declare(QueueSpec("q"))
    server.publish("job", "q", exchange="")
    assert first.get("q").body == b"job"
    first.fail()
    with pytest.raises(ConnectionLost):
        first.drain()
    assert [(m.body, m.redelivered) for m in server.messages("q")] == [(b"job", True)]
    assert not server.exists("mine")
    first.connect()
    first.publish(Outgoing("to pybit"), "nowhere", exchange=PYBIT_EXCHANGE)  # the exchange stays
