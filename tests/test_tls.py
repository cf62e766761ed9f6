"""TLS to the broker, against "an eavesdropper between worker and broker": ``[amqp] ssl``,
``ca_file``, ``cert_file``, ``key_file``, ``verify``.

The real ``python -m rbit CONFIG`` talks amqps to PRIVATE RabbitMQ nodes
(tests/rabbit_node.py) that this module starts with a TLS listener of their
own, on certificates made for the occasion by tests/tls_certs.py:

- ``tls_node``: its certificate names ``localhost`` only (no IP address); it
  asks for a client certificate but does not insist (``verify_peer``,
  ``fail_if_no_peer_cert = false``);
- ``strict_node``: its certificate names ``localhost`` and ``127.0.0.1``; it
  refuses a client without a certificate signed by our CA
  (``fail_if_no_peer_cert = true``).

Both nodes keep a plain listener too, which the tests (never the workers
under test) use to publish and look at queues. The shared broker on
127.0.0.1:5672 is not touched. Without RabbitMQ or openssl the tests FAIL.
"""

import json
import re
import subprocess
import sys
import time

import pytest

from rbit import statuses

from .harness import WorkerProcess, environment, free_port, write_config
from .pybit_models import queue_name, request_body, routing_key
from .rabbit_node import RabbitNode
from .reliability_runners import events
from .tls_certs import TempCerts

#: The runner every worker here serves its queue with: returns at once, Done.
RUNNER = "python!reliability_runners:ok"

#: What a worker logs for each failed connection attempt (rbit.broker.LOG_CONNECT_FAILED).
CONNECT_FAILED = r"cannot reach the broker \((?P<error>[^\n]*)\); next attempt in"

#: Python's error for a broker certificate that does not verify.
VERIFY_FAILED = r"SSL(CertVerification)?Error: \[SSL: CERTIFICATE_VERIFY_FAILED\] certificate verify failed"


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs():
    """The CAs and certificates of tests/tls_certs.py, in a temporary directory removed after."""
    with TempCerts() as made:
        yield made


def tls_conf(port, cacert, cert, key, fail_if_no_peer_cert):
    """rabbitmq.conf lines of a TLS listener on 127.0.0.1:*port*."""
    return [
        f"listeners.ssl.default = 127.0.0.1:{port}",
        f"ssl_options.cacertfile = {cacert}",
        f"ssl_options.certfile = {cert}",
        f"ssl_options.keyfile = {key}",
        "ssl_options.verify = verify_peer",
        f"ssl_options.fail_if_no_peer_cert = {'true' if fail_if_no_peer_cert else 'false'}",
    ]


def start_tls_node(cert, key, certs, fail_if_no_peer_cert):
    tls_port = free_port()
    node = RabbitNode(extra_conf=tls_conf(tls_port, certs.ca, cert, key, fail_if_no_peer_cert))
    node.tls_port = tls_port
    try:
        node.start()
        # The node serves AMQP; check that its TLS listener is really there too.
        listeners = node.ctl("eval", "rabbit_networking:active_listeners().").stdout
        assert f"{tls_port}" in listeners and "'amqp/ssl'" in listeners, listeners
    except BaseException:
        node.stop()
        raise
    return node


@pytest.fixture(scope="module")
def tls_node(certs):
    """A private node with a TLS listener on a ``localhost``-only certificate; client certificate optional."""
    node = start_tls_node(certs.localhost_cert, certs.localhost_key, certs, fail_if_no_peer_cert=False)
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def strict_node(certs):
    """A private node whose TLS listener requires a client certificate (server cert: localhost, 127.0.0.1)."""
    node = start_tls_node(certs.server_cert, certs.server_key, certs, fail_if_no_peer_cert=True)
    try:
        yield node
    finally:
        node.stop()


