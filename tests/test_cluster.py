"""Losing a RabbitMQ node loses no job, on a real cluster.

Three private RabbitMQ nodes on this machine (tests/rabbit_cluster.py: their own
node names, ports and data directories, clustered with ``rabbitmqctl
join_cluster``) serve a vhost whose default queue type is quorum, so that
PyBit's build queues are quorum queues too (one test uses a classic vhost, to
show what still depends on one node), and every worker has ``[amqp]
queue_type = quorum`` and lists the three nodes as ``HOST:PORT``. Each test
SIGKILLs (or restarts) nodes under a real ``python -m rbit`` and checks, with the
PyBit stand-in, that every job ends exactly once. The cluster is started once for
the module and stopped after it, whatever happens; a node a test killed is
started again after that test.
"""

import re
import time

import amqp
import pytest

from rbit import queues, statuses

from .harness import wait_until
from .rabbit_cluster import IPV6, RabbitCluster
from .test_quorum import rbit
from .test_reliability import Rig


#: What a worker logs when it connects (rbit.broker), with the node's port.
CONNECTED = r"connected to the broker at (?:127\.0\.0\.1|\[::1\]):(\d+)"


@pytest.fixture(scope="module")
def cluster():
    """Three private nodes in one cluster, for this module; every node is stopped after it."""
    made = RabbitCluster()
    try:
        made.start()
        yield made
    finally:
        made.stop()


@pytest.fixture
def crig(tmp_path, unique, cluster, pybit_web):
    """A Rig on a vhost of its own whose default queue type is quorum, with ``queue_type = quorum``
    and the three nodes in ``[amqp] host``; the nodes a test killed are started again after it."""
    vhost = cluster.vhost(f"cluster-{unique}", default_queue_type="quorum")
    made = Rig(tmp_path, unique, vhost, pybit_web, amqp={**cluster.amqp_settings(), "queue_type": "quorum"})
    try:
        yield made
    finally:
        made.cleanup()
        cluster.heal()


def connected_node(cluster, worker):
    """The node the worker is connected to now (its last "connected to the broker" line)."""
    port = int(re.findall(CONNECTED, worker.log)[-1])
    return cluster.node_for(port)


def declare_on(node, vhost, spec):
    """Declare *spec* through *node*, which then leads the quorum queue (RabbitMQ puts a new
    quorum queue's leader on the node its declaring client is connected to)."""
    with amqp.Connection(f"{node.host}:{node.port}", userid="guest", password="guest",
                         virtual_host=vhost.name) as conn:
        conn.channel().queue_declare(spec.name, durable=spec.durable, auto_delete=False,
                                     arguments=dict(spec.arguments))


def others(cluster, node):
    return [other for other in cluster.nodes if other is not node]


def test_the_node_the_worker_is_connected_to_dies_mid_job(cluster, crig):
    """README "Clusters": a worker connected to a node that dies moves to another node of
    ``[amqp] host`` (listed as ``[::1]:PORT`` and ``127.0.0.1:PORT`` entries, each node with its
    own port), declares and resumes without operator help, and its running job goes on:
    SIGKILL of that node mid-job; the job ends once, its statuses (Building, Uploaded, Done) all
    arrive in order, its in-progress copy is gone afterwards, and the next job runs."""
    rig = crig
    queue = rig.queue()
    # [amqp] host = [::1]:P1, 127.0.0.1:P2, 127.0.0.1:P3: each node with its own port.
    worker = rig.start(rig.config({queue: ("progress", {"seconds": "6"})}, amqp=cluster.amqp_settings(ipv6_first=True)))
    first = f"[::1]:{cluster.nodes[0].port}" if IPV6 else f"127.0.0.1:{cluster.nodes[0].port}"
    assert f"connected to the broker at {first}" in worker.log, worker.log[-2000:]
    rig.publish(1, queue)
    rig.wait_runs(1, n=1)
    rows = cluster.queues(rig.vhost.name)
    for name in (queue, rig.in_progress()):  # PyBit's build queue too, in this quorum vhost
        assert rows[name]["type"] == "quorum" and len(rows[name]["members"]) == 3, rows[name]
    node = connected_node(cluster, worker)
    assert cluster.leader(rig.in_progress(), rig.vhost.name) is node  # it dies too
    node.kill()
    worker.wait_log(r"lost the broker connection", timeout=15)
    worker.wait_ready(count=2, timeout=60)
    assert connected_node(cluster, worker) is not node
    rig.ended(worker, 1, "Done", timeout=60)
    rig.wait_status(1, statuses.DONE, timeout=30)
    assert wait_until(lambda: rig.vhost.depth(rig.in_progress()) == 0, 20), "in-progress copy left behind"
    rig.publish(2, queue)
    rig.ended(worker, 2, "Done", timeout=30)
    time.sleep(2)
    assert len(rig.runs(n=1)) == 1, rig.runs()
    assert rig.statuses(1) == [statuses.BUILDING, statuses.UPLOADED, statuses.DONE]
    assert rig.vhost.depth(queue) == 0 and rig.vhost.depth(rig.in_progress()) == 0
    assert worker.process.poll() is None


