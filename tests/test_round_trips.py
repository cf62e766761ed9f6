"""The worker's consumers on the real broker, job after job: started with one wait for all the
served queues, cancelled without a wait where the shared prefetch allows it, and leaving
nothing behind on the channel; and what a job waits for at the broker: its copy's confirm and
one consume_ok, no purge.

Each test drives a :class:`rbit.worker.Worker` in this process on a real
:class:`rbit.broker.Broker`, in a vhost of its own, so that it can look at the
py-amqp channel and count the replies the worker waits for.
"""

import pytest
from amqp import abstract_channel, spec

from rbit import config as rbit_config
from rbit import queues
from rbit.broker import Broker
from rbit.worker import JOBS, Worker

from .broker import make_vhost as make_classic_vhost
from .broker import rabbitmqctl
from .harness import write_config
from .pybit_models import queue_name, request_body, routing_key
from .test_quorum import make_vhost as make_quorum_vhost
from .test_worker_loop import RUNNERS, RecordingReporter, forks, let_go, turn_until  # noqa: F401  (a fixture)

#: Served queues, as in bench/bench.py: the case where one wait per queue cost the most.
SUITES = ("a", "b", "c", "d", "e")

#: Jobs run one after the other in each test.
JOBS_RUN = 25


@pytest.fixture(params=["shared prefetch", "prefetch per consumer"])
def prefetch(request):
    """A vhost for one test and its ``[amqp] queue_type``: classic queues take a prefetch shared
    by the channel's consumers; quorum build queues (in a vhost whose default queue type is
    quorum) take one per consumer."""
    if request.param == "shared prefetch":
        vhost, queue_type = make_classic_vhost(), "classic"
    else:
        vhost, queue_type = make_quorum_vhost("quorum"), "quorum"
    yield vhost, queue_type
    rabbitmqctl("delete_vhost", vhost.name, check=False)


#: What py-amqp waits for after a publish on a channel in confirm mode: the broker's confirm.
CONFIRM = (spec.Basic.Ack, spec.Basic.Nack)


class Waits:
    """Counts the replies py-amqp waits for, by method, in this process: on *worker*'s connection
    only, if given (the test's own publishes wait too)."""

    def __init__(self, monkeypatch, worker=None):
        self.counts = {}
        self.paused = False
        wait = abstract_channel.AbstractChannel.wait

        def counted(channel, method, *args, **kwargs):
            if not self.paused and (worker is None or channel.connection is _amqp_connection(worker)):
                key = tuple(method) if isinstance(method, (list, tuple)) else method
                self.counts[key] = self.counts.get(key, 0) + 1
            return wait(channel, method, *args, **kwargs)

        monkeypatch.setattr(abstract_channel.AbstractChannel, "wait", counted)

    def of(self, method) -> int:
        return self.counts.get(tuple(method), 0)

    def leave_out(self, owner, name, monkeypatch):
        """Count none of the waits of ``owner.name`` (a method of one object)."""
        call = getattr(owner, name)

        def uncounted(*args, **kwargs):
            self.paused = True
            try:
                return call(*args, **kwargs)
            finally:
                self.paused = False

        monkeypatch.setattr(owner, name, uncounted)


def _amqp_connection(worker):
    """The py-amqp connection of *worker*'s broker, None while it has none."""
    return getattr(worker.broker._connection, "connection", None)


def make_worker(tmp_path, unique, vhost, queue_type, forks, runner_keys=None,  # noqa: F811  (the fixture's value)
                **rbit_keys):
    record = tmp_path / "record"
    runner = {"runner": f"python!{RUNNERS}:behave", "record": record, "release": tmp_path / "release",
              **(runner_keys or {})}
    runners = {queue_name(f"t{unique}", "any", suite, "pdf"): runner for suite in SUITES}
    path = write_config(tmp_path / "w.ini", name=f"w{unique}", vhost=vhost, runners=runners,
                        rbit={"polling_time": "1", **rbit_keys}, amqp={"queue_type": queue_type})
    config = rbit_config.load(path)
    worker = Worker(config, Broker(config.amqp), reporter=RecordingReporter(), forks=forks)
    assert worker._connect()
    return worker


