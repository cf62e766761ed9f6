"""The operator's and runner author's tools: ``rbit publish``, ``status``, ``try``, ``rejected``, ``recover``.

The README's "Publishing a test request", "Trying a runner without a broker",
"Looking at the worker" and "Recovering a dead worker's jobs", with the exit
statuses of its "Command line". Every command runs as a
real ``python -m rbit`` subprocess against the real broker, in the test
session's vhost with queue and worker names of the test's own.

The ``python!tests.test_tools:...`` runners below are imported by those
subprocesses (the repository root is on their PYTHONPATH).
"""

import json
import re
import signal
import subprocess
import sys
import time


from rbit import Failed
from rbit.pybit import decode_build_request, encode, make_request

from .harness import ROOT, WorkerProcess, environment, free_port, offline_config, write_config


# -- Runners the rbit subprocesses import ---------------------------------------


def record_runner(message, set_status, settings):
    """Writes what it was handed to ``settings['record']`` as JSON (proves it ran, and on what)."""
    request = message.request
    with open(settings["record"], "w", encoding="utf-8") as handle:
        json.dump({"job": request.get_job_id(), "package": request.get_package(),
                   "version": request.get_version(), "queue": message.queue,
                   "body": message.body}, handle)


def failing_runner(message, set_status, settings):
    """Reports Uploaded, then fails the job the way a runner author says so."""
    with open(settings["record"], "w", encoding="utf-8") as handle:
        handle.write("called\n")
    set_status("Uploaded", "half way")
    raise Failed("compiler exploded")


# -- Helpers ---------------------------------------------------------------------


def rbit(*args, env=None, timeout=60):
    """``python -m rbit ARGS`` as an operator runs it; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "rbit", *map(str, args)], capture_output=True,
                          text=True, env=environment(**(env or {})), timeout=timeout, cwd=str(ROOT))


def names(unique):
    """(dist, queue, routing key) of a PyBit build queue of this test's own."""
    dist = f"t{unique}"
    return dist, f"{dist}_any_latex_pdf", f"{dist}.any.latex.pdf"


def body_text(message):
    return message.body.decode("utf-8") if isinstance(message.body, bytes) else message.body


def request_body(job_id, dist, package="hello", version="1.0"):
    return encode(make_request(job_id=job_id, package=package, version=version, distribution=dist,
                               architecture="any", suite="latex", format="pdf",
                               uri="https://git.example/hello.git", vcs_id="abc123",
                               web_host="pybit.example:8080"))


STATUS_ROW = re.compile(r"^(build|blocked|in progress|rejected)\s+(\S+)\s+(\S+)\s+(\S+)\s*(.*)$")


def status_rows(output):
    """``rbit status`` rows as {queue: (kind, messages, consumers, note)}."""
    rows = {}
    for line in output.splitlines():
        match = STATUS_ROW.match(line)
        if match:
            kind, queue, messages, consumers, note = match.groups()
            rows[queue] = (kind, messages, consumers, note)
    return rows


# -- rbit publish: a request exactly as PyBit's web controller sends it ------------------


def test_publish_puts_a_pybit_request_on_the_served_queue(tmp_path, vhost, unique):
    """``rbit publish`` routes through ``pybit`` with the dotted key,
    persistent, with a jsonpickle body tagged ``pybit.models`` that rbit reads back unchanged."""
    dist, queue, key = names(unique)
    vhost.declare_build_queue(queue, key)
    config = write_config(tmp_path / "rbit.ini", name=f"pub-{unique}", vhost=vhost,
                          runners={queue: {"runner": "python!rbitext.hello:hello"}})
    result = rbit("publish", config, "--job-id", 4242, "--package", "libfoo", "--version", "2.3-1",
                  "--method", "svn", "--uri", "svn://svn.example/libfoo", "--vcs-id", "r77",
                  "--web-host", "pybit.example:8181", "--print-body")
    assert result.returncode == 0, result.stderr
    assert key in result.stdout and "4242" in result.stdout

    with vhost.connection() as conn:
        message = conn.channel().basic_get(queue, no_ack=True)
    assert message is not None, "the request did not reach the served queue"
    assert message.delivery_info["exchange"] == "pybit"
    assert message.delivery_info["routing_key"] == key
    assert message.properties.get("delivery_mode") == 2, "PyBit publishes persistent messages"

    body = body_text(message)
    assert body in result.stdout, "--print-body shows exactly the body sent"
    tree = json.loads(body)
    assert tree["py/object"] == "pybit.models.BuildRequest"
    assert tree["job"]["py/object"] == "pybit.models.Job"
    assert tree["job"]["packageinstance"]["py/object"] == "pybit.models.PackageInstance"
    assert tree["job"]["packageinstance"]["package"]["py/object"] == "pybit.models.Package"
    assert tree["transport"]["py/object"] == "pybit.models.Transport"

    request = decode_build_request(body)
    assert request.get_job_id() == 4242
    assert (request.get_package(), request.get_version()) == ("libfoo", "2.3-1")
    assert (request.get_dist(), request.get_arch(), request.get_suite(), request.get_format()) == (
        dist, "any", "latex", "pdf")
    assert (request.transport.method, request.transport.uri, request.transport.vcs_id) == (
        "svn", "svn://svn.example/libfoo", "r77")
    assert request.web_host == "pybit.example:8181"
    assert vhost.depth(queue) == 0


