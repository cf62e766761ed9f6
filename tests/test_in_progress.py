"""The in-progress copy on the real broker, at its job's end: purged without a wait, never taking
the slot's next copy with it, done again when the connection is lost first, sent again first when
a refused publish replaces the channel, and never left behind by a clean stop (README: "What
happens to a job when something fails").

Each test drives a :class:`rbit.worker.Worker` in this process on a real
:class:`rbit.broker.Broker`, in a vhost of its own, as tests/test_round_trips.py does, so that it
can look at the in-progress queue between two turns of the loop, and drop a purge that the worker
sends without waiting, as a connection lost with the purge on its way would.
"""

import threading
import time

import amqp
import pytest

from rbit import queues
from rbit.delivery import Outgoing
from rbit.pybit import decode_build_request
from rbit.worker import JOBS

from .pybit_models import request_body
from .test_metrics import close_connections
from .test_round_trips import make_worker, prefetch, publish  # noqa: F401  (a fixture)
from .test_worker_loop import forks, let_go, turn_until  # noqa: F401  (a fixture)


def copies(vhost, queue):
    """The job ids of the messages in *queue*, left there: taken unacknowledged, then handed back."""
    with vhost.connection() as conn:
        channel = conn.channel()
        found = []
        while (message := channel.basic_get(queue, no_ack=False)) is not None:
            found.append(decode_build_request(message.body).get_job_id())
        channel.close()  # hands them all back
    return found


def ran(tmp_path):
    """The job ids the runner was called for, in order."""
    record = tmp_path / "record"
    return [int(line.split()[0]) for line in record.read_text().splitlines()] if record.exists() else []


def reconnected(worker):
    """The worker has connected again once, and joined (it consumes too, if a slot is free)."""
    return (worker.metrics.reconnects._value.get() == 1 and worker.liveness.joined
            and (worker.broker.consuming(JOBS) or worker.jobs.free_slot() is None))


@pytest.fixture
def lost_purges(monkeypatch):
    """Every purge sent without waiting is dropped on its way, as a lost connection may drop it; the
    names of the queues are listed."""
    dropped = []
    purge = amqp.Channel.queue_purge

    def queue_purge(channel, queue="", nowait=False, *args, **kwargs):
        if nowait:
            dropped.append(queue)
            return None
        return purge(channel, queue, nowait, *args, **kwargs)

    monkeypatch.setattr(amqp.Channel, "queue_purge", queue_purge)
    return dropped


@pytest.fixture
def channels(monkeypatch):
    """What goes to the in-progress queues, in order: ``("purge", channel, nowait)`` and
    ``("copy", channel)``."""
    seen = []
    purge, publish_ = amqp.Channel.queue_purge, amqp.Channel._basic_publish

    def queue_purge(channel, queue="", nowait=False, *args, **kwargs):
        if queue.startswith("rbit.inprogress."):
            seen.append(("purge", channel, nowait))
        return purge(channel, queue, nowait, *args, **kwargs)

    def basic_publish(channel, msg, exchange="", routing_key="", *args, **kwargs):
        if routing_key.startswith("rbit.inprogress."):
            seen.append(("copy", channel))
        return publish_(channel, msg, exchange, routing_key, *args, **kwargs)

    monkeypatch.setattr(amqp.Channel, "queue_purge", queue_purge)
    monkeypatch.setattr(amqp.Channel, "_basic_publish", basic_publish)
    return seen


