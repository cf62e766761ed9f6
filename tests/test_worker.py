"""The worker on the real broker with a fake PyBit (the README's "How it works"): its queues,
consuming, what a runner is handed, statuses, Blocked jobs, and messages that are not valid
build requests.

Each test runs the real ``python -m rbit CONFIG`` on queues and a worker name of its
own, publishes requests exactly as PyBit's controller does, and looks at the broker,
the fake PyBit web front end and what the runners below wrote down.
"""

import json
import os
import re
import signal
import time
from datetime import datetime

import pytest

import rbit
from rbit import statuses

from .broker import rabbitmqctl
from .harness import WorkerProcess, job_log, wait_until, write_config
from .pybit_models import queue_name, request_body, routing_key
from .pybit_web import FakePyBit

#: How the worker subprocess imports the runners below.
RUNNERS = "tests.test_worker"

#: Longest a runner waits for its release file (a stuck test must not hang the suite).
RELEASE_TIMEOUT = 30.0


# -- runners, run by the worker in its job processes ---------------------------


def record_runner(message, set_status, settings):
    """Append what the runner was handed to the file named by ``settings['record']``."""
    request = message.request
    accessors = {name: getattr(request, name)() for name in (
        "get_job_id", "get_package", "get_version", "get_arch", "get_dist",
        "get_suite", "get_format", "get_buildenv", "get_buildstamp")}
    request.stamp_request()
    entry = {
        "job_id": request.get_job_id(),
        "body": message.body,
        "body_type": type(message.body).__name__,
        "request_class": type(request).__name__,
        "accessors": accessors,
        "stamped": request.get_buildstamp(),
        "web_host": request.web_host,
        "queue": message.queue,
        "redelivered": message.redelivered,
        "settings": settings,
        "set_status_callable": callable(set_status),
        "pid": os.getpid(),
        "time": time.time(),
    }
    with open(settings["record"], "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def imports(message, set_status, settings):
    """Write down which of the command line's modules the job's process has loaded."""
    import sys

    loaded = {name: name in sys.modules for name in ("rbit.cli", "click")}
    with open(settings["record"], "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"job_id": message.job_id, "loaded": loaded}) + "\n")


def behave(message, set_status, settings):
    """Record the call, then do what the package name's first word says."""
    record_runner(message, set_status, settings)
    package = message.request.get_package()
    action = package.split("-")[0]
    if action == "uploaded":
        set_status("Uploaded", "sent to the archive")
    elif action == "done":
        set_status("Done")
    elif action == "fail":
        raise rbit.Failed("the build broke on purpose")
    elif action == "crash":
        raise RuntimeError(f"kaboom {package}")
    elif action == "unknown":
        set_status("Bogus")
    elif action == "blocked":
        raise rbit.Blocked("missing build dependencies")
    elif action == "wait":
        deadline = time.monotonic() + RELEASE_TIMEOUT
        while not os.path.exists(settings["release"]) and time.monotonic() < deadline:
            time.sleep(0.05)


# -- helpers -------------------------------------------------------------------


def queue_for(unique, suite="a"):
    """(queue, routing key) of this test's own PyBit build queue."""
    dist = f"t{unique}"
    return queue_name(dist, "any", suite, "pdf"), routing_key(dist, "any", suite, "pdf")


def body_for(job_id, unique, suite="a", **fields):
    """A request for this test's queue, as PyBit's controller writes it."""
    return request_body(job_id, dist=f"t{unique}", arch="any", suite=suite, fmt="pdf", **fields)


def make_config(tmp_path, vhost, unique, *, suites=("a",), function="behave", name=None,
                pybit=None, rbit_keys=None, settings=None):
    """Write a worker configuration serving one queue per suite; return (path, record file)."""
    record = tmp_path / "record.jsonl"
    name = name or f"w{unique}"
    runners = {}
    for suite in suites:
        queue, _ = queue_for(unique, suite)
        runners[queue] = {
            "runner": f"python!{RUNNERS}:{function}",
            "record": str(record),
            "release": str(tmp_path / "release"),
            **(settings or {}),
        }
    path = write_config(tmp_path / f"{name}.ini", name=name, vhost=vhost, runners=runners,
                        rbit=rbit_keys, pybit=pybit)
    return path, record


def records(path):
    """Every runner call recorded so far, in order."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pybit_section(fake, *, url=True, password=None):
    """``[pybit]`` for *fake*; without the url, also without credentials (rbit refuses those)."""
    if not url:
        return {"timeout": "2"}
    return {"url": fake.url, "user": fake.user, "password": password or fake.password, "timeout": "2"}


def log_time(match):
    """The wall-clock time of a worker log line (its asctime prefix)."""
    line_start = match.string.rfind("\n", 0, match.start()) + 1
    stamp = match.string[line_start:line_start + 23]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def list_queues(vhost):
    out = rabbitmqctl("list_queues", "-p", vhost.name, "--formatter", "json", "name", "durable",
                      "auto_delete", "exclusive", "arguments", "messages_ready",
                      "messages_unacknowledged", "consumers").stdout
    return {row["name"]: row for row in json.loads(out or "[]")}


def in_progress(name, slot=0):
    return f"rbit.inprogress.{name}.{slot}"


def ended(worker, job_id, outcome=r"\w+", timeout=15):
    return worker.wait_log(rf"job {job_id}: .* ended {outcome}", timeout=timeout)


# -- The queues, declared exactly as PyBit declares them -----------------------


def test_queue_declared_by_pybit_first_then_worker_runs_the_waiting_job(tmp_path, vhost, unique):
    """PyBit declares the build queue (durable, no arguments, dotted key) and publishes
    before any worker runs; the worker then declares it without PRECONDITION_FAILED and runs
    the job that was waiting."""
    queue, key = queue_for(unique)
    vhost.declare_build_queue(queue, key)
    body = body_for(11, unique)
    vhost.publish_build(body, key)
    assert vhost.depth(queue) == 1
    path, record = make_config(tmp_path, vhost, unique)
    with WorkerProcess(path) as worker:
        worker.wait_ready(timeout=20)
        ended(worker, 11, "Done")
        assert [entry["job_id"] for entry in records(record)] == [11]
        # Empty, and consumed again once the job's message has had its end.
        assert wait_until(lambda: vhost.queue_info(queue) == (0, 1), 5), vhost.queue_info(queue)
    assert "PRECONDITION_FAILED" not in worker.log
    assert worker.process.returncode == 0


def test_queue_declared_by_worker_first_is_exactly_pybits(tmp_path, vhost, unique):
    """The worker declares exchange pybit (direct, durable, not auto-delete) and the build
    queue (durable, not exclusive, not auto-delete, no arguments) bound with the dotted key, so
    PyBit's own identical and passive declarations after it succeed and its publish arrives."""
    queue, key = queue_for(unique)
    path, record = make_config(tmp_path, vhost, unique)
    with WorkerProcess(path) as worker:
        worker.wait_ready(timeout=20)
        with vhost.connection() as conn:
            channel = conn.channel()
            # Any difference in type, flags or arguments raises PreconditionFailed here.
            channel.exchange_declare("pybit", "direct", durable=True, auto_delete=False)
            channel.exchange_declare("pybit", "direct", passive=True)
            channel.queue_declare(queue, durable=True, exclusive=False, auto_delete=False)
            channel.queue_declare(queue, passive=True)
            channel.queue_bind(queue, "pybit", key)
        info = list_queues(vhost)[queue]
        assert (info["durable"], info["auto_delete"], info["exclusive"], info["arguments"]) == (True, False, False, [])
        bindings = json.loads(rabbitmqctl("list_bindings", "-p", vhost.name, "--formatter", "json",
                                          "source_name", "destination_name", "routing_key").stdout)
        assert {(b["source_name"], b["routing_key"]) for b in bindings if b["destination_name"] == queue} == {
            ("", queue), ("pybit", key)}
        vhost.publish_build(body_for(12, unique), key)
        ended(worker, 12, "Done")
    assert [entry["job_id"] for entry in records(record)] == [12]


# -- Consuming -------------------------------------------------------------------


def test_job_starts_at_once_whatever_the_poll_time(tmp_path, vhost, unique):
    """With --poll-time 60, a job published to an idle worker starts within a fraction of a
    second, and so does the next one after the worker went idle again."""
    queue, key = queue_for(unique)
    path, _ = make_config(tmp_path, vhost, unique, rbit_keys={"polling_time": "60"})
    with WorkerProcess(path, "--poll-time", "60") as worker:
        worker.wait_ready(timeout=20)
        for count, job_id in enumerate((21, 22), 1):
            time.sleep(1.0)  # the point: the worker sits idle in its wait when the job arrives
            published = time.time()
            vhost.publish_build(body_for(job_id, unique), key)
            started = worker.wait_log(rf"job {job_id}: starting", timeout=10)
            waited = time.time() - published
            assert waited < 2.0, f"job {job_id} waited {waited:.2f} s"
            assert log_time(started) - published < 2.0
            ended(worker, job_id, "Done")


@pytest.mark.parametrize("published", ["before the worker starts", "while the worker is idle"])
def test_worker_holds_no_more_messages_than_it_runs(tmp_path, vhost, unique, published):
    """Serving two queues with three jobs each and a slow runner, the worker holds only
    the job it runs: every other message stays ready on its queue, none unacknowledged, and a
    second worker started meanwhile takes the next job at once. Each job runs once. The jobs
    are published either before the worker starts or once it waits for work."""
    (queue_a, key_a), (queue_b, key_b) = queue_for(unique, "a"), queue_for(unique, "b")
    for queue, key in ((queue_a, key_a), (queue_b, key_b)):
        vhost.declare_build_queue(queue, key)
    jobs = {31: ("a", key_a), 32: ("a", key_a), 33: ("a", key_a),
            34: ("b", key_b), 35: ("b", key_b), 36: ("b", key_b)}

    def publish_all():
        for job_id, (suite, key) in jobs.items():
            vhost.publish_build(body_for(job_id, unique, suite, package=f"wait-{job_id}"), key)

    first_path, record = make_config(tmp_path, vhost, unique, suites=("a", "b"), name=f"w{unique}1")
    second_path, _ = make_config(tmp_path, vhost, unique, suites=("a", "b"), name=f"w{unique}2")

    def ready():
        return vhost.depth(queue_a) + vhost.depth(queue_b)

    first, second = WorkerProcess(first_path), WorkerProcess(second_path)
    try:
        if published == "before the worker starts":
            publish_all()
            first.start()
        else:
            first.start()
            first.wait_ready(timeout=20)
            publish_all()
        first.wait_log(r"job \d+: starting", timeout=20)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # hold for a while: nothing more is taken
            assert ready() == 5
            time.sleep(0.1)
        unacked = {q: list_queues(vhost)[q]["messages_unacknowledged"] for q in (queue_a, queue_b)}
        assert unacked == {queue_a: 0, queue_b: 0}

        second.start()
        ready_line = second.wait_ready(timeout=20)
        started = second.wait_log(r"job \d+: starting", timeout=10)
        assert log_time(started) - log_time(ready_line) < 2.0
        assert wait_until(lambda: ready() == 4, timeout=5)
        assert wait_until(lambda: len(records(record)) == 2, timeout=5)

        (tmp_path / "release").touch()
        assert wait_until(lambda: len(records(record)) == 6, timeout=30), records(record)
        for worker in (first, second):
            worker.wait_log(r"ended Done", count=len(re.findall(r"starting", worker.log)))
    finally:
        (tmp_path / "release").touch()
        first.stop()
        second.stop()
    ran = sorted(entry["job_id"] for entry in records(record))
    assert ran == sorted(jobs)
    assert ready() == 0
    for name in (f"w{unique}1", f"w{unique}2"):
        assert vhost.depth(in_progress(name)) == 0


def test_consumers_cancelled_without_waiting_still_let_the_worker_hold_only_its_job(tmp_path, vhost, unique):
    """Serving five queues with one slot, the worker cancels its five consumers without waiting
    for the broker's reply before it acknowledges each message it takes: the broker still sends
    it nothing more than the job it runs. After a run of quick jobs over the five queues, two
    slow jobs are queued: while the first runs, the second stays ready on its queue, none is
    unacknowledged, and no message ever reaches a cancelled consumer (py-amqp would log that it
    rejects it). Each job runs once and leaves no in-progress copy."""
    suites = ("a", "b", "c", "d", "e")
    served = [queue_for(unique, suite) for suite in suites]
    for queue, key in served:
        vhost.declare_build_queue(queue, key)
    quick = {job_id: suites[job_id % len(suites)] for job_id in range(101, 116)}
    for job_id, suite in quick.items():
        vhost.publish_build(body_for(job_id, unique, suite, package=f"done-{job_id}"), queue_for(unique, suite)[1])
    path, record = make_config(tmp_path, vhost, unique, suites=suites)
    with WorkerProcess(path) as worker:
        worker.wait_ready(timeout=20)
        assert wait_until(lambda: len(records(record)) == len(quick), timeout=30), records(record)
        worker.wait_log(r"ended Done", count=len(quick))
        for job_id, suite in ((121, "a"), (122, "b")):
            vhost.publish_build(body_for(job_id, unique, suite, package=f"wait-{job_id}"), queue_for(unique, suite)[1])
        worker.wait_log(r"job 12[12]: starting", timeout=20)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # hold for a while: nothing more is taken
            assert sum(vhost.depth(queue) for queue, _ in served) == 1
            time.sleep(0.1)
        rows = list_queues(vhost)
        assert {queue: rows[queue]["messages_unacknowledged"] for queue, _ in served} == dict.fromkeys(
            (queue for queue, _ in served), 0)
        (tmp_path / "release").touch()
        worker.wait_log(r"ended Done", count=len(quick) + 2)
        log = worker.log
    assert "no callbacks" not in log and "Rejecting message" not in log, log[-3000:]
    assert sorted(entry["job_id"] for entry in records(record)) == sorted([*quick, 121, 122])
    assert vhost.depth(in_progress(f"w{unique}")) == 0


# -- What a runner is handed ----------------------------------------------------


def test_runner_gets_exact_body_decoded_request_queue_and_settings(tmp_path, vhost, unique):
    """message.body is the published text exactly; message.request is a BuildRequest with
    PyBit's accessors; message.queue names the queue; redelivered is False on a first delivery;
    settings are the section's other keys (not runner or timeout), and set_status is callable."""
    queue, key = queue_for(unique)
    path, record = make_config(tmp_path, vhost, unique,
                               settings={"timeout": "60", "greeting": "%(foo)s 100%"})
    body = body_for(41, unique, package="héllo-wörld", version="2.0~β1", buildenv="squeeze",
                    web_host="pybit.example:8080")
    with WorkerProcess(path) as worker:
        worker.wait_ready(timeout=20)
        vhost.publish_build(body, key)
        ended(worker, 41, "Done")
        raw_body = body.replace('"id": 41,', '"id": 44,', 1)
        vhost.publish_build(raw_body.encode("utf-8"), key)  # bytes, no content_encoding property
        ended(worker, 44, "Done")
    entry, raw_entry = records(record)
    assert (raw_entry["job_id"], raw_entry["body"], raw_entry["body_type"]) == (44, raw_body, "str")
    assert entry["body"] == body
    assert entry["body_type"] == "str"
    assert entry["request_class"] == "BuildRequest"
    assert entry["accessors"] == {
        "get_job_id": 41, "get_package": "héllo-wörld", "get_version": "2.0~β1",
        "get_arch": "any", "get_dist": f"t{unique}", "get_suite": "a", "get_format": "pdf",
        "get_buildenv": "squeeze", "get_buildstamp": None,
    }
    assert isinstance(entry["stamped"], int) and abs(entry["stamped"] - time.time()) < 60
    assert entry["web_host"] == "pybit.example:8080"
    assert entry["queue"] == queue
    assert entry["redelivered"] is False
    assert entry["set_status_callable"] is True
    assert entry["settings"] == {
        "record": str(record), "release": str(tmp_path / "release"), "greeting": "%(foo)s 100%"}


def test_runner_sees_a_redelivered_message_as_redelivered(tmp_path, vhost, unique):
    """A message the broker redelivers (a consumer took it and went away without an ack)
    reaches the runner with message.redelivered True; a fresh one with False."""
    queue, key = queue_for(unique)
    vhost.declare_build_queue(queue, key)
    vhost.publish_build(body_for(42, unique), key)
    with vhost.connection() as conn:
        taken = conn.channel().basic_get(queue, no_ack=False)
        assert taken is not None and not taken.delivery_info["redelivered"]
    path, record = make_config(tmp_path, vhost, unique)
    with WorkerProcess(path) as worker:
        ended(worker, 42, "Done", timeout=20)
        worker.wait_ready()
        vhost.publish_build(body_for(43, unique), key)
        ended(worker, 43, "Done")
    assert {entry["job_id"]: entry["redelivered"] for entry in records(record)} == {42: True, 43: False}


# -- Statuses ------------------------------------------------------------------


def test_statuses_building_runner_statuses_then_done(tmp_path, vhost, unique, pybit_web):
    """Building is reported before the runner, the runner's set_status calls follow in
    order, and Done is added only when the runner reported no final status itself."""
    queue, key = queue_for(unique)
    path, record = make_config(tmp_path, vhost, unique, pybit=pybit_section(pybit_web))
    for job_id in (51, 52, 53):
        pybit_web.add_job(job_id)
    with WorkerProcess(path) as worker:
        worker.wait_ready(timeout=20)
        vhost.publish_build(body_for(51, unique, package="uploaded-x"), key)
        vhost.publish_build(body_for(52, unique, package="done-x"), key)
        vhost.publish_build(body_for(53, unique, package="plain-x"), key)
        for job_id in (51, 52, 53):
            assert pybit_web.wait_for((job_id, "Done"), timeout=10), pybit_web.statuses(job_id)
            ended(worker, job_id, "Done")
    assert pybit_web.statuses(51) == ["Waiting", "Building", "Uploaded", "Done"]
    assert pybit_web.statuses(52) == ["Waiting", "Building", "Done"]
    assert pybit_web.statuses(53) == ["Waiting", "Building", "Done"]
    assert [entry["job_id"] for entry in records(record)] == [51, 52, 53]


def test_failed_and_other_exceptions_report_failed(tmp_path, vhost, unique, pybit_web):
    """rbit.Failed makes the job Failed with its message; any other exception makes it
    Failed with the traceback in the job's log."""
    queue, key = queue_for(unique)
    path, _ = make_config(tmp_path, vhost, unique, pybit=pybit_section(pybit_web))
    pybit_web.add_job(61)
    pybit_web.add_job(62)
    with WorkerProcess(path) as worker:
        worker.wait_ready(timeout=20)
        vhost.publish_build(body_for(61, unique, package="fail-x"), key)
        vhost.publish_build(body_for(62, unique, package="crash-x"), key)
        ended(worker, 61, "Failed")
        ended(worker, 62, "Failed")
        assert pybit_web.wait_for((62, "Failed"), timeout=10)
        assert pybit_web.wait_for((61, "Failed"), timeout=10)
    assert pybit_web.statuses(61) == ["Waiting", "Building", "Failed"]
    assert pybit_web.statuses(62) == ["Waiting", "Building", "Failed"]
    assert "the build broke on purpose" in worker.log
    assert "RuntimeError: kaboom crash-x" in worker.log  # the end line says why
    assert "Traceback (most recent call last)" in job_log(path, 62)
    assert "Traceback" not in worker.log


def test_unknown_status_fails_the_job_and_never_reaches_pybit(tmp_path, vhost, unique, pybit_web):
    """set_status with a status PyBit does not know is the runner author's error naming
    the allowed ones: the job ends Failed and PyBit is never sent the unknown name."""
    queue, key = queue_for(unique)
    path, _ = make_config(tmp_path, vhost, unique, pybit=pybit_section(pybit_web))
    pybit_web.add_job(71)
    with WorkerProcess(path) as worker:
        worker.wait_ready(timeout=20)
        vhost.publish_build(body_for(71, unique, package="unknown-x"), key)
        ended(worker, 71, "Failed")
        assert pybit_web.wait_for((71, "Failed"), timeout=10)
    assert pybit_web.statuses(71) == ["Waiting", "Building", "Failed"]
    assert all(report.status in statuses.ALL for report in pybit_web.reports)
    puts = [a for a in pybit_web.attempts if a.method in ("PUT", "POST")]
    assert [a for a in puts if a.code != 200] == []
    assert "Bogus" in worker.log
    assert "Waiting, Blocked, Cancelled, Building, Failed, Uploaded, Done" in worker.log


def test_status_reports_carry_client_name_and_basic_auth(tmp_path, vhost, unique, pybit_web):
    """Status PUTs carry client = [rbit] name and HTTP basic auth from [pybit], whose
    password comes from RBIT_PYBIT_PASSWORD when set (the file's one is wrong here)."""
    queue, key = queue_for(unique)
    path, _ = make_config(tmp_path, vhost, unique,
                          pybit=pybit_section(pybit_web, password="not-the-password"))
    pybit_web.add_job(81)
    with WorkerProcess(path, env={"RBIT_PYBIT_PASSWORD": pybit_web.password}) as worker:
        worker.wait_ready(timeout=20)
        vhost.publish_build(body_for(81, unique), key)
        assert pybit_web.wait_for((81, "Done"), timeout=10), pybit_web.attempts
    assert {report.client for report in pybit_web.reports} == {f"w{unique}"}
    puts = [a for a in pybit_web.attempts if a.method in ("PUT", "POST")]
    assert [(a.path, a.code) for a in puts] == [("/job/81", 200), ("/job/81", 200)]
    assert pybit_web.password not in worker.log


def test_statuses_go_to_pybit_url_when_configured(tmp_path, vhost, unique, pybit_web):
    """With [pybit] url, statuses go there, not to the request's web_host."""
    queue, key = queue_for(unique)
    path, _ = make_config(tmp_path, vhost, unique, pybit=pybit_section(pybit_web, url=True))
    pybit_web.add_job(82)
    with WorkerProcess(path) as worker:
        worker.wait_ready(timeout=20)
        vhost.publish_build(body_for(82, unique, web_host="127.0.0.1:9"), key)
        assert pybit_web.wait_for((82, "Done"), timeout=10), worker.log
    assert pybit_web.statuses(82) == ["Waiting", "Building", "Done"]


def test_statuses_go_to_web_host_without_url(tmp_path, vhost, unique):
    """Statuses go to the request's web_host when [pybit] has no url (and so no credentials)."""
    queue, key = queue_for(unique)
    with FakePyBit() as open_pybit:
        open_pybit.add_job(83)
        path, _ = make_config(tmp_path, vhost, unique, pybit=pybit_section(open_pybit, url=False))
        with WorkerProcess(path) as worker:
            worker.wait_ready(timeout=20)
            vhost.publish_build(body_for(83, unique, web_host=open_pybit.web_host), key)
            assert open_pybit.wait_for((83, "Done"), timeout=10), worker.log
        assert open_pybit.statuses(83) == ["Waiting", "Building", "Done"]
        assert {report.client for report in open_pybit.reports} == {f"w{unique}"}


def test_without_pybit_section_statuses_are_only_logged(tmp_path, vhost, unique, pybit_web):
    """Without [pybit] nothing is sent, not even to the request's web_host; each status is
    logged with the job id and the queue."""
    queue, key = queue_for(unique)
    path, _ = make_config(tmp_path, vhost, unique)
    with WorkerProcess(path) as worker:
        worker.wait_ready(timeout=20)
        vhost.publish_build(body_for(84, unique, package="uploaded-x", web_host=pybit_web.web_host), key)
        ended(worker, 84, "Done")
    assert worker.process.returncode == 0
    assert pybit_web.attempts == []
    for status in ("Building", "Uploaded", "Done"):
        assert re.search(rf"job 84 .*{re.escape(queue)}.*: {status}", worker.log), worker.log


def test_job_cancelled_in_pybit_is_dropped_without_running(tmp_path, vhost, unique, pybit_web):
    """A job whose PyBit history ends in Cancelled is not run and nothing is reported
    for it; its message is acknowledged (not back on the queue, not in progress), and the worker
    goes on with the next job."""
    queue, key = queue_for(unique)
    pybit_web.set_history(91, ["Waiting", "Cancelled"])
    pybit_web.set_history(92, ["Waiting"])
    path, record = make_config(tmp_path, vhost, unique, pybit=pybit_section(pybit_web))
    with WorkerProcess(path) as worker:
        worker.wait_ready(timeout=20)
        vhost.publish_build(body_for(91, unique), key)
        vhost.publish_build(body_for(92, unique), key)
        assert pybit_web.wait_for((92, "Done"), timeout=10), worker.log
        worker.wait_log(r"job 91: .* not run: PyBit's history ends in Cancelled")
    assert [entry["job_id"] for entry in records(record)] == [92]
    assert pybit_web.statuses(91) == ["Waiting", "Cancelled"]
    assert pybit_web.statuses(92) == ["Waiting", "Building", "Done"]
    # The worker has stopped: an unacknowledged message would be back on the queue now.
    assert vhost.depth(queue) == 0
    assert vhost.depth(in_progress(f"w{unique}")) == 0


# -- Blocked jobs ----------------------------------------------------------------


def test_blocked_job_is_held_by_the_broker_then_offered_again(tmp_path, vhost, unique, pybit_web):
    """rbit.Blocked is reported Blocked; the message waits blocked_delay seconds in the
    broker's rbit.delay.<queue>.<ms>ms queue, not in the worker, and comes back unchanged to its
    queue even though the worker was stopped right after the report."""
    queue, key = queue_for(unique)
    delay_queue = f"rbit.delay.{queue}.2000ms"
    path, record = make_config(tmp_path, vhost, unique, pybit=pybit_section(pybit_web),
                               rbit_keys={"blocked_delay": "2"})
    pybit_web.add_job(101)
    body = body_for(101, unique, package="blocked-x")
    worker = WorkerProcess(path)
    try:
        worker.start()
        worker.wait_ready(timeout=20)
        vhost.publish_build(body, key)
        assert pybit_web.wait_for((101, "Blocked"), timeout=10), worker.log
        blocked_at = time.monotonic()
        assert vhost.wait_depth(delay_queue, 1, timeout=1.5)
        worker.signal(signal.SIGTERM)
        assert worker.wait(10) == 0
    finally:
        worker.stop()
    assert time.monotonic() - blocked_at < 1.9, "the worker took too long to stop for this test"
    # The worker is gone: the message is in the broker, in the delay queue or already back.
    assert vhost.depth(delay_queue) + vhost.depth(queue) == 1
    assert vhost.depth(in_progress(f"w{unique}")) == 0
    assert vhost.wait_depth(queue, 1, timeout=6), "the Blocked job did not come back"
    assert time.monotonic() - blocked_at >= 1.5
    assert vhost.depth(delay_queue) == 0
    returned = vhost.get(queue)
    returned_body = returned.body if isinstance(returned.body, str) else returned.body.decode()
    assert returned_body == body
    assert pybit_web.statuses(101) == ["Waiting", "Building", "Blocked"]
    assert len(records(record)) == 1


# -- Bad input: the rejected queue -------------------------------------------------


def test_bad_messages_are_moved_unchanged_to_the_rejected_queue(tmp_path, vhost, unique, pybit_web):
    """A body that is not JSON, not a BuildRequest, or carries py/reduce never reaches
    the runner; it is moved with the same bytes to the rejected queue with x-rbit-reason and
    x-rbit-queue headers, and the worker goes on with the next good job."""
    queue, key = queue_for(unique)
    pwned = tmp_path / "PWNED"
    good = json.loads(body_for(112, unique))
    evil = json.loads(body_for(111, unique))
    evil["job"]["buildclient"] = {"py/reduce": [{"py/function": "os.system"},
                                                {"py/tuple": [f"touch {pwned}"]}]}
    bad_bodies = [
        b"\xff\xfe this is not JSON {",
        json.dumps({"job": good["job"], "web_host": "x"}).encode(),
        body_for(110, unique).replace("BuildRequest", "Job").encode(),
        json.dumps(evil).encode(),
        json.dumps({"py/reduce": [{"py/function": "os.system"}, {"py/tuple": [f"touch {pwned}"]}]}).encode(),
    ]
    path, record = make_config(tmp_path, vhost, unique, pybit=pybit_section(pybit_web))
    pybit_web.add_job(112)
    rejected = f"rbit.rejected.w{unique}"
    with WorkerProcess(path) as worker:
        worker.wait_ready(timeout=20)
        for index, bad in enumerate(bad_bodies):
            vhost.publish_build(bad, key, content_type="application/json", message_id=f"m-{index}",
                                application_headers={"x-origin": "pybit"})
        vhost.publish_build(body_for(112, unique), key)
        assert pybit_web.wait_for((112, "Done"), timeout=10), worker.log
    assert [entry["job_id"] for entry in records(record)] == [112]
    assert not pwned.exists()
    assert vhost.depth(queue) == 0
    assert vhost.depth(rejected) == len(bad_bodies)
    moved = []
    for _ in bad_bodies:
        message = vhost.get(rejected)
        body = message.body if isinstance(message.body, bytes) else message.body.encode("utf-8")
        headers = message.properties.get("application_headers") or {}
        assert headers.get("x-rbit-queue") == queue
        assert isinstance(headers.get("x-rbit-reason"), str) and headers["x-rbit-reason"].strip()
        assert headers.get("x-origin") == "pybit"
        assert message.properties.get("content_type") == "application/json"
        assert message.properties.get("message_id") == f"m-{len(moved)}"
        assert message.properties.get("delivery_mode") == 2
        moved.append(body)
    assert moved == bad_bodies
    assert {report.job_id for report in pybit_web.reports} == {112}


@pytest.mark.parametrize("console", [True, False], ids=["rbit CONFIG", "python -m rbit CONFIG"])
def test_a_job_never_imports_the_command_line_again(tmp_path, vhost, unique, console):
    """A job's process never imports the CLI (and click) again, whether the worker was
    started by the ``rbit`` console script, as the systemd unit starts it, or by ``python -m
    rbit``: both ways cost a job the same."""
    queue, key = queue_for(unique)
    path, record = make_config(tmp_path, vhost, unique, function="imports")
    with WorkerProcess(path, console=console) as worker:
        worker.wait_ready()
        vhost.publish_build(body_for(95, unique), key)
        ended(worker, 95, "Done", timeout=30)
    # (This runner's own module imports kombu for the tests, so kombu is not looked at here.)
    assert records(record) == [{"job_id": 95, "loaded": {"rbit.cli": False, "click": False}}]
