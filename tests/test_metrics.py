"""``/healthz`` and ``/metrics``: what a monitoring system sees of a worker (the README's
"Looking at the worker").

With ``[rbit] http = HOST:PORT`` the worker serves ``/healthz`` (200 with a
JSON summary while connected and serving, 503 otherwise) and ``/metrics`` in
Prometheus's text format. The end-to-end test runs a real worker on the real
broker; the unit tests need no broker.
"""

import json
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from rbit.config import AmqpSettings, Config, WorkerSettings
from rbit.metrics import HealthServer, Metrics
from rbit.broker import Broker
from rbit.worker import Worker

from .broker import rabbitmqctl
from .harness import WorkerProcess, free_port, wait_until, write_config
from .test_tools import request_body


def http_get(url):
    """(status code, content type, body bytes) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def close_connections(vhost):
    """Have the broker close every connection to the test vhost (only the worker's is open)."""
    listing = rabbitmqctl("list_connections", "--no-table-headers", "vhost", "pid").stdout
    pids = [line.split("\t")[1] for line in listing.splitlines()
            if line.split("\t")[0] == vhost.name]
    for pid in pids:
        rabbitmqctl("close_connection", pid, "rbit test: dropping the worker's connection", check=False)
    return len(pids)


def samples(text):
    """{(sample name, sorted labels): value} of a Prometheus exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def families(text):
    return {family.name: family.type for family in text_string_to_metric_families(text)}


# -- A real worker ------------------------------------------------------------------------------


def test_healthz_and_metrics_of_a_serving_worker(tmp_path, vhost, unique, pybit_web):
    """While serving, ``/healthz`` is 200 ``{"healthy": true, "broker": "connected",
    "queues": [...]}``; after a Done job, a Failed job and a bad body, ``/metrics`` counts
    ``rbit_jobs_total{queue,status}``, the duration histogram, ``rbit_rejected_messages_total``,
    and has ``rbit_status_backlog`` and ``rbit_reconnects_total``; ``/`` is the live page and other
    paths are 404."""
    dist = f"m{unique}"
    queue, key = f"{dist}_any_latex_pdf", f"{dist}.any.latex.pdf"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = write_config(
        tmp_path / "rbit.ini", name=f"metrics-{unique}", vhost=vhost,
        rbit={"http": f"127.0.0.1:{port}"},
        pybit={"url": pybit_web.url, "user": "admin", "password": "secret"},
        # The package name decides the outcome: "fail" fails, anything else is Done.
        runners={queue: {"runner": "shell!/bin/sh -c 'test \"$0\" != fail' %PACKAGE"}},
    )
    pybit_web.add_job(9101)
    pybit_web.add_job(9102)
    with WorkerProcess(config) as worker:
        worker.wait_ready()
        code, content_type, body = http_get(f"{base}/healthz")
        assert code == 200, body
        assert content_type.startswith("application/json")
        health = json.loads(body)
        assert health["healthy"] is True
        assert health["broker"] == "connected"
        assert health["queues"] == [queue]

        vhost.publish_build(request_body(9101, dist, package="good"), key)
        worker.wait_log(r"job 9101: .* ended Done")
        vhost.publish_build(request_body(9102, dist, package="fail"), key)
        worker.wait_log(r"job 9102: .* ended Failed")
        vhost.publish_build("{not json", key)
        assert vhost.wait_depth(f"rbit.rejected.metrics-{unique}", 1)
        assert pybit_web.wait_for((9102, "Failed"))

        rejected = ("rbit_rejected_messages_total", (("queue", queue),))
        # The counter moves just after the rejected copy is confirmed: give it a moment.
        wait_until(lambda: rejected in samples(http_get(f"{base}/metrics")[2].decode()), 10)
        code, content_type, body = http_get(f"{base}/metrics")
        assert code == 200
        assert content_type.startswith("text/plain")
        text = body.decode()
        values = samples(text)
        kinds = families(text)
        assert values[("rbit_jobs_total", (("queue", queue), ("status", "Done")))] == 1
        assert values[("rbit_jobs_total", (("queue", queue), ("status", "Failed")))] == 1
        assert kinds["rbit_job_duration_seconds"] == "histogram"
        assert values[("rbit_job_duration_seconds_count", (("queue", queue),))] == 2
        assert values[("rbit_job_duration_seconds_bucket", (("le", "+Inf"), ("queue", queue)))] == 2
        assert values[("rbit_rejected_messages_total", (("queue", queue),))] == 1
        assert ("rbit_status_backlog", ()) in values
        assert values[("rbit_reconnects_total", ())] == 0
        assert values[("rbit_jobs_running", ())] == 0

        code, _, _ = http_get(f"{base}/nothing-here")
        assert code == 404
        code, content_type, _ = http_get(f"{base}/")
        assert (code, content_type) == (200, "text/html; charset=utf-8")  # the live page

        # The broker drops the worker's connection: it reconnects and counts it.
        assert close_connections(vhost) >= 1
        worker.wait_log(r"lost the broker connection")
        worker.wait_ready(count=2)
        values = samples(http_get(f"{base}/metrics")[2].decode())
        assert values[("rbit_reconnects_total", ())] == 1
        code, _, body = http_get(f"{base}/healthz")
        assert code == 200 and json.loads(body)["broker"] == "connected"


# -- Without a broker ---------------------------------------------------------------------------


def test_metrics_count_without_a_broker():
    """``Metrics`` counts in a registry of its own; two instances never clash."""
    first, second = Metrics(), Metrics()
    first.job_ended("q1", "Done", 2.5)
    first.job_ended("q1", "Done", 400)
    first.job_ended("q2", "Failed", 0.1)
    first.rejected.labels(queue="q1").inc()
    first.reconnects.inc()
    first.backlog.set(3)
    values = samples(first.exposition().decode())
    assert values[("rbit_jobs_total", (("queue", "q1"), ("status", "Done")))] == 2
    assert values[("rbit_jobs_total", (("queue", "q2"), ("status", "Failed")))] == 1
    assert values[("rbit_job_duration_seconds_count", (("queue", "q1"),))] == 2
    assert values[("rbit_job_duration_seconds_sum", (("queue", "q1"),))] == 402.5
    assert values[("rbit_job_duration_seconds_bucket", (("le", "5.0"), ("queue", "q1")))] == 1
    assert values[("rbit_job_duration_seconds_bucket", (("le", "900.0"), ("queue", "q1")))] == 2
    assert values[("rbit_rejected_messages_total", (("queue", "q1"),))] == 1
    assert values[("rbit_reconnects_total", ())] == 1
    assert values[("rbit_status_backlog", ())] == 3
    untouched = samples(second.exposition().decode())
    assert not any(name == "rbit_jobs_total" for name, _ in untouched)
    assert untouched[("rbit_reconnects_total", ())] == 0


def test_health_server_answers_503_when_unhealthy():
    """``/healthz`` is 503 (with the JSON summary) when the worker is not serving."""
    state = {"healthy": False, "broker": "disconnected", "queues": ["a_b_c_d"]}
    server = HealthServer(("127.0.0.1", 0), Metrics(), lambda: state)
    server.start()
    try:
        host, port = server.server.server_address[:2]
        code, _, body = http_get(f"http://{host}:{port}/healthz")
        assert code == 503
        assert json.loads(body) == state
        state["healthy"], state["broker"] = True, "connected"
        code, _, body = http_get(f"http://{host}:{port}/healthz")
        assert code == 200 and json.loads(body)["broker"] == "connected"
        code, _, _ = http_get(f"http://{host}:{port}/metrics")
        assert code == 200
    finally:
        server.stop()


def test_worker_health_before_connecting_is_unhealthy(tmp_path):
    """A Worker built without a broker reports itself not healthy, disconnected."""
    config_path = write_config(tmp_path / "rbit.ini", name="health-unit", vhost=None,
                               rbit={"http": "127.0.0.1:0"},
                               runners={"a_any_latex_pdf": {"runner": "python!rbitext.hello:hello"}})
    from rbit.config import load

    config = load(config_path)
    assert isinstance(config, Config) and isinstance(config.worker, WorkerSettings)
    assert isinstance(config.amqp, AmqpSettings)
    worker = Worker(config, Broker(config.amqp))
    health = worker.health()
    assert health["healthy"] is False
    assert health["broker"] == "disconnected"
    assert health["queues"] == ["a_any_latex_pdf"]


def test_healthz_is_503_while_stopping(tmp_path, vhost, unique):
    """``/healthz`` answers 200 "while the worker is connected and serving (503 otherwise)": during
    a SIGTERM's grace period the worker takes no new job, so ``/healthz`` says 503, stopping;
    ``rbit_jobs_running`` counts the job still running."""
    dist = f"h{unique}"
    queue, key = f"{dist}_any_latex_pdf", f"{dist}.any.latex.pdf"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = write_config(tmp_path / "rbit.ini", name=f"health-{unique}", vhost=vhost,
                          rbit={"http": f"127.0.0.1:{port}", "shutdown_grace": "3"},
                          runners={queue: {"runner": "shell!/bin/sleep 30"}})
    with WorkerProcess(config) as worker:
        worker.wait_ready()
        vhost.publish_build(request_body(9201, dist), key)
        worker.wait_log(r"job 9201: starting")
        values = samples(http_get(f"{base}/metrics")[2].decode())
        assert values[("rbit_jobs_running", ())] == 1
        assert http_get(f"{base}/healthz")[0] == 200
        worker.signal()
        worker.wait_log(r"stopping: no new jobs")
        code, _, body = http_get(f"{base}/healthz")
        assert code == 503, body
        health = json.loads(body)
        assert health["healthy"] is False and health["stopping"] is True
        assert worker.wait(30) == 0
    # The job was stopped by the shutdown and its message put back.
    assert vhost.depth(queue) == 1