def test_the_node_leading_the_in_progress_queue_dies_mid_job(cluster, crig):
    """README "Clusters": the in-progress queue is a quorum queue, so losing the node that leads
    it loses no copy, and a worker connected to a surviving node notices nothing: SIGKILL of the
    node leading the in-progress queue and the (quorum) build queue, mid-job; the job ends once
    with all its statuses, the copy is gone afterwards, the worker kept its connection and its
    consumer, and its next job (a copy published to the new leader, on a fresh channel if the
    old one's publishes are refused) runs to Done."""
    rig = crig
    queue = rig.queue()
    first, leader = cluster.nodes[0], cluster.nodes[1]
    declare_on(leader, rig.vhost, queues.in_progress_queue(rig.name, 0, queues.QUORUM))
    declare_on(leader, rig.vhost, queues.build_queue(queue, rig.routing_key(queue)))  # PyBit's, led there too
    worker = rig.start(rig.config({queue: ("progress", {"seconds": "6"})}))
    assert connected_node(cluster, worker) is first
    rig.publish(1, queue)
    rig.wait_runs(1, n=1)
    assert rig.vhost.depth(rig.in_progress()) == 1
    assert cluster.leader(rig.in_progress(), rig.vhost.name) is leader
    assert cluster.leader(queue, rig.vhost.name) is leader
    leader.kill()
    rig.ended(worker, 1, "Done", timeout=60)
    rig.wait_status(1, statuses.DONE, timeout=30)
    assert wait_until(lambda: rig.vhost.depth(rig.in_progress()) == 0, 20), "in-progress copy left behind"
    rig.publish(2, queue)
    rig.ended(worker, 2, "Done", timeout=60)
    time.sleep(2)
    assert len(rig.runs(n=1)) == 1 and len(rig.runs(n=2)) == 1, rig.runs()
    assert rig.statuses(1) == [statuses.BUILDING, statuses.UPLOADED, statuses.DONE]
    assert rig.statuses(2) == [statuses.BUILDING, statuses.UPLOADED, statuses.DONE]
    assert "lost the broker connection" not in worker.log, worker.log[-3000:]
    assert rig.vhost.depth(queue) == 0 and rig.vhost.depth(rig.in_progress()) == 0


def test_a_blocked_job_comes_back_after_the_delay_though_the_delay_queues_leader_died(cluster, crig):
    """README "Clusters": a Blocked job waits in a quorum delay queue that dead-letters at least
    once, so the loss of the node leading it loses nothing: the job is Blocked, its message waits
    in the delay queue, the leader is SIGKILLed, and the job comes back after blocked_delay and
    runs to Done (Building, Blocked, Building, Done), once more and no more."""
    rig = crig
    queue = rig.queue()
    delay = 5.0
    leader = cluster.nodes[1]
    spec = queues.delay_queue(queue, delay, queues.QUORUM)
    declare_on(leader, rig.vhost, spec)
    worker = rig.start(rig.config({queue: ("blocked_once", {})}, rbit={"blocked_delay": str(delay)}))
    assert connected_node(cluster, worker) is not leader
    rig.publish(1, queue)
    rig.wait_status(1, statuses.BLOCKED, timeout=30)
    assert wait_until(lambda: rig.vhost.depth(spec.name) == 1, 10), "the Blocked message is not in the delay queue"
    blocked_at = time.time()
    assert cluster.leader(spec.name, rig.vhost.name) is leader
    leader.kill()
    runs = rig.wait_runs(2, n=1, timeout=60)
    assert runs[1][3] - blocked_at >= delay - 1.5, "the job came back before its delay"
    rig.ended(worker, 1, "Done", timeout=30)
    rig.wait_status(1, statuses.DONE, timeout=30)
    time.sleep(2)
    assert len(rig.runs(n=1)) == 2, rig.runs()
    assert rig.statuses(1) == [statuses.BUILDING, statuses.BLOCKED, statuses.BUILDING, statuses.DONE]
    assert rig.vhost.depth(spec.name) == 0 and rig.vhost.depth(queue) == 0