def publish(vhost, unique, job_id, package="done"):
    """A job (quick, unless *package* says otherwise: see tests/test_worker_loop.py's ``behave``)
    on one of the served queues, in turn, as PyBit's controller publishes it."""
    suite = SUITES[job_id % len(SUITES)]
    vhost.publish_build(request_body(job_id, package=package, dist=f"t{unique}", suite=suite),
                        routing_key(f"t{unique}", "any", suite, "pdf"))


def consumer_tags(worker):
    """The consumer tags py-amqp keeps a callback for on the worker's channel, and those rbit holds."""
    channel = worker.broker._channel
    held = {tag for group in worker.broker._consumers.values() for consumer in group
            for tag in consumer._active_tags.values()}
    return set(channel.callbacks), held


def test_job_after_job_the_channel_keeps_a_callback_only_for_each_live_consumer(
        tmp_path, unique, prefetch, forks, monkeypatch):  # noqa: F811
    """One slot, five served queues, jobs one after the other: each job cancels the five
    consumers and starts them again, and after every job the channel keeps a callback for the
    worker's live consumers only (its cancel queue's and the five of the build queues), none for
    a cancelled one. Each job waits for the confirm of its in-progress copy and for one
    consume_ok, whatever the number of queues, and for nothing else: no purge_ok (the copy is
    purged without waiting, on the channel of the next copy) and no cancel_ok with the shared
    prefetch (five, one per queue, with a prefetch per consumer: they are waited for while the
    broker confirms the copy, and its confirm may come during them). The announcements and the
    look at the peers are not a job's and are left out. Every job runs once and leaves no
    in-progress copy behind."""
    vhost, queue_type = prefetch
    worker = make_worker(tmp_path, unique, vhost, queue_type, forks)
    waits = Waits(monkeypatch, worker)
    waits.leave_out(worker.liveness, "tick", monkeypatch)
    try:
        for job_id in range(1, JOBS_RUN + 1):
            publish(vhost, unique, job_id)
            turn_until(worker, lambda job_id=job_id: worker.reporter.statuses(job_id)[-1:] == ["Done"]
                       and not worker.slots and worker.broker.consuming(JOBS), timeout=20)
            registered, held = consumer_tags(worker)
            assert registered == held and len(held) == 1 + len(SUITES), (job_id, registered, held)
        during_the_jobs = dict(waits.counts)
        unsure_at_the_end = worker.broker.unsure_purges
    finally:
        let_go(worker)
    if queue_type == "quorum":
        # The cancels' waits come while the broker confirms the copy: its confirm, read during them, is
        # then not waited for on its own.
        confirms = during_the_jobs.pop(CONFIRM, 0)
        assert confirms <= JOBS_RUN
        assert during_the_jobs == {tuple(spec.Basic.ConsumeOk): JOBS_RUN,
                                   tuple(spec.Basic.CancelOk): len(SUITES) * JOBS_RUN}
    else:
        assert during_the_jobs == {CONFIRM: JOBS_RUN, tuple(spec.Basic.ConsumeOk): JOBS_RUN}
    # The stop waits for the last job's purge, unless a later publish (an announcement) showed it done.
    assert unsure_at_the_end <= {queues.in_progress_name(f"w{unique}", 0)}
    assert waits.of(spec.Queue.PurgeOk) == len(unsure_at_the_end)
    ran = [int(line.split()[0]) for line in (tmp_path / "record").read_text().splitlines()]
    assert ran == list(range(1, JOBS_RUN + 1))
    assert vhost.depth(queues.in_progress_name(f"w{unique}", 0)) == 0