def test_publish_before_any_worker_keeps_the_request_for_the_worker(tmp_path, vhost, unique):
    """``rbit publish`` does what PyBit's controller does: it declares the build queue as PyBit
    does (durable, no arguments) and binds it, so a request sent before any worker has started
    is kept, with no content type; a worker started afterwards builds it."""
    _, queue, key = names(unique)
    config = write_config(tmp_path / "rbit.ini", name=f"pub-{unique}", vhost=vhost,
                          runners={queue: {"runner": "python!rbitext.hello:hello"}})
    assert vhost.queue_info(queue) is None
    result = rbit("publish", config, "--job-id", 4343, "--package", "early", "--version", "0.1")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert vhost.depth(queue) == 1
    with vhost.connection() as conn:
        channel = conn.channel()
        message = channel.basic_get(queue, no_ack=False)
        assert "content_type" not in message.properties, message.properties
    with WorkerProcess(config) as worker:
        worker.wait_log(r"job 4343: early 0\.1 from .* ended Done", timeout=30)
    assert vhost.depth(queue) == 0


# -- rbit status -----------------------------------------------------------------------------


def test_status_shows_queues_slots_and_the_job_in_progress(tmp_path, vhost, unique):
    """``rbit status`` lists the served queue (depth, consumers), the delay queue,
    the in-progress slot with the running job's id, and the rejected queue."""
    dist, queue, key = names(unique)
    name = f"stat-{unique}"
    config = write_config(tmp_path / "rbit.ini", name=name, vhost=vhost,
                          rbit={"shutdown_grace": "1"},
                          runners={queue: {"runner": "shell!/bin/sleep 30"}})
    with WorkerProcess(config) as worker:
        worker.wait_ready()
        idle = rbit("status", config)
        assert idle.returncode == 0, idle.stderr
        rows = status_rows(idle.stdout)
        assert rows[queue][:3] == ("build", "0", "1"), idle.stdout
        delay = [q for q, row in rows.items() if row[0] == "blocked"]
        assert len(delay) == 1 and queue in delay[0] and rows[delay[0]][1:3] == ("0", "0"), idle.stdout
        slot = f"rbit.inprogress.{name}.0"
        assert rows[slot][:2] == ("in progress", "0") and "idle" in rows[slot][3], idle.stdout
        assert rows[f"rbit.rejected.{name}"][:2] == ("rejected", "0"), idle.stdout

        vhost.publish_build(request_body(7301, dist, package="slowpkg"), key)
        worker.wait_log(r"job 7301: starting")
        vhost.publish_build(request_body(7302, dist), key)
        assert vhost.wait_depth(queue, 1)
        busy = rbit("status", config)
        assert busy.returncode == 0, busy.stderr
        rows = status_rows(busy.stdout)
        assert rows[queue][:3] == ("build", "1", "0"), busy.stdout  # one waiting; the busy worker does not consume
        assert rows[slot][:2] == ("in progress", "1"), busy.stdout
        assert "job 7301" in rows[slot][3] and "slowpkg" in rows[slot][3], busy.stdout
        # Looking leaves the in-progress copy where it is.
        assert vhost.depth(slot) == 1
        assert vhost.depth(queue) == 1


# -- rbit try: a runner without a broker ------------------------------------------------------


