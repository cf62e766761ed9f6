"""``[amqp] queue_type = quorum`` on one broker: everything that works
with classic queues still works with quorum ones.

The real ``python -m rbit`` runs on vhosts of the shared broker made for each test, some
of them created with default queue type quorum, which makes PyBit's own declaration of
a build queue (no arguments) a quorum queue. The cluster itself, and losing its nodes,
is tests/test_cluster.py's business.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import amqp
import pytest

from rbit import queues, statuses
from rbit.broker import Broker, Outgoing, publisher
from rbit.config import Address, AmqpSettings
from rbit.errors import ConnectionLost

from .broker import AMQP_HOST, AMQP_PORT, Vhost, rabbitmqctl, require_broker
from .harness import ROOT, wait_until
from .test_reliability import Rig


def make_vhost(default_queue_type=None):
    """A vhost of the shared broker for one test; *default_queue_type* as ``add_vhost`` takes it."""
    require_broker()
    name = f"rbit-q-{uuid.uuid4().hex[:8]}"
    args = ["add_vhost", name] + (["--default-queue-type", default_queue_type] if default_queue_type else [])
    rabbitmqctl(*args)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return Vhost(name)


@pytest.fixture(params=["quorum-vhost", "classic-vhost"])
def qrig(request, tmp_path, unique, pybit_web):
    """A Rig with ``queue_type = quorum`` on a vhost of its own: one whose default queue type is
    quorum (PyBit's build queues become quorum queues), and one whose default is classic."""
    yield from _rig_on_own_vhost(tmp_path, unique, pybit_web, "quorum" if request.param == "quorum-vhost" else None)


@pytest.fixture
def quorum_rig(tmp_path, unique, pybit_web):
    """A Rig with ``queue_type = quorum`` on a vhost whose default queue type is quorum."""
    yield from _rig_on_own_vhost(tmp_path, unique, pybit_web, "quorum")


def _rig_on_own_vhost(tmp_path, unique, pybit_web, default_queue_type):
    vhost = make_vhost(default_queue_type)
    made = Rig(tmp_path, unique, vhost, pybit_web, amqp={"queue_type": "quorum"})
    try:
        yield made
    finally:
        made.cleanup()
        rabbitmqctl("delete_vhost", vhost.name, check=False)


def list_queues(vhost):
    out = rabbitmqctl("list_queues", "-p", vhost.name, "--formatter", "json", "name", "type", "exclusive",
                      "messages_unacknowledged").stdout
    return {row["name"]: row for row in json.loads(out or "[]")}


def rbit(*args, timeout=60):
    """``python -m rbit ARGS`` (with the tests' runners importable); the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "rbit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT),
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])})


def test_pybits_build_queue_in_a_quorum_vhost_and_rbits_quorum_queues_coexist(quorum_rig):
    """README "Clusters", build queues: in a vhost created with default queue type quorum, PyBit's
    unchanged declaration (no arguments) makes the build queue a quorum queue; a worker with
    queue_type = quorum declares it the same way without PRECONDITION_FAILED, serves it, and
    its own in-progress, delay and rejected queues are quorum queues while its cancel queue
    (exclusive) is classic; PyBit declaring again afterwards, and ``rbit publish``, still work."""
    rig = quorum_rig
    queue = rig.queue()
    rig.vhost.declare_build_queue(queue, rig.routing_key(queue))
    config = rig.config({queue: ("ok", {})})
    worker = rig.start(config)
    rig.publish(1, queue)  # PyBit declares the queue again, then publishes
    rig.ended(worker, 1, "Done")
    rig.wait_status(1, statuses.DONE)
    types = {name: (row["type"], row["exclusive"]) for name, row in list_queues(rig.vhost).items()}
    delay = queues.delay_queue(queue, 2).name
    assert types[queue][0] == "quorum", types
    for name in (rig.in_progress(), delay, f"rbit.rejected.{rig.name}"):
        assert types[name][0] == "quorum", (name, types)
    assert types[rig.name] == ("classic", True), types
    published = rbit("publish", config, "--job-id", rig.job(2), "--queue", queue)
    assert published.returncode == 0, published
    # Not a job of this PyBit: dropped ("not run"); what counts is that the worker took it.
    assert wait_until(lambda: re.search(rf"job {rig.job(2)}: .* (ended|not run)", worker.log), 20), worker.log


def test_a_job_is_held_by_its_quorum_in_progress_copy_and_shown_by_rbit_status(qrig):
    """README "How it works" 4, with quorum queues: while a job runs, its message is acknowledged
    on the build queue (neither ready nor unacknowledged) and its copy waits in the quorum
    in-progress queue, where ``rbit status`` shows the job; when the job ends the copy is gone."""
    rig = qrig
    queue = rig.queue()
    config = rig.config({queue: ("slow", {"seconds": "5"})})
    worker = rig.start(config)
    rig.publish(1, queue)
    rig.wait_runs(1, n=1)
    assert wait_until(lambda: rig.vhost.depth(rig.in_progress()) == 1, 5)
    assert rig.vhost.depth(queue) == 0
    assert list_queues(rig.vhost)[queue]["messages_unacknowledged"] == 0
    status = rbit("status", config)
    assert status.returncode == 0, status
    assert f"job {rig.job(1)}: pkg{rig.job(1)} 1.0" in status.stdout, status.stdout
    assert "quorum queues" in status.stdout
    rig.ended(worker, 1, "Done", timeout=20)
    assert wait_until(lambda: rig.vhost.depth(rig.in_progress()) == 0, 10)
    assert rig.statuses(1) == [statuses.BUILDING, statuses.DONE]
    assert rig.vhost.depth(rig.in_progress()) == 0 and rig.vhost.depth(queue) == 0


def test_a_blocked_job_waits_in_the_quorum_delay_queue_and_comes_back(qrig):
    """Blocked jobs, README "Clusters": a Blocked job's message waits blocked_delay seconds in the quorum
    delay queue (TTL and at-least-once dead-lettering back to its build queue), then runs again."""
    rig = qrig
    queue = rig.queue()
    worker = rig.start(rig.config({queue: ("blocked_once", {})}, rbit={"blocked_delay": "3"}))
    rig.publish(1, queue)
    rig.wait_status(1, statuses.BLOCKED, timeout=20)
    delay = queues.delay_queue(queue, 3).name
    assert wait_until(lambda: rig.vhost.depth(delay) == 1, 5)
    blocked_at = time.time()
    runs = rig.wait_runs(2, n=1, timeout=30)
    assert runs[1][3] - blocked_at >= 2.0, runs
    rig.ended(worker, 1, "Done", timeout=20)
    rig.wait_status(1, statuses.DONE)
    assert rig.statuses(1) == [statuses.BUILDING, statuses.BLOCKED, statuses.BUILDING, statuses.DONE]
    assert rig.vhost.depth(delay) == 0 and rig.vhost.depth(queue) == 0


def test_a_bad_message_goes_to_the_quorum_rejected_queue_and_rbit_rejected_lists_it(quorum_rig):
    """Bad input goes to the rejected queue, ``rbit rejected``, with quorum queues: a body that is not a build request is moved,
    unchanged, to the quorum rejected queue; ``rbit rejected`` lists it as often as asked (each
    listing hands it back), and ``--requeue-all`` puts it back on its build queue."""
    rig = quorum_rig
    queue = rig.queue()
    config = rig.config({queue: ("ok", {})})
    worker = rig.start(config)
    rig.vhost.declare_build_queue(queue, rig.routing_key(queue))
    rig.vhost.publish_build("not json at all", rig.routing_key(queue))
    worker.wait_log(rf"rejected a message from {queue}", timeout=20)
    rejected = f"rbit.rejected.{rig.name}"
    assert wait_until(lambda: rig.vhost.depth(rejected) == 1, 10)
    for _ in range(3):
        listing = rbit("rejected", config, "--bodies")
        assert listing.returncode == 0, listing
        assert f"from {queue}:" in listing.stdout and "not json at all" in listing.stdout, listing.stdout
    assert rig.vhost.depth(rejected) == 1
    worker.signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    back = rbit("rejected", config, "--requeue-all")
    assert back.returncode == 0 and f"put back on {queue}" in back.stdout, back
    assert rig.vhost.depth(rejected) == 0 and rig.vhost.depth(queue) == 1


def test_a_worker_killed_mid_job_gets_its_job_back_from_the_quorum_in_progress_queue(qrig):
    """No job is lost, with quorum queues: a worker SIGKILLed mid-job leaves the copy in its
    quorum in-progress queue; started again, it puts the job back and runs it to an end."""
    rig = qrig
    queue, config, worker, job_pid, child = rig.start_slow_job()
    worker.process.kill()
    worker.process.wait(10)
    assert rig.vhost.depth(rig.in_progress()) == 1
    config.write_text(config.read_text().replace("seconds = 60", "seconds = 1"))
    again = rig.start(config)
    rig.ended(again, 1, "Done", timeout=30)
    runs = rig.runs(n=1)
    assert [entry[4] for entry in runs] == ["redelivered=False", "redelivered=True"], runs
    assert wait_until(lambda: rig.vhost.depth(rig.in_progress()) == 0 and rig.vhost.depth(queue) == 0, 10)


def test_quorum_build_queues_a_worker_holds_no_message_it_does_not_run(quorum_rig):
    """A worker never holds more messages than it is running, with quorum build queues,
    which refuse a prefetch shared by all consumers: a worker (one slot) serving two queues,
    both with jobs waiting, runs one job while every other message stays ready on its queue
    (those that came beside it were handed back at once); a second, idle worker gets the next
    job at once; and every job runs once."""
    rig = quorum_rig
    q1, q2 = rig.queue("a"), rig.queue("b")
    runners = {q1: ("slow", {"seconds": "5"}), q2: ("slow", {"seconds": "5"})}
    for n in (1, 2):
        rig.publish(n, q1)
    for n in (3, 4):
        rig.publish(n, q2)
    first = rig.start(rig.config(runners, name=f"{rig.name}-a"))
    rig.wait_runs(1, timeout=10)
    time.sleep(1.0)
    assert len(rig.runs()) == 1, rig.runs()
    # A queue.declare's message count is the messages ready (not those delivered and unsettled).
    assert rig.vhost.depth(q1) + rig.vhost.depth(q2) == 3, (rig.vhost.depth(q1), rig.vhost.depth(q2))
    second = rig.start(rig.config(runners, name=f"{rig.name}-b"))
    ready_at = time.time()
    runs = rig.wait_runs(2, timeout=10)
    assert runs[1][3] - ready_at < 3.0, runs
    assert re.search(r"job \d+: starting", second.log)
    for n in (1, 2, 3, 4):
        rig.wait_status(n, statuses.DONE, timeout=60)
    assert sorted(entry[1] for entry in rig.runs()) == [rig.job(n) for n in (1, 2, 3, 4)]
    assert "lost the broker connection" not in first.log + second.log


def test_classic_queue_type_on_quorum_build_queues_takes_a_per_consumer_prefetch(tmp_path, unique, pybit_web):
    """README "Clusters", prefetch: with queue_type = classic on a vhost whose build queues are
    quorum queues, the broker refuses the shared prefetch; the worker says so in one warning,
    connects again with a prefetch per consumer, and serves."""
    vhost = make_vhost("quorum")
    rig = Rig(tmp_path, unique, vhost, pybit_web)
    try:
        queue = rig.queue()
        rig.vhost.declare_build_queue(queue, rig.routing_key(queue))
        worker = rig.start(rig.config({queue: ("ok", {})}), ready=False)
        worker.wait_log(r"refuses a prefetch shared by all consumers", timeout=20)
        worker.wait_ready(timeout=30)
        rig.publish(1, queue)
        rig.ended(worker, 1, "Done", timeout=20)
    finally:
        rig.cleanup()
        rabbitmqctl("delete_vhost", vhost.name, check=False)


def test_switching_queue_type_over_existing_queues_is_refused_with_the_fix(tmp_path, unique, vhost, pybit_web):
    """README "Changing queue_type": a worker with queue_type = quorum that finds its queues
    left as classic ones by an earlier run stops (status 1) with a line naming the queue and
    what to do, and no traceback."""
    rig = Rig(tmp_path, unique, vhost, pybit_web)
    try:
        queue = rig.queue()
        worker = rig.start(rig.config({queue: ("ok", {})}))
        worker.signal(signal.SIGTERM)
        assert worker.wait(20) == 0
        switched = rig.start(rig.config({queue: ("ok", {})}, amqp={"queue_type": "quorum"}), ready=False)
        assert switched.wait(30) == 1, switched.log[-3000:]
        assert "Traceback" not in switched.log
        assert re.search(r"inequivalent arg '[^']+' for queue 'rbit\.delay\.[^']+'.*"
                         r"another \[amqp\] queue_type.*Changing queue_type", switched.log), switched.log[-3000:]
    finally:
        rig.cleanup()


# -- a refused publisher confirm (basic.nack) -------------------------------------------


def full_queue(vhost, name):
    """A queue of one message at most that refuses (nacks) any publish beyond it; it holds one."""
    with vhost.connection() as conn:
        channel = conn.channel()
        channel.queue_declare(name, durable=True, auto_delete=False,
                              arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
        channel.basic_publish(amqp.Message("first", delivery_mode=2), routing_key=name)


def connected_broker(vhost):
    broker = Broker(AmqpSettings(hosts=(AMQP_HOST,), port=AMQP_PORT, addresses=(Address(AMQP_HOST, AMQP_PORT),),
                                 virtual_host=vhost.name))
    broker.connect_once()
    return broker


def test_a_refused_publish_is_tried_again_on_a_fresh_channel(vhost, unique, caplog):
    """Refused confirms: a publish the broker refuses (basic.nack, here a full queue
    that rejects publishes) is never taken as done: it is published again on a fresh channel
    until the broker takes it (here once the queue has room again)."""
    name = f"full-{unique}"
    full_queue(vhost, name)
    broker = connected_broker(vhost)
    try:
        emptied = threading.Timer(0.8, lambda: vhost.get(name))
        emptied.start()
        broker.publish(Outgoing("second"), name)
        emptied.join()
    finally:
        broker.close()
    assert "refused a message" in caplog.text
    assert vhost.depth(name) == 1
    assert vhost.get(name).body in ("second", b"second")


def test_a_publish_refused_every_time_fails_as_a_lost_connection(vhost, unique, monkeypatch):
    """Refused confirms: a publish the broker keeps refusing ends, after a bounded
    number of tries, in ConnectionLost (the worker then connects again and does the step again),
    never in success; nothing was added to the queue."""
    monkeypatch.setattr(publisher, "PUBLISH_RETRY_WAITS", (0.0, 0.1, 0.1))
    name = f"full-{unique}"
    full_queue(vhost, name)
    broker = connected_broker(vhost)
    try:
        with pytest.raises(ConnectionLost, match="refused 4 times"):
            broker.publish(Outgoing("second"), name)
    finally:
        broker.close()
    assert vhost.depth(name) == 1


# -- the worker taking messages one at a time (no broker) -----------------------------------


class ReentrantBroker:
    """A broker that delivers a second message while the worker publishes the first one's
    in-progress copy, as py-amqp dispatches whatever arrives while it waits for a confirm."""

    connected = True

    def __init__(self):
        self.published = []
        self.consumers = {}
        self.during_publish = None

    def publish(self, message, routing_key, exchange="", mandatory=False, meanwhile=None):
        self.published.append(routing_key)
        if meanwhile is not None:
            meanwhile()
        during, self.during_publish = self.during_publish, None
        if during is not None:
            during()

    def consume(self, key, specs, callback, no_ack=False):
        self.consumers[key] = callback

    def cancel(self, key, before_ack=False):
        self.consumers.pop(key, None)

    def consuming(self, key):
        return key in self.consumers


def test_a_message_delivered_while_one_is_being_taken_waits_and_is_handed_back(tmp_path):
    """A worker never holds more messages than it is running, with a prefetch per consumer:
    a message that the broker delivers while the worker is still taking another (here, while it
    waits for the confirm of the in-progress copy) is taken only after that one, finds no free
    slot, and is handed back; it never shares the slot or the in-progress queue of the first."""
    from types import SimpleNamespace

    from rbit.broker import Delivery
    from rbit.config import load
    from rbit.worker import Worker

    from .harness import write_config
    from .pybit_models import request_body

    queue = "cnx_any_latex_pdf"
    path = write_config(tmp_path / "w.ini", name="w", vhost=None,
                        runners={queue: {"runner": "python!rbitext.hello:hello"}})
    broker = ReentrantBroker()
    worker = Worker(load(path, environ={}), broker)
    worker.liveness.joined = True  # as after joining the other workers on the broker
    started, settled, offered = [], [], {}

    def offer(slot, queue, message):  # instead of a job's process
        offered[slot] = message

    def start(slot, delivery):
        message = offered.pop(slot)
        started.append((slot, message.job_id))
        worker.jobs.slots[slot] = SimpleNamespace(job_id=message.job_id)

    worker.jobs.start = start
    worker.jobs.offer = offer

    def delivery(job_id):
        return Delivery(request_body(job_id), {}, {}, False, lambda ack, job_id=job_id: settled.append((job_id, ack)))

    try:
        worker._resume_consuming()
        on_message = broker.consumers["jobs"]  # the worker cancels it before the copy: one slot
        broker.during_publish = lambda: on_message(queue, delivery(2))
        on_message(queue, delivery(1))
    finally:
        worker.wakeup.close()
    assert started == [(0, 1)]
    assert settled == [(1, True), (2, False)]
    assert broker.published == [queues.in_progress_name("w", 0)]
    assert not broker.consuming("jobs")
