"""A private three-node RabbitMQ cluster for the tests that lose broker nodes.

Three :class:`~tests.rabbit_node.RabbitNode` s, each with its own node name,
AMQP and distribution ports and data directory, share one Erlang cookie and
are clustered the way an operator does it: the second and third stop their
RabbitMQ application, ``rabbitmqctl join_cluster`` the first, and start it
again. The shared broker on port 5672 is never touched.

Typical use, in a module-scoped fixture::

    with RabbitCluster() as cluster:
        vhost = cluster.vhost("name", default_queue_type="quorum")
        amqp = cluster.amqp_settings()          # host = 127.0.0.1:P1, 127.0.0.1:P2, ...
        cluster.leader("rbit.inprogress.w.0", vhost).kill()

:meth:`RabbitCluster.stop` stops every node and removes their directories,
whatever happened before; a test that killed a node calls
:meth:`RabbitCluster.heal` to have all of them back.
"""

import json
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from .rabbit_node import START_TIMEOUT, NodeVhost, RabbitNode, free_port

#: Nodes in the cluster: the smallest that keeps a majority when one is lost.
SIZE = 3

def _have_ipv6():
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


#: True where this machine has IPv6 loopback: the nodes then listen on ::1 too.
IPV6 = _have_ipv6()

#: Erlang VM flags for the test nodes: schedulers that do not spin while idle, so
#: that three nodes leave the machine's two shared cores to the tests.
ERL_ARGS = "+sbwt none +sbwtdcpu none +sbwtdio none"


class RabbitCluster:
    """Three private RabbitMQ nodes joined into one cluster."""

    def __init__(self, size=SIZE):
        cookie = secrets.token_hex(16).upper()
        ports = [free_port() for _ in range(size)]
        # Each node listens on 127.0.0.1 and (where there is IPv6) on ::1, at the same port.
        self.nodes = [RabbitNode(port=port, listeners=[f"127.0.0.1:{port}"] + ([f"::1:{port}"] if IPV6 else []),
                                 cookie=cookie,
                                 extra_env={"RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": ERL_ARGS})
                      for port in ports]

    # -- running -----------------------------------------------------------------

    def start(self):
        """Boot the nodes (at once) and join the second and following to the first."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for future in [pool.submit(node.start) for node in self.nodes]:
                future.result()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.start_app()
        self.await_nodes()
        return self

    def await_nodes(self, timeout=START_TIMEOUT):
        """Wait until every node is running and sees all the others."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            node.ctl("await_online_nodes", str(len(self.nodes)),
                     "--timeout", str(max(1, int(deadline - time.monotonic()))), timeout=timeout + 10)

    def heal(self):
        """Start every node that is down (killed or shut down), and wait for the whole cluster."""
        down = [node for node in self.nodes if not node.running]
        with ThreadPoolExecutor(max(1, len(down))) as pool:
            for future in [pool.submit(node.start) for node in down]:
                future.result()
        self.await_nodes()

    def stop(self):
        """Stop every node and remove its directory, each whatever became of the others."""
        errors = []
        for node in self.nodes:
            try:
                node.stop()
            except BaseException as exc:  # go on: every node must go
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()

    # -- what tests use ------------------------------------------------------------

    def live(self):
        """The nodes that are running now."""
        return [node for node in self.nodes if node.running]

    def amqp_settings(self, ipv6_first=False):
        """``[amqp]`` overrides: ``host`` lists the nodes as ``127.0.0.1:PORT``, in order (the first
        as ``[::1]:PORT`` with *ipv6_first*, where the machine has IPv6)."""
        hosts = [f"{node.host}:{node.port}" for node in self.nodes]
        if ipv6_first and IPV6:
            hosts[0] = f"[::1]:{self.nodes[0].port}"
        return {"host": ", ".join(hosts)}

    def vhost(self, name, default_queue_type=None):
        """A vhost of the cluster (created through the first live node), reached through *that*
        node by the helpers of tests.broker.Vhost; *default_queue_type* as ``add_vhost`` takes it."""
        node = self.live()[0]
        args = ["add_vhost", name]
        if default_queue_type:
            args += ["--default-queue-type", default_queue_type]
        node.ctl(*args)
        node.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return ClusterVhost(name, self)

    def queues(self, vhost_name):
        """``{queue: row}`` for every queue of the vhost, from a live node's ``rabbitmqctl list_queues``."""
        out = self.live()[0].ctl("list_queues", "-p", vhost_name, "--formatter", "json", "name", "type",
                                 "leader", "members", "messages").stdout
        return {row["name"]: row for row in json.loads(out or "[]")}

    def leader(self, queue, vhost_name):
        """The node that leads the quorum queue *queue* now."""
        row = self.queues(vhost_name)[queue]
        for node in self.nodes:
            if node.name == row["leader"]:
                return node
        pytest.fail(f"queue {queue} is led by {row['leader']!r}, not a node of this cluster: {row}")

    def node_for(self, port):
        """The node listening on *port*."""
        return next(node for node in self.nodes if node.port == port)


class ClusterVhost(NodeVhost):
    """tests.broker.Vhost for a vhost of the cluster: each helper goes through a node that is up."""

    def __init__(self, name, cluster):
        super().__init__(name, cluster.nodes[0].host, cluster.nodes[0].port)
        self.cluster = cluster

    def url(self):
        node = self.cluster.live()[0]
        self.host, self.port = node.host, node.port
        return super().url()