def try_config(tmp_path, unique, record):
    """Two runner sections and an [amqp] port nothing listens on: ``try`` must not need a broker."""
    _, queue, _ = names(unique)
    return offline_config(
        tmp_path / "try.ini", name=f"try-{unique}",
        runners={queue: {"runner": "python!tests.test_tools:record_runner", "record": str(record)},
                 f"f{unique}_any_latex_pdf": {"runner": "python!tests.test_tools:failing_runner",
                                              "record": str(record)}},
    )


def test_try_runs_the_runner_with_no_broker(tmp_path, unique):
    """``rbit try CONFIG --package x`` runs the runner here, with the broker's port
    closed, printing ``status: Building`` ... ``ended Done``; exit 0."""
    record = tmp_path / "record.json"
    config = try_config(tmp_path, unique, record)
    result = rbit("try", config, "--package", "x", "--job-id", 31, timeout=30)
    assert result.returncode == 0, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    building = next(i for i, line in enumerate(lines) if line.startswith("status: Building"))
    ended = next(i for i, line in enumerate(lines) if line.startswith("ended Done"))
    assert building < ended
    assert "status: Done" in result.stdout
    seen = json.loads(record.read_text())
    assert (seen["job"], seen["package"]) == (31, "x")
    assert decode_build_request(seen["body"]).get_package() == "x"


def test_try_a_failing_runner_exits_1(tmp_path, unique):
    """A runner raising ``rbit.Failed`` ends ``Failed`` with its message; exit 1."""
    record = tmp_path / "record.txt"
    config = try_config(tmp_path, unique, record)
    result = rbit("try", config, "--queue", f"f{unique}_any_latex_pdf", "--package", "x", timeout=30)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "status: Building" in result.stdout
    assert "status: Uploaded (half way)" in result.stdout
    assert "status: Failed (compiler exploded)" in result.stdout
    assert re.search(r"^ended Failed", result.stdout, re.M)
    assert record.read_text() == "called\n"


def test_try_with_a_body_file_passes_the_body_unchanged(tmp_path, unique):
    """``--body-file`` with PyBit's JSON: the runner gets that exact body."""
    record = tmp_path / "record.json"
    config = try_config(tmp_path, unique, record)
    body = request_body(55, f"t{unique}", package="frombody", version="9.9")
    body_file = tmp_path / "body.json"
    body_file.write_text(body)
    result = rbit("try", config, "--body-file", body_file, timeout=30)
    assert result.returncode == 0, (result.stdout, result.stderr)
    seen = json.loads(record.read_text())
    assert (seen["job"], seen["package"], seen["version"]) == (55, "frombody", "9.9")
    assert seen["body"] == body


def test_try_refuses_a_hostile_body_file(tmp_path, unique):
    """A body with ``py/reduce`` is refused (exit 2), never executed,
    and the runner is not called."""
    record = tmp_path / "record.json"
    marker = tmp_path / "pwned"
    config = try_config(tmp_path, unique, record)
    tree = json.loads(request_body(56, f"t{unique}"))
    tree["transport"]["uri"] = {"py/reduce": [{"py/function": "os.system"},
                                              {"py/tuple": [f"touch {marker}"]}]}
    body_file = tmp_path / "hostile.json"
    body_file.write_text(json.dumps(tree))
    result = rbit("try", config, "--body-file", body_file, timeout=30)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "not a build request" in result.stderr
    assert "Traceback" not in result.stderr
    assert not record.exists(), "the runner was called with a hostile body"
    assert not marker.exists(), "the body's py/reduce was executed"


# -- rbit rejected: the rejected queue ---------------------------------------------------------