def test_a_message_rejected_while_a_node_is_down_is_in_the_rejected_queue(cluster, crig):
    """README "Clusters", a message that is not a build request: the rejected queue is a quorum queue: with the node that led it
    SIGKILLed, a body that is not a build request still ends, unchanged and with its reason, in
    the rejected queue (not on its build queue), and ``rbit rejected`` lists it."""
    rig = crig
    queue = rig.queue()
    leader = cluster.nodes[1]
    rejected = f"rbit.rejected.{rig.name}"
    declare_on(leader, rig.vhost, queues.rejected_queue(rejected, queues.QUORUM))
    config = rig.config({queue: ("ok", {})})
    worker = rig.start(config)
    assert connected_node(cluster, worker) is not leader
    leader.kill()
    body = '{"not": "a build request"}'
    rig.vhost.declare_build_queue(queue, rig.routing_key(queue))
    rig.vhost.publish_build(body, rig.routing_key(queue))
    worker.wait_log(rf"rejected a message from {queue}", timeout=30)
    assert wait_until(lambda: rig.vhost.depth(rejected) == 1, 20), "the rejected message is not in the rejected queue"
    assert rig.vhost.depth(queue) == 0
    listing = rbit("rejected", config, "--bodies")
    assert listing.returncode == 0, listing
    assert f"from {queue}:" in listing.stdout and body in listing.stdout, listing.stdout
    message = rig.vhost.get(rejected)
    assert (message.body if isinstance(message.body, str) else message.body.decode()) == body
    assert message.properties["application_headers"][queues.HEADER_QUEUE] == queue
    assert worker.process.poll() is None


def test_the_whole_cluster_restarted_node_by_node_under_load_every_job_ends_once(cluster, crig):
    """README "Clusters": a rolling restart of every node (each stopped and started again in
    turn, as for an upgrade) while a worker with two slots works through a loaded queue: every
    job ends exactly once (Building then Done, and its runner ran once), and nothing is left in
    the build queue or the in-progress queues."""
    rig = crig
    queue = rig.queue()
    jobs = 80  # 80 s of work on two slots: more than a rolling restart takes on a slow machine
    worker = rig.start(rig.config({queue: ("slow", {"seconds": "2"})}, rbit={"concurrency": "2"}))
    for n in range(1, jobs + 1):
        rig.publish(n, queue)
    rig.wait_runs(2, timeout=30)
    for node in cluster.nodes:
        node.shutdown()
        time.sleep(1)
        node.start()
        cluster.await_nodes()
    assert len(rig.runs("end")) < jobs, "the jobs were all done before the last node restarted"
    assert wait_until(lambda: all(statuses.DONE in rig.statuses(n) for n in range(1, jobs + 1)), 180), (
        f"not every job ended: {[(n, rig.statuses(n)) for n in range(1, jobs + 1)]}\n{rig.logs()}")
    time.sleep(3)
    for n in range(1, jobs + 1):
        assert rig.statuses(n) == [statuses.BUILDING, statuses.DONE], (n, rig.statuses(n))
        assert len(rig.runs(n=n)) == 1, (n, rig.runs(n=n))
    assert rig.vhost.depth(queue) == 0
    assert rig.vhost.depth(rig.in_progress(0)) == 0 and rig.vhost.depth(rig.in_progress(1)) == 0
    assert len(re.findall(CONNECTED, worker.log)) >= 2, "the worker never had to move"
    assert worker.process.poll() is None


def test_a_classic_build_queue_waits_for_its_node_while_the_other_queues_are_served(cluster, tmp_path, unique,
                                                                                   pybit_web):
    """README "Clusters", what still depends on one node: in a vhost whose default queue type is
    classic, a build queue lives on one node. A worker (queue_type = quorum) serving such a queue
    on a node that dies says it is not serving it, goes on serving its other queue (a job there
    runs), and serves it again once its node is back (a job there runs)."""
    vhost = cluster.vhost(f"classic-{unique}")
    rig = Rig(tmp_path, unique, vhost, pybit_web, amqp={**cluster.amqp_settings(), "queue_type": "quorum"})
    try:
        lost, kept = rig.queue("a"), rig.queue("b")
        node = cluster.nodes[1]
        declare_on(node, vhost, queues.build_queue(lost, rig.routing_key(lost)))  # a classic queue there
        worker = rig.start(rig.config({lost: ("ok", {}), kept: ("ok", {})}))
        assert connected_node(cluster, worker) is not node
        assert cluster.queues(vhost.name)[lost]["type"] == "classic"
        node.kill()
        worker.wait_log(rf"not serving {lost} while its node is down", timeout=30)
        worker.wait_ready(count=2, timeout=30)
        rig.publish(1, kept)
        rig.ended(worker, 1, "Done", timeout=30)
        node.start()
        cluster.await_nodes()
        worker.wait_log(rf"serving {lost} again", timeout=60)
        rig.publish(2, lost)
        rig.ended(worker, 2, "Done", timeout=30)
        assert worker.process.poll() is None
    finally:
        rig.cleanup()
        cluster.heal()