def test_the_purge_at_a_jobs_end_never_takes_the_slots_next_copy(
        tmp_path, unique, prefetch, forks, channels):  # noqa: F811
    """Jobs waiting on the served queues run one after the other in one slot: each job's end
    purges the slot's in-progress queue without waiting, on the channel that the next job's copy
    goes on, right after it. Between any two turns of the loop, a slot with a job holds exactly
    that job's copy, never the one before it and never none. With the last job running, the
    broker drops the worker's connection: the copy is still there, the job ends once, and its
    copy goes then."""
    vhost, queue_type = prefetch
    # The last job waits for its release file for as long as the test may take to drop the connection.
    worker = make_worker(tmp_path, unique, vhost, queue_type, forks, runner_keys={"release_timeout": "60"})
    in_progress = queues.in_progress_name(f"w{unique}", 0)
    jobs = [5 * n for n in range(1, 9)]  # all on one served queue, so that they come in this order
    last = jobs[-1]
    try:
        for job_id in jobs:
            publish(vhost, unique, job_id, "wait" if job_id == last else "done")
        held, deadline = set(), time.monotonic() + 60
        while worker.reporter.statuses(last) != ["Building"]:
            assert time.monotonic() < deadline, "the jobs never got there"
            worker.loop()
            for job in list(worker.slots.values()):
                assert copies(vhost, in_progress) == [job.job_id]
                held.add(job.job_id)
        assert held == set(jobs)

        assert close_connections(vhost) >= 1
        turn_until(worker, lambda: reconnected(worker), timeout=20)
        assert [job.job_id for job in worker.running()] == [last]
        assert copies(vhost, in_progress) == [last]
        (tmp_path / f"release.{last}").touch()
        turn_until(worker, lambda: worker.reporter.statuses(last)[-1:] == ["Done"] and not worker.slots, timeout=20)
        assert vhost.wait_depth(in_progress, 0)
        events = list(channels)
    finally:
        let_go(worker)
    assert ran(tmp_path) == jobs
    assert all(worker.reporter.statuses(job_id) == ["Building", "Done"] for job_id in jobs)
    # Each purge went without waiting, on the channel of the copy after it.
    purges = [index for index, event in enumerate(events) if event[0] == "purge"]
    assert len(purges) == len(jobs) and all(events[index][2] for index in purges)
    assert all(events[index][1] is events[index + 1][1] for index in purges if index + 1 < len(events))


def test_a_purge_lost_with_the_connection_is_done_again_on_reconnecting_and_the_job_runs_once(
        tmp_path, unique, prefetch, forks, lost_purges):  # noqa: F811
    """A job ends and its copy's purge goes out without waiting, but is lost on its way: the slot
    is free at once, and the purge is unsure. The broker drops the connection before anything
    shows the purge done: once connected again, the worker purges the queue again, waiting, before
    it consumes, so the copy is gone; a later start of the same worker, which puts back whatever
    copy it finds, finds none, and the job does not run again."""
    vhost, queue_type = prefetch
    worker = make_worker(tmp_path, unique, vhost, queue_type, forks)
    in_progress = queues.in_progress_name(f"w{unique}", 0)
    try:
        publish(vhost, unique, 1)
        turn_until(worker, lambda: worker.reporter.statuses(1)[-1:] == ["Done"] and not worker.slots
                   and worker.broker.consuming(JOBS), timeout=20)
        assert lost_purges == [in_progress]
        assert worker.broker.unsure_purges == {in_progress}
        assert copies(vhost, in_progress) == [1]

        assert close_connections(vhost) >= 1
        turn_until(worker, lambda: reconnected(worker), timeout=20)
        assert copies(vhost, in_progress) == [] and not worker.broker.unsure_purges
    finally:
        let_go(worker)

    again = make_worker(tmp_path, unique, vhost, queue_type, forks)  # the same name: a later start
    try:
        turn_until(again, lambda: again.liveness.joined and again.broker.consuming(JOBS), timeout=20)
        for _ in range(20):  # a job put back would be taken by now
            again.loop()
        assert again.reporter.reports == [] and not again.slots
    finally:
        let_go(again)
    assert ran(tmp_path) == [1]
    assert worker.reporter.statuses(1) == ["Building", "Done"]