class Rig:
    """One test's queue, worker name and vhost on a TLS node, and the workers it started."""

    def __init__(self, tmp_path, unique, node, web):
        self.dir = tmp_path
        self.unique = unique
        self.node = node
        self.web = web
        self.vhost = node.vhost(f"tls-{unique}")
        self.name = f"tls-{unique}"
        self.record = tmp_path / "runs.log"
        self.dist, self.arch, self.suite, self.fmt = f"tls{unique}", "any", "s", "pdf"
        self.queue = queue_name(self.dist, self.arch, self.suite, self.fmt)
        self.key = routing_key(self.dist, self.arch, self.suite, self.fmt)
        self.workers = []

    def config(self, filename="worker.ini", **amqp):
        """A configuration serving this test's queue over amqps; *amqp* are more ``[amqp]`` keys."""
        settings = {"host": "localhost", "port": str(self.node.tls_port), "ssl": "true",
                    "heartbeat": "10", **{k: str(v) for k, v in amqp.items()}}
        path = write_config(
            self.dir / filename, name=self.name, vhost=self.vhost,
            runners={self.queue: {"runner": RUNNER, "record": str(self.record)}},
            pybit={"url": self.web.url, "user": self.web.user, "password": self.web.password,
                   "timeout": "2"},
            amqp=settings,
        )
        path.chmod(0o600)  # it holds passwords
        return path

    def start(self, config):
        worker = WorkerProcess(config, log_path=self.dir / f"worker{len(self.workers)}.log")
        self.workers.append(worker)
        return worker.start()

    def stop(self, worker):
        worker.stop()
        # The broker drops the worker's exclusive queue with its connection.
        deadline = time.monotonic() + 10
        while self.vhost.queue_info(self.name) is not None and time.monotonic() < deadline:
            time.sleep(0.1)

    def publish(self, job_id):
        """Publish a build request exactly as PyBit does (through the node's plain listener)."""
        self.web.add_job(job_id)  # PyBit records the job, Waiting, before publishing it
        self.vhost.declare_build_queue(self.queue, self.key)
        self.vhost.publish_build(request_body(job_id, dist=self.dist, arch=self.arch, suite=self.suite,
                                              fmt=self.fmt, web_host=self.web.web_host), self.key)

    def connections(self):
        """This test's vhost's client connections on the node, from rabbitmqctl."""
        out = self.node.ctl("list_connections", "vhost", "port", "ssl", "ssl_protocol",
                            "peer_cert_subject", "peer_cert_issuer", "--formatter", "json").stdout
        return [row for row in json.loads(out or "[]") if row["vhost"] == self.vhost.name]

    def cleanup(self):
        for worker in self.workers:
            worker.stop()
        self.node.ctl("delete_vhost", self.vhost.name, check=False)


@pytest.fixture
def tls_rig(tmp_path, unique, tls_node, pybit_web):
    """A Rig on ``tls_node``; its workers stopped and its vhost deleted after the test."""
    rig = Rig(tmp_path, unique, tls_node, pybit_web)
    try:
        yield rig
    finally:
        rig.cleanup()


@pytest.fixture
def strict_rig(tmp_path, unique, strict_node, pybit_web):
    """A Rig on ``strict_node``."""
    rig = Rig(tmp_path, unique, strict_node, pybit_web)
    try:
        yield rig
    finally:
        rig.cleanup()


# -- helpers -------------------------------------------------------------------


def assert_serves_over_tls(rig, worker, job_id):
    """*worker* serves rig's queue through the TLS port, runs a job to Done; its TLS connections."""
    worker.wait_ready(timeout=30)
    assert rig.vhost.wait_consumers(rig.queue, 1), worker.log[-3000:]
    tls = [row for row in rig.connections() if row["port"] == rig.node.tls_port]
    assert tls, f"no connection on the TLS port {rig.node.tls_port}: {rig.connections()}"
    assert all(row["ssl"] is True for row in tls), tls
    assert all(re.match(r"tlsv1\.[23]$", str(row["ssl_protocol"])) for row in tls), tls
    rig.publish(job_id)
    assert rig.web.wait_for((job_id, statuses.DONE), timeout=30), (
        f"job {job_id}: {rig.web.statuses(job_id)}\n{worker.log[-3000:]}")
    assert rig.web.statuses(job_id) == [statuses.WAITING, statuses.BUILDING, statuses.DONE]
    assert [entry[1] for entry in events(rig.record, "end")] == [job_id]
    assert rig.vhost.wait_depth(rig.queue, 0)
    assert worker.process.poll() is None
    return tls