def test_rejected_lists_and_requeues_without_rbit_headers(tmp_path, vhost, unique):
    """``rbit rejected`` lists each rejected message with its reason and
    source queue; ``--requeue 1`` puts that one back on its queue without ``x-rbit-*`` headers
    (body and other headers unchanged); the rest stay in the rejected queue."""
    dist, queue, key = names(unique)
    name = f"rej-{unique}"
    rejected = f"rbit.rejected.{name}"
    config = write_config(tmp_path / "rbit.ini", name=name, vhost=vhost,
                          runners={queue: {"runner": "shell!/bin/true"}})
    first = "this is not JSON at all"
    second = json.dumps({"py/reduce": [{"py/function": "os.system"}, {"py/tuple": ["true"]}]})
    with WorkerProcess(config) as worker:
        worker.wait_ready()
        vhost.publish_build(first, key, application_headers={"x-custom": "keep me"})
        assert vhost.wait_depth(rejected, 1)
        vhost.publish_build(second, key)
        assert vhost.wait_depth(rejected, 2)
    # The worker is stopped, so a message put back stays on its queue for us to look at.

    listing = rbit("rejected", config)
    assert listing.returncode == 0, listing.stderr
    entries = re.findall(r"^\[(\d+)\] from (\S+): (.+)$", listing.stdout, re.M)
    assert [(n, q) for n, q, _ in entries] == [("1", queue), ("2", queue)], listing.stdout
    assert all(reason.strip() and reason.strip() != "?" for _, _, reason in entries), listing.stdout
    assert "this is not JSON" in listing.stdout
    assert vhost.depth(rejected) == 2, "listing must leave the messages where they are"

    requeue = rbit("rejected", config, "--requeue", 1)
    assert requeue.returncode == 0, requeue.stderr
    assert f"put back on {queue}" in requeue.stdout
    assert vhost.depth(queue) == 1
    assert vhost.depth(rejected) == 1
    back = vhost.get(queue)
    assert body_text(back) == first
    headers = dict(back.properties.get("application_headers") or {})
    assert not [h for h in headers if h.startswith("x-rbit-")], headers
    assert headers.get("x-custom") == "keep me"

    rest = rbit("rejected", config)
    assert re.findall(r"^\[(\d+)\] from (\S+):", rest.stdout, re.M) == [("1", queue)], rest.stdout
    assert "py/reduce" in rest.stdout


# -- rbit recover: a dead worker's jobs -------------------------------------------------------


def test_recover_puts_back_a_dead_workers_job(tmp_path, vhost, unique):
    """``rbit recover --worker NAME`` refuses while NAME is connected,
    and after it died mid-job puts its in-progress job back on the job's queue."""
    dist, queue, key = names(unique)
    name = f"rec-{unique}"
    slot = f"rbit.inprogress.{name}.0"
    config = write_config(tmp_path / "rbit.ini", name=name, vhost=vhost,
                          runners={queue: {"runner": "shell!/bin/sleep 60"}})
    body = request_body(7401, dist)
    worker = WorkerProcess(config).start()
    try:
        worker.wait_ready()
        vhost.publish_build(body, key)
        worker.wait_log(r"job 7401: starting")
        assert vhost.depth(slot) == 1
        refused = rbit("recover", config, "--worker", name)
        assert refused.returncode == 1, (refused.stdout, refused.stderr)
        assert "connected" in refused.stderr
        assert vhost.depth(slot) == 1
        worker.signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        worker.stop()

    result = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the broker drops the dead worker's exclusive queue soon
        result = rbit("recover", config, "--worker", name)
        if result.returncode == 0:
            break
        time.sleep(0.5)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "put back 1 unfinished job" in result.stdout
    assert vhost.depth(slot) == 0
    assert vhost.depth(queue) == 1
    back = vhost.get(queue)
    assert body_text(back) == body


# -- rbit --help --------------------------------------------------------------------------------


def test_help_lists_every_command():
    """``rbit --help`` lists every command; each has its own ``--help``."""
    result = rbit("--help")
    assert result.returncode == 0, result.stderr
    for command in ("run", "recover", "publish", "status", "try", "rejected"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.M), f"{command} missing:\n{result.stdout}"
        own = rbit(command, "--help")
        assert own.returncode == 0 and "Usage:" in own.stdout, (command, own.stderr)


# -- A broker that is down: exit 1 with one clear message ------------------------------------


def test_tools_report_a_broker_that_is_down(tmp_path, unique):
    """With nothing listening on [amqp] port, ``publish``, ``status``,
    ``rejected`` and ``recover`` exit 1 at once, without a traceback, with a message that says
    the broker cannot be reached and why (the host:port, or "refused")."""
    port = free_port()
    _, queue, _ = names(unique)
    config = write_config(tmp_path / "down.ini", name=f"down-{unique}", vhost=None,
                          amqp={"port": str(port)}, runners={queue: {"runner": "python!rbitext.hello:hello"}})
    problems = []
    for command in ("publish", "status", "rejected", "recover"):
        started = time.monotonic()
        result = rbit(command, config, timeout=30)
        took = time.monotonic() - started
        message = result.stderr.strip()
        if result.returncode != 1 or "Traceback" in message or took > 15:
            problems.append(f"{command}: exit {result.returncode} after {took:.0f} s: {message!r}")
        elif "broker" not in message or not (str(port) in message or "refused" in message.lower()):
            problems.append(f"{command}: unclear message {message!r}")
    assert not problems, "\n".join(problems)