def test_a_clean_stop_waits_for_the_purge_and_leaves_no_in_progress_copy(
        tmp_path, unique, prefetch, forks, lost_purges):  # noqa: F811
    """A job ends, and the worker is asked to stop before anything shows its copy's purge done
    (here the purge is even lost on its way): the worker does not stop until the broker has done
    it; it purges again, waiting, and stops with its in-progress queue empty."""
    vhost, queue_type = prefetch
    worker = make_worker(tmp_path, unique, vhost, queue_type, forks)
    in_progress = queues.in_progress_name(f"w{unique}", 0)
    try:
        publish(vhost, unique, 1)
        turn_until(worker, lambda: worker.reporter.statuses(1)[-1:] == ["Done"] and not worker.slots, timeout=20)
        assert worker.broker.unsure_purges == {in_progress}
        worker.request_stop()
        assert not worker._done()
        turn_until(worker, worker._done, timeout=20)
        assert not worker.broker.unsure_purges
    finally:
        let_go(worker)
    assert lost_purges == [in_progress]
    assert vhost.depth(in_progress) == 0
    assert ran(tmp_path) == [1]


def test_a_refused_publish_sends_the_unsure_purge_again_first_on_the_new_channel(
        tmp_path, unique, prefetch, forks, channels):  # noqa: F811
    """A job's copy is purged without waiting, and the slot's next copy is refused (basic.nack),
    though the broker took it: the publish goes again on a new channel (README: Clusters), and the
    purge, still unsure, goes first on that channel, without waiting, so that it still comes before
    the copy published after it. The slot's queue then holds that copy once, and the purge is known
    done by the new channel's confirm."""
    vhost, queue_type = prefetch
    worker = make_worker(tmp_path, unique, vhost, queue_type, forks)
    broker = worker.broker
    in_progress = queues.in_progress_name(f"w{unique}", 0)
    try:
        broker.publish(Outgoing(request_body(1)), in_progress)  # the copy of a job that then ends
        broker.purge_nowait(in_progress)
        assert broker.unsure_purges == {in_progress}

        refusing = broker._publisher.channel
        publish_ = refusing.basic_publish

        def taken_then_refused(*args, **kwargs):
            publish_(*args, **kwargs)
            raise amqp.exceptions.MessageNacked()

        refusing.basic_publish = taken_then_refused
        broker.publish(Outgoing(request_body(2)), in_progress)  # the slot's next copy
        assert broker._publisher.channel is not refusing
        assert not broker.unsure_purges
        assert copies(vhost, in_progress) == [2]
        on_the_new_channel = [event[::2] for event in channels if event[1] is broker._publisher.channel]
        assert on_the_new_channel == [("purge", True), ("copy",)]
    finally:
        let_go(worker)


def test_the_copys_confirm_read_while_the_worker_does_something_else_is_not_missed(
        tmp_path, unique, prefetch, forks):  # noqa: F811
    """While the broker confirms a job's copy the worker offers the job to its process and, on its
    last free slot, cancels its consumers (with a prefetch per consumer, waiting for each
    ``cancel_ok``). The copy is on the broker before that starts, and a confirm that comes during
    it, read by another wait, still ends the publish: it is neither missed nor taken for the next
    publish's."""
    vhost, queue_type = prefetch
    worker = make_worker(tmp_path, unique, vhost, queue_type, forks)
    broker = worker.broker
    in_progress = queues.in_progress_name(f"w{unique}", 0)
    seen = []

    def meanwhile():
        deadline = time.monotonic() + 5
        while vhost.depth(in_progress) != len(seen) + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)  # the confirm is on its way back, or here
        seen.append(broker.queue_info(in_progress))  # a wait of its own, which reads the confirm

    def publishes():
        broker.publish(Outgoing(request_body(1)), in_progress, meanwhile=meanwhile)
        broker.publish(Outgoing(request_body(2)), in_progress, meanwhile=meanwhile)
        broker.publish(Outgoing(request_body(3)), in_progress)

    publishing = threading.Thread(target=publishes, daemon=True)  # a missed confirm would wait forever
    publishing.start()
    publishing.join(30)
    assert not publishing.is_alive(), "a publish still waits for a confirm that was read meanwhile"
    let_go(worker)
    assert seen == [(1, 0), (2, 0)]
    assert copies(vhost, in_progress) == [1, 2, 3]