def assert_cannot_connect(rig, worker, error_pattern, attempts=2):
    """*worker* keeps trying (each failure logged, matching *error_pattern*) and serves nothing."""
    worker.wait_log(CONNECT_FAILED, timeout=30, count=attempts)
    matches = list(re.finditer(CONNECT_FAILED, worker.log))
    for match in matches:
        assert re.search(error_pattern, match.group("error")), (
            f"{match.group(0)!r} does not match {error_pattern!r}\n{worker.log[-3000:]}")
    assert worker.process.poll() is None, f"the worker gave up instead of retrying:\n{worker.log[-3000:]}"
    assert not re.search(r"serving .* as |connected to the broker", worker.log), worker.log[-3000:]
    # Nothing reached AMQP: no exclusive name queue, no consumer, no connection in the vhost.
    assert rig.vhost.queue_info(rig.name) is None
    assert rig.vhost.queue_info(rig.queue) is None
    assert rig.connections() == []


def check_connections(config):
    """``python -m rbit CONFIG --check --check-connections``: the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "rbit", str(config), "--check", "--check-connections"],
        capture_output=True, text=True, timeout=60, cwd=str(config.parent),
        env=environment(),
    )


# -- tests ---------------------------------------------------------------------


def test_worker_serves_and_runs_a_job_through_tls(tls_rig, certs):
    """``[amqp] ssl = true``, ``host = localhost``, the TLS port and ``ca_file`` = our CA: the
    worker verifies the broker's certificate (on by default), serves its queue and runs a
    job published as PyBit does to Done; RabbitMQ lists the worker's connection as TLS
    (``ssl`` true, TLS 1.2 or 1.3), on the TLS port, without a client certificate."""
    worker = tls_rig.start(tls_rig.config(ca_file=certs.ca))
    tls = assert_serves_over_tls(tls_rig, worker, 7001)
    assert all(row["peer_cert_subject"] in ("", None) for row in tls), tls
    assert "cannot reach the broker" not in worker.log, worker.log[-3000:]


@pytest.mark.parametrize("ca", ["other", "none"])
def test_verification_is_on_by_default(tls_rig, certs, ca):
    """Without ``verify``, the broker's certificate must verify: with ``ca_file`` = a CA that
    did not sign it (``other``), or with no ``ca_file`` at all so that the system's CAs are
    used (``none``), the worker cannot connect: it logs each attempt with Python's
    CERTIFICATE_VERIFY_FAILED, keeps retrying, and never declares or consumes anything."""
    keys = {"ca_file": certs.other_ca} if ca == "other" else {}
    worker = tls_rig.start(tls_rig.config(**keys))
    assert_cannot_connect(tls_rig, worker, VERIFY_FAILED)


def test_verify_false_connects_despite_an_unknown_ca(tls_rig, certs):
    """``verify = false`` turns verification off: the same ``ca_file`` = the unrelated CA that
    stops a worker by default now connects (still over TLS) and runs a job to Done."""
    worker = tls_rig.start(tls_rig.config(ca_file=certs.other_ca, verify="false"))
    assert_serves_over_tls(tls_rig, worker, 7002)


def test_host_name_is_checked(tls_rig, certs):
    """With ``verify`` on, the broker's certificate must name the host connected to:
    ``host = 127.0.0.1`` against a certificate for ``localhost`` only (no IP address), signed
    by the CA of ``ca_file``, fails with an IP address mismatch; the worker never serves."""
    worker = tls_rig.start(tls_rig.config(host="127.0.0.1", ca_file=certs.ca))
    assert_cannot_connect(tls_rig, worker, VERIFY_FAILED + r".*(mismatch|not valid for '127\.0\.0\.1')")


def test_host_name_mismatch_is_accepted_with_verify_false(tls_rig, certs):
    """``verify = false`` also stops the host name check: ``host = 127.0.0.1`` against the
    ``localhost``-only certificate connects and runs a job."""
    worker = tls_rig.start(tls_rig.config(host="127.0.0.1", ca_file=certs.ca, verify="false"))
    assert_serves_over_tls(tls_rig, worker, 7003)


def test_several_hosts_still_verify_the_certificate_chain(tls_rig, certs):
    """With several ``host`` entries only the certificate chain is verified (README, ``verify``):
    ``host = 127.0.0.1, 127.0.0.1`` against the ``localhost``-only certificate connects with
    ``ca_file`` = our CA and runs a job, but ``ca_file`` = the unrelated CA is still refused."""
    refused = tls_rig.start(tls_rig.config("other.ini", host="127.0.0.1, 127.0.0.1", ca_file=certs.other_ca))
    assert_cannot_connect(tls_rig, refused, VERIFY_FAILED)
    tls_rig.stop(refused)
    worker = tls_rig.start(tls_rig.config(host="127.0.0.1, 127.0.0.1", ca_file=certs.ca))
    assert_serves_over_tls(tls_rig, worker, 7005)


def test_client_certificate_is_presented(strict_rig, certs):
    """``cert_file`` and ``key_file``: a broker that requires a client certificate
    (``fail_if_no_peer_cert = true``) accepts the worker, and RabbitMQ sees our client
    certificate's subject and issuer; ``host = 127.0.0.1`` verifies against a certificate
    that names that address. The worker runs a job to Done."""
    worker = strict_rig.start(strict_rig.config(host="127.0.0.1", ca_file=certs.ca,
                                                cert_file=certs.client_cert, key_file=certs.client_key))
    tls = assert_serves_over_tls(strict_rig, worker, 7004)
    assert all(f"CN={certs.client_cn}" in row["peer_cert_subject"] for row in tls), tls
    assert all("CN=rbit test CA" in row["peer_cert_issuer"] for row in tls), tls


def test_broker_refuses_a_worker_without_client_certificate(strict_rig, certs):
    """Without ``cert_file``/``key_file`` a broker that requires a client certificate refuses the
    TLS handshake: the worker logs each failed attempt, keeps retrying and serves nothing."""
    worker = strict_rig.start(strict_rig.config(host="127.0.0.1", ca_file=certs.ca))
    # TLS 1.3 ends the handshake before the server's alert is read: the client sees the
    # alert, or an EOF, or a reset, depending on timing.
    assert_cannot_connect(strict_rig, worker, r"SSL\w*Error|[Cc]ertificate|EOF|[Rr]eset|[Cc]losed")
    assert "certificate_required" in strict_rig.node.log_tail(20_000), strict_rig.node.log_tail()


def test_check_connections_reports_the_tls_broker(tls_rig, certs):
    """``rbit CONFIG --check --check-connections`` connects through TLS and reports the broker
    connected (exit 0); with ``ca_file`` = the unrelated CA it reports the certificate
    verification failure and exits 1."""
    good = check_connections(tls_rig.config(ca_file=certs.ca))
    assert good.returncode == 0, good.stdout + good.stderr
    assert re.search(rf"broker \S+:{tls_rig.node.tls_port}: connected", good.stdout), good.stdout + good.stderr

    bad = check_connections(tls_rig.config("bad.ini", ca_file=certs.other_ca))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert re.search(rf"cannot reach the broker at \S+:{tls_rig.node.tls_port}: \w+: "
                     r"\[SSL: CERTIFICATE_VERIFY_FAILED\] certificate verify failed", bad.stderr), (
        bad.stdout + bad.stderr)
    assert ": connected" not in bad.stdout

