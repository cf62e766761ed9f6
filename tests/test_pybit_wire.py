"""What the real PyBit sends (tests/pybit_wire/, captured from PyBit's own code): every body
decodes with PyBit's accessors giving the values in the file, and PyBit's real cancel body,
routed by the worker's name, stops the running job."""

import json
from pathlib import Path

import pytest

from rbit import pybit, statuses

from .broker import drop_vhost, make_vhost
from .harness import WorkerProcess, alive, wait_until, write_config
from .pybit_web import FakePyBit
from .reliability_runners import events

#: Bodies and answers captured from PyBit's own code.
WIRE = Path(__file__).parent / "pybit_wire"

#: The request files, with the routing key PyBit routes each with.
REQUESTS = ["build_request_svn_buildenv.json", "build_request_apt_hook.json",
            "build_request_git_no_vcs_id.json", "build_request_retry.json"]


def wire(name):
    return (WIRE / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", REQUESTS)
def test_every_real_request_decodes_with_pybits_values(name):
    """Every build request PyBit really sends decodes, and each accessor gives the value
    written in the file."""
    text = wire(name)
    data = json.loads(text)
    request = pybit.decode_build_request(text.encode("utf-8"))
    instance = data["job"]["packageinstance"]
    build_env = instance["build_env"]
    assert request.get_job_id() == data["job"]["id"]
    assert request.get_package() == instance["package"]["name"]
    assert request.get_version() == instance["package"]["version"]
    assert request.get_arch() == instance["arch"]["name"]
    assert request.get_dist() == instance["distribution"]["name"]
    assert request.get_suite() == instance["suite"]["name"]
    assert request.get_format() == instance["format"]["name"]
    assert request.get_buildenv() == (build_env["name"] if build_env else None)
    assert request.get_buildstamp() == data["timestamp"]
    assert request.web_host == data["web_host"]
    assert request.job.client_name is None
    transport = data["transport"]
    assert (request.transport.method, request.transport.uri, request.transport.vcs_id) == (
        transport["method"], transport["uri"], transport["vcs_id"])
    request.stamp_request()
    assert isinstance(request.get_buildstamp(), int)


def test_real_cancel_request_decodes_with_the_building_client():
    """PyBit's CancelRequest carries the BuildD building the job; rbit reads it (name and
    job id) instead of rejecting it."""
    data = json.loads(wire("cancel_request.json"))
    cancel = pybit.decode_cancel_request(wire("cancel_request.json"))
    assert cancel.get_job_id() == data["job"]["id"] == 1
    assert cancel.job.buildclient == pybit.BuildD(1, "build_client_rbit1")
    assert cancel.job.client_name == "build_client_rbit1"
    assert cancel.web_host == data["web_host"]


def test_real_history_answer_is_what_the_stand_in_gives():
    """The PyBit stand-in of the tests answers GET /job/ID/status in PyBit's own shape."""
    real = json.loads(wire("job_status_history.json"))
    with FakePyBit() as web:
        web.add_job(1, *[(entry["status"], entry["buildclient"]) for entry in real])
        import requests

        answer = requests.get(f"{web.url}/job/1/status", timeout=5).json()
    assert [{k: v for k, v in entry.items() if k != "time"} for entry in answer] == [
        {k: v for k, v in entry.items() if k != "time"} for entry in real]
    assert all(set(entry) == set(real[0]) for entry in answer)


@pytest.fixture
def own_vhost():
    """A vhost of this test's own: the worker takes the real cancel body's client name."""
    made = make_vhost()
    yield made
    drop_vhost(made)


def test_real_cancel_body_stops_the_running_job(tmp_path, own_vhost):
    """A cancel from PyBit stops the running job (its process group), reports Cancelled and
    drops the message: PyBit's real CancelRequest body, published through ``pybit`` with the
    worker's name as routing key, stops a job started from PyBit's real build request."""
    request_text = wire("build_request_svn_buildenv.json")
    job_id = json.loads(request_text)["job"]["id"]
    queue, key = "Debian_i386_development_deb", "Debian.i386.development.deb"
    record = tmp_path / "runs.log"
    with FakePyBit("admin", "secret") as web:
        web.add_job(job_id)
        config = write_config(
            tmp_path / "rbit.ini", name="build_client_rbit1", vhost=own_vhost,
            runners={queue: {"runner": "python!reliability_runners:slow", "seconds": "60",
                             "child": "yes", "record": str(record)}},
            pybit={"url": web.url, "user": "admin", "password": "secret", "timeout": "2"},
        )
        with WorkerProcess(config) as worker:
            worker.wait_ready()
            own_vhost.declare_build_queue(queue, key)
            own_vhost.publish_build(request_text, key)
            assert wait_until(lambda: events(record, "child"), 20), worker.log
            job_pid = events(record, "start")[0][2]
            child_pid = int(events(record, "child")[0][4])
            own_vhost.publish_build(wire("cancel_request.json"), "build_client_rbit1")
            assert web.wait_for((job_id, statuses.CANCELLED), timeout=15), worker.log
            assert wait_until(lambda: not alive(job_pid) and not alive(child_pid), 10)
            worker.wait_log(rf"job {job_id}: hello-world .* ended Cancelled")
            assert "unknown class" not in worker.log
        assert web.statuses(job_id) == ["Waiting", "Building", "Cancelled"]
    assert own_vhost.depth(queue) == 0
    assert events(record, "end") == []
