"""Status reporting to PyBit's web front end, against FakePyBit: where statuses go, in what order,
and what happens when "PyBit's web front end is down"."""

import json
import logging
import re
import time
from types import SimpleNamespace

import pytest
import requests

from rbit.errors import UnknownStatus
from rbit.history import Answer, fetch
from rbit.pybit_http import job_url
from rbit.reporting import StatusReporter
from rbit.statuses import ALL

from .harness import WorkerProcess, wait_until
from .pybit_web import FakePyBit
from .test_worker import body_for, make_config, pybit_section, queue_for

CLIENT = "bob-villa"
FAST = {"retry_initial": 0.02, "retry_max": 0.1}


def settings(fake, **overrides):
    values = {"url": fake.url, "user": "admin", "password": "secret", "timeout": 2.0}
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture
def make_reporter():
    """StatusReporters that are stopped after the test, whatever happens."""
    made = []

    def make(pybit, **kwargs):
        reporter = StatusReporter(pybit, CLIENT, **{**FAST, **kwargs})
        made.append(reporter)
        return reporter

    yield make
    for reporter in made:
        reporter.stop(timeout=0.2)


def known(fake, *job_ids):
    """PyBit has these jobs (each Waiting), so it takes statuses for them."""
    for job_id in job_ids:
        fake.add_job(job_id)


def no_secret_logged(caplog, password="secret"):
    """The password, in clear or inside a basic-auth header, is in no log record."""
    header = "YWRtaW46c2VjcmV0"  # base64("admin:secret")
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        assert password not in text, record
        assert header not in text, record


# -- job_url ------------------------------------------------------------------


def test_job_url_uses_configured_url_or_web_host():
    """[pybit] url is the base when set (trailing slash ignored), else the request's web_host."""
    configured = SimpleNamespace(url="http://pybit.example:8080/", user=None, password=None, timeout=1)
    unset = SimpleNamespace(url=None, user=None, password=None, timeout=1)
    assert job_url(configured, "other:80", 42) == "http://pybit.example:8080/job/42"
    assert job_url(unset, "web.example:8080", 42) == "http://web.example:8080/job/42"
    assert job_url(None, "web.example:8080", 42) == "http://web.example:8080/job/42"


# -- the fake itself ----------------------------------------------------------


def test_fake_pybit_checks_auth_and_status_names(pybit_web):
    """The fake refuses bad credentials (401) and unknown statuses (500) like PyBit."""
    pybit_web.add_job(3)
    url = f"{pybit_web.url}/job/3"
    form = {"status": "Building", "client": CLIENT}
    unauthorized = requests.put(url, data=form, timeout=2)
    assert unauthorized.status_code == 401
    assert "Basic" in unauthorized.headers["WWW-Authenticate"]
    assert requests.put(url, data=form, auth=("admin", "wrong"), timeout=2).status_code == 401
    bogus = requests.put(url, data={**form, "status": "Finished"}, auth=("admin", "secret"), timeout=2)
    assert bogus.status_code == 500
    assert requests.post(url, data=form, auth=("admin", "secret"), timeout=2).status_code == 200
    assert pybit_web.reports == [(3, "Building", CLIENT)]
    history = requests.get(url + "/status", timeout=2)
    assert [entry["status"] for entry in history.json()] == ["Waiting", "Building"]
    assert requests.get(f"{pybit_web.url}/job/4/status", timeout=2).status_code == 404


#: One entry of PyBit's answer to ``GET /job/1/status``, as captured in pybit-wire/job_status_history.json.
WIRE_HISTORY_ENTRY = {"py/object": "pybit.models.JobHistory", "job_id": 1, "status": "Waiting",
                      "buildclient": "build_client_rbit1", "time": "2013-05-01 12:00:01.000123"}


def test_fake_pybit_answers_like_pybit_for_jobs_it_does_not_have(pybit_web):
    """The PyBit stand-in answers like PyBit: 500 to a status for a job it does not have (never
    created, or deleted), 404 to the status history of a job that has none, and accepts a status
    without a client."""
    auth = ("admin", "secret")
    url = f"{pybit_web.url}/job/5"
    form = {"status": "Building", "client": CLIENT}
    assert requests.put(url, data=form, auth=auth, timeout=2).status_code == 500
    assert requests.post(url, data={"status": "Building"}, auth=auth, timeout=2).status_code == 500
    assert requests.get(url + "/status", timeout=2).status_code == 404
    pybit_web.set_history(5, [])
    assert requests.get(url + "/status", timeout=2).status_code == 404  # known, but no history
    assert requests.put(url, data={"status": "Building"}, auth=auth, timeout=2).status_code == 200
    assert requests.put(url, data={"status": "Done", "client": CLIENT}, auth=auth, timeout=2).status_code == 200
    assert pybit_web.history(5) == [("Building", None), ("Done", CLIENT)]
    assert pybit_web.reports == [(5, "Building", None), (5, "Done", CLIENT)]
    pybit_web.delete_job(5)
    assert requests.put(url, data={"status": "Done", "client": CLIENT}, auth=auth, timeout=2).status_code == 500
    assert requests.get(url + "/status", timeout=2).status_code == 404
    assert pybit_web.history(5) == [] and pybit_web.statuses(5) == []


def test_fake_pybit_history_is_a_list_of_pybit_jobhistory_objects(pybit_web):
    """The PyBit stand-in's status history has the shape of PyBit's: JobHistory objects with the
    same fields in the same order, buildclient a plain string (null when no client was given),
    oldest first."""
    pybit_web.add_job(1)
    pybit_web.add_job(2, ("Waiting", "build_client_rbit1"), "Building")
    assert pybit_web.history(1) == [("Waiting", None)]
    assert pybit_web.history(2) == [("Waiting", "build_client_rbit1"), ("Building", None)]
    pybit_web.set_history(3, ["Waiting", "Blocked"])  # names only, as older tests pass them
    assert pybit_web.statuses(3) == ["Waiting", "Blocked"]
    [first, second] = requests.get(f"{pybit_web.url}/job/2/status", timeout=2).json()
    assert list(first) == list(WIRE_HISTORY_ENTRY)
    assert {key: type(value) for key, value in first.items()} == {
        key: type(value) for key, value in WIRE_HISTORY_ENTRY.items()}
    assert first["py/object"] == WIRE_HISTORY_ENTRY["py/object"]
    assert (first["job_id"], first["status"], first["buildclient"]) == (2, "Waiting", "build_client_rbit1")
    assert (second["status"], second["buildclient"]) == ("Building", None)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", first["time"])
    assert first["time"] <= second["time"]


def test_fake_pybit_stop_refuses_connections_and_start_reuses_port(pybit_web):
    """Test support: stop() really closes the port, start() listens on the same one again."""
    port = pybit_web.port
    pybit_web.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{pybit_web.url}/job/1/status", timeout=2)
    pybit_web.start()
    assert pybit_web.port == port
    assert requests.get(f"{pybit_web.url}/job/1/status", timeout=2).status_code == 404


# -- delivery -----------------------------------------------------------------


def test_statuses_arrive_in_order_with_client_name_and_auth(pybit_web, make_reporter, caplog):
    """Each status is PUT, in order, with the client's name and basic auth."""
    caplog.set_level(logging.DEBUG)
    known(pybit_web, 1, 2)
    reporter = make_reporter(settings(pybit_web))
    reporter.start()
    reporter.report(1, pybit_web.web_host, "Building", queue="cnx_any_latex_pdf")
    reporter.report(1, pybit_web.web_host, "Uploaded", "pdf ready", queue="cnx_any_latex_pdf")
    reporter.report(2, pybit_web.web_host, "Building", queue="cnx_any_latex_pdf")
    reporter.report(1, pybit_web.web_host, "Done", queue="cnx_any_latex_pdf")
    assert reporter.flush(5)
    assert pybit_web.reports == [
        (1, "Building", CLIENT), (1, "Uploaded", CLIENT), (2, "Building", CLIENT), (1, "Done", CLIENT),
    ]
    assert pybit_web.statuses(1) == ["Waiting", "Building", "Uploaded", "Done"]
    assert all(method == "PUT" and code == 200 for method, _, code in pybit_web.attempts)
    assert reporter.backlog == 0
    no_secret_logged(caplog)


def test_statuses_go_to_the_requests_web_host_when_no_url(pybit_web, make_reporter):
    """Without [pybit] url, the status goes to the BuildRequest's web_host."""
    known(pybit_web, 9)
    reporter = make_reporter(settings(pybit_web, url=None))
    reporter.start()
    reporter.report(9, pybit_web.web_host, "Building")
    assert reporter.flush(5)
    assert pybit_web.reports == [(9, "Building", CLIENT)]


def test_each_report_is_logged_with_job_queue_status_and_text(pybit_web, make_reporter, caplog):
    """Every status is logged on rbit.status with job id, queue, status and text."""
    caplog.set_level(logging.INFO, logger="rbit.status")
    reporter = make_reporter(settings(pybit_web))
    reporter.report(5, pybit_web.web_host, "Failed", "make: *** [all] Error 2", queue="cnx_any_latex_pdf")
    [record] = [r for r in caplog.records if r.name == "rbit.status"]
    assert record.levelno == logging.INFO
    message = record.getMessage()
    for part in ("5", "cnx_any_latex_pdf", "Failed", "make: *** [all] Error 2"):
        assert part in message
    assert record.args  # lazy %-style arguments


def test_unknown_status_raises_and_nothing_is_sent(pybit_web, make_reporter):
    """An unknown status raises UnknownStatus naming the allowed ones; PyBit gets nothing."""
    reporter = make_reporter(settings(pybit_web))
    reporter.start()
    with pytest.raises(UnknownStatus) as raised:
        reporter.report(1, pybit_web.web_host, "Finished")
    for name in ALL:
        assert name in str(raised.value)
    assert reporter.backlog == 0
    assert reporter.flush(1)
    time.sleep(0.1)
    assert pybit_web.attempts == []


def test_pybit_down_then_back_delivers_everything_in_order(pybit_web, make_reporter, caplog):
    """PyBit going away: statuses are retried in order, report() never blocks or raises."""
    caplog.set_level(logging.WARNING, logger="rbit.reporting")
    known(pybit_web, 7)
    reporter = make_reporter(settings(pybit_web))
    reporter.start()
    pybit_web.stop()
    began = time.monotonic()
    for status in ("Building", "Uploaded", "Done"):
        reporter.report(7, pybit_web.web_host, status, queue="q")
    assert time.monotonic() - began < 0.5  # never waits for the network
    assert not reporter.flush(0.3)
    assert reporter.backlog == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings
    assert all("7" in r.getMessage() and "Building" in r.getMessage() for r in warnings)
    pybit_web.start()
    assert reporter.flush(5)
    assert pybit_web.reports == [(7, "Building", CLIENT), (7, "Uploaded", CLIENT), (7, "Done", CLIENT)]
    assert reporter.backlog == 0
    no_secret_logged(caplog)


@pytest.mark.parametrize("code", [502, 503, 504])
def test_busy_answers_are_retried_without_asking_about_the_job(pybit_web, make_reporter, caplog, code):
    """PyBit's web front end going away: 502, 503 and 504 (a proxy, or a PyBit restarting) are
    retried with backoff, the job's later statuses waiting behind, without asking PyBit about the
    job; each failed attempt is one WARNING."""
    caplog.set_level(logging.WARNING, logger="rbit.reporting")
    known(pybit_web, 4)
    pybit_web.fail_next(2, code)
    reporter = make_reporter(settings(pybit_web))
    reporter.start()
    reporter.report(4, pybit_web.web_host, "Building", queue="q")
    reporter.report(4, pybit_web.web_host, "Done", queue="q")
    assert reporter.flush(5)
    assert pybit_web.reports == [(4, "Building", CLIENT), (4, "Done", CLIENT)]
    assert pybit_web.attempts == [("PUT", "/job/4", code)] * 2 + [("PUT", "/job/4", 200)] * 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all("job 4 " in text and "Building" in text and str(code) in text for text in warnings)


@pytest.mark.parametrize("code", [408, 429])
def test_timeout_and_too_many_requests_are_retried(pybit_web, make_reporter, code):
    """408 and 429 mean "try later": the status is retried, not dropped, without asking PyBit
    about the job."""
    known(pybit_web, 4)
    pybit_web.fail_next(1, code)
    reporter = make_reporter(settings(pybit_web))
    reporter.start()
    reporter.report(4, pybit_web.web_host, "Building")
    assert reporter.flush(5)
    assert pybit_web.reports == [(4, "Building", CLIENT)]
    assert pybit_web.attempts == [("PUT", "/job/4", code), ("PUT", "/job/4", 200)]


@pytest.mark.parametrize("code", [400, 403, 404])
def test_client_error_is_dropped_with_one_warning_and_the_job_goes_on(pybit_web, make_reporter, caplog, code):
    """A status PyBit refuses for good (a 4xx other than 408 and 429) is dropped with one warning
    line naming the job, the status and PyBit's answer; the job's next status still goes, and so
    do other jobs'."""
    caplog.set_level(logging.WARNING, logger="rbit.reporting")
    known(pybit_web, 11, 12)
    pybit_web.fail_next(1, code)
    reporter = make_reporter(settings(pybit_web))
    reporter.start()
    reporter.report(11, pybit_web.web_host, "Building", queue="q")
    reporter.report(11, pybit_web.web_host, "Done", queue="q")
    reporter.report(12, pybit_web.web_host, "Building", queue="q")
    assert reporter.flush(5)
    assert pybit_web.reports == [(11, "Done", CLIENT), (12, "Building", CLIENT)]
    assert [method for method, _, _ in pybit_web.attempts] == ["PUT"] * 3  # no question asked
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.levelno == logging.WARNING
    for part in ("job 11 ", "status Building", f"HTTP {code}"):
        assert part in warning.getMessage()
    assert reporter.backlog == 0


def test_wrong_password_is_dropped_and_never_logged(pybit_web, make_reporter, caplog):
    """A 401 is a refusal for good: dropped with a warning, the job goes on; the password appears
    in no log record."""
    caplog.set_level(logging.DEBUG)
    known(pybit_web, 1)
    reporter = make_reporter(settings(pybit_web, password="wrong-secret"))
    reporter.start()
    reporter.report(1, pybit_web.web_host, "Building")
    assert reporter.flush(5)
    assert pybit_web.reports == []
    assert any(r.levelno == logging.WARNING and "401" in r.getMessage() for r in caplog.records)
    no_secret_logged(caplog, password="wrong-secret")


def test_password_never_logged_on_errors(pybit_web, make_reporter, caplog):
    """Passwords never appear in logs, whatever goes wrong while reporting."""
    caplog.set_level(logging.DEBUG)
    known(pybit_web, 1, 2, 3)
    reporter = make_reporter(settings(pybit_web))
    reporter.start()
    pybit_web.fail_next(1, 500)
    pybit_web.fail_next(1, 403)
    reporter.report(1, pybit_web.web_host, "Building", "a runner's text")
    reporter.report(2, pybit_web.web_host, "Building")
    assert reporter.flush(5)
    pybit_web.stop()
    reporter.report(3, pybit_web.web_host, "Building")
    assert not reporter.flush(0.2)
    assert fetch(settings(pybit_web), pybit_web.web_host, 3) is Answer.UNAVAILABLE
    pybit_web.start()
    assert reporter.flush(5)
    assert [r.levelname for r in caplog.records if r.levelno >= logging.WARNING]
    no_secret_logged(caplog)


def test_password_in_url_or_in_an_error_is_never_logged(pybit_web, make_reporter, caplog):
    """A password written into [pybit] url, or turning up in an error text, is not logged."""
    caplog.set_level(logging.DEBUG, logger="rbit")
    known(pybit_web, 1, 2)
    in_url = settings(pybit_web, url=f"http://admin:secret@{pybit_web.web_host}", user=None, password=None)
    reporter = make_reporter(in_url)
    reporter.start()
    reporter.report(1, pybit_web.web_host, "Building")
    assert reporter.flush(5)
    assert pybit_web.reports == [(1, "Building", CLIENT)]
    pybit_web.stop()
    reporter.report(1, pybit_web.web_host, "Done")
    assert not reporter.flush(0.2)
    assert fetch(in_url, pybit_web.web_host, 1) is Answer.UNAVAILABLE
    reporter.stop(timeout=0)
    no_secret_logged(caplog)

    caplog.clear()
    odd = make_reporter(settings(pybit_web, password="refused"))  # in "Connection refused"
    odd.start()
    odd.report(2, pybit_web.web_host, "Building")
    assert not odd.flush(0.1)
    assert caplog.records
    for record in caplog.records:
        assert "refused" not in record.getMessage()


def test_no_pybit_section_only_logs(pybit_web, make_reporter, caplog):
    """Without [pybit], statuses are logged and never sent."""
    caplog.set_level(logging.INFO, logger="rbit.status")
    reporter = make_reporter(None)
    reporter.start()
    reporter.report(1, pybit_web.web_host, "Building", queue="q")
    reporter.report(1, pybit_web.web_host, "Done", queue="q")
    assert reporter.flush(1)
    assert reporter.backlog == 0
    time.sleep(0.1)
    assert pybit_web.attempts == []
    messages = [r.getMessage() for r in caplog.records if r.name == "rbit.status"]
    assert len(messages) == 2 and "Building" in messages[0] and "Done" in messages[1]
    with pytest.raises(UnknownStatus):
        reporter.report(1, pybit_web.web_host, "Finished")


def test_stop_delivers_what_is_queued(pybit_web, make_reporter):
    """On SIGTERM, stop() delivers what is queued before ending the thread."""
    known(pybit_web, 1, 2, 3, 4, 5)
    reporter = make_reporter(settings(pybit_web))
    reporter.start()
    for job in range(1, 6):
        reporter.report(job, pybit_web.web_host, "Waiting")
    reporter.stop(timeout=5)
    assert [r.job_id for r in pybit_web.reports] == [1, 2, 3, 4, 5]


def test_stop_returns_in_time_when_pybit_is_down(pybit_web, make_reporter):
    """A PyBit that is down never holds up the worker's stop beyond its timeout."""
    reporter = make_reporter(settings(pybit_web), retry_initial=0.5, retry_max=5)
    reporter.start()
    pybit_web.stop()
    reporter.report(1, pybit_web.web_host, "Waiting")
    began = time.monotonic()
    reporter.stop(timeout=0.3)
    assert time.monotonic() - began < 1.5
    assert reporter.backlog == 1


# -- the spool ----------------------------------------------------------------


def test_spool_survives_a_restart_in_order(pybit_web, make_reporter, tmp_path):
    """Statuses PyBit could not take are kept across a worker restart, then sent first, in order."""
    spool = tmp_path / "state" / "statuses.jsonl"  # parent made on demand
    known(pybit_web, 1, 2)
    first = make_reporter(settings(pybit_web), spool_path=spool)
    first.start()
    pybit_web.stop()
    first.report(1, pybit_web.web_host, "Building", queue="q")
    first.report(1, pybit_web.web_host, "Done", queue="q")
    first.report(2, pybit_web.web_host, "Building", queue="q")
    first.stop(timeout=0.2)
    assert len(spool.read_text().splitlines()) == 3

    pybit_web.start()
    second = make_reporter(settings(pybit_web), spool_path=spool)
    second.report(2, pybit_web.web_host, "Done", queue="q")  # before start: still after the spooled ones
    assert second.backlog == 4
    second.start()
    assert second.flush(5)
    assert pybit_web.reports == [
        (1, "Building", CLIENT), (1, "Done", CLIENT), (2, "Building", CLIENT), (2, "Done", CLIENT),
    ]
    assert spool.read_text() == ""


def test_spool_skips_corrupt_lines(pybit_web, make_reporter, tmp_path, caplog):
    """A damaged spool line (a crash mid-write, say) is logged and skipped; the rest is sent."""
    caplog.set_level(logging.ERROR, logger="rbit.reporting")
    spool = tmp_path / "statuses.jsonl"
    known(pybit_web, 1)
    good = {"job_id": 1, "web_host": pybit_web.web_host, "text": None, "queue": "q"}
    spool.write_text(
        json.dumps({**good, "status": "Building"}) + "\n"
        + "{not json\n"
        + json.dumps({**good, "status": "Finished"}) + "\n"
        + json.dumps({**good, "status": "Done"}) + "\n"
        + '{"job_id": 1, "stat'
    )
    reporter = make_reporter(settings(pybit_web), spool_path=spool)
    reporter.start()
    assert reporter.flush(5)
    assert pybit_web.reports == [(1, "Building", CLIENT), (1, "Done", CLIENT)]
    assert len([r for r in caplog.records if "spool" in r.getMessage()]) == 3


def test_spool_is_emptied_once_delivered(pybit_web, make_reporter, tmp_path):
    """Delivered statuses leave the spool, so a restart does not send them again."""
    spool = tmp_path / "statuses.jsonl"
    known(pybit_web, 1)
    reporter = make_reporter(settings(pybit_web), spool_path=spool)
    reporter.start()
    reporter.report(1, pybit_web.web_host, "Building")
    assert reporter.flush(5)
    reporter.stop()
    again = make_reporter(settings(pybit_web), spool_path=spool)
    again.start()
    assert again.flush(1)
    assert pybit_web.reports == [(1, "Building", CLIENT)]


# -- one job's status never holds back another's ------------------------------

#: The reporter's own backoff (first retry after 1 s), so that a status retried
#: ahead of the others would hold them back for more than a second.
DEFAULT_RETRY = {"retry_initial": 1.0, "retry_max": 60.0}


def warnings_about(caplog, job_id):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and f"job {job_id} " in r.getMessage()]


def test_status_of_a_job_deleted_in_pybit_is_dropped_and_holds_back_no_other_job(
        pybit_web, make_reporter, caplog):
    """What happens to a job deleted in PyBit: PyBit answers 500 to its status and 404 to its
    status history, so the status is dropped with one warning line naming the job, the status and
    PyBit's answer; another job's statuses, reported after it, arrive in order and at once."""
    caplog.set_level(logging.DEBUG)
    pybit_web.add_job(1)
    pybit_web.delete_job(1)  # deleted in PyBit's web UI while Waiting
    known(pybit_web, 2)
    reporter = make_reporter(settings(pybit_web), **DEFAULT_RETRY)
    reporter.start()
    began = time.monotonic()
    reporter.report(1, pybit_web.web_host, "Building", queue="q")
    reporter.report(2, pybit_web.web_host, "Building", queue="q")
    reporter.report(2, pybit_web.web_host, "Done", queue="q")
    assert pybit_web.wait_for((2, "Done"), timeout=2)
    assert time.monotonic() - began < 1.0
    assert reporter.flush(1)
    assert pybit_web.reports == [(2, "Building", CLIENT), (2, "Done", CLIENT)]
    assert pybit_web.statuses(2) == ["Waiting", "Building", "Done"]
    assert [(m, path, code) for m, path, code in pybit_web.attempts if "/job/1" in path] == [
        ("PUT", "/job/1", 500), ("GET", "/job/1/status", 404)]
    [warning] = warnings_about(caplog, 1)
    assert warning.levelno == logging.WARNING
    for part in ("status Building", "dropped", "HTTP 500", "/job/1/status answers 404"):
        assert part in warning.getMessage()
    assert warnings_about(caplog, 2) == []
    assert reporter.backlog == 0
    no_secret_logged(caplog)


def test_server_error_for_a_job_pybit_still_has_is_retried_until_it_succeeds(
        pybit_web, make_reporter, caplog):
    """A 5xx for a job PyBit still knows (its status history answers 200), or whose history
    cannot be read, stays retried with backoff until PyBit takes the status; one warning per
    failed attempt."""
    caplog.set_level(logging.WARNING, logger="rbit.reporting")
    known(pybit_web, 4)
    pybit_web.fail_next(3, 500)
    pybit_web.fail_next(1, 500, methods=("GET",))
    reporter = make_reporter(settings(pybit_web))
    reporter.start()
    reporter.report(4, pybit_web.web_host, "Building", queue="q")
    reporter.report(4, pybit_web.web_host, "Done", queue="q")
    assert reporter.flush(5)
    assert pybit_web.reports == [(4, "Building", CLIENT), (4, "Done", CLIENT)]
    assert pybit_web.attempts == [
        ("PUT", "/job/4", 500), ("GET", "/job/4/status", 500),
        ("PUT", "/job/4", 500), ("GET", "/job/4/status", 200),
        ("PUT", "/job/4", 500), ("GET", "/job/4/status", 200),
        ("PUT", "/job/4", 200), ("PUT", "/job/4", 200),
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 3
    assert all("status Building not delivered" in text and "HTTP 500" in text for text in warnings)


def test_order_is_kept_per_job_while_another_job_is_in_backoff(pybit_web, make_reporter):
    """Statuses keep their order per job, never across jobs: while one job's statuses wait for a
    PyBit that refuses connections, another job's go through in order, and the first job's arrive
    in their own order once its PyBit is back."""
    other = FakePyBit("admin", "secret").start()  # the first job's PyBit: its port, closed
    other.stop()
    try:
        other.add_job(1)
        known(pybit_web, 2)
        reporter = make_reporter(settings(pybit_web, url=None), retry_initial=0.1, retry_max=0.2)
        reporter.start()
        reporter.report(1, other.web_host, "Building")
        reporter.report(2, pybit_web.web_host, "Building")
        reporter.report(1, other.web_host, "Uploaded")
        reporter.report(2, pybit_web.web_host, "Uploaded")
        reporter.report(1, other.web_host, "Done")
        reporter.report(2, pybit_web.web_host, "Done")
        assert pybit_web.wait_for((2, "Done"), timeout=2)
        assert pybit_web.statuses(2) == ["Waiting", "Building", "Uploaded", "Done"]
        # PyBit records job 2's Done before it answers; the reporter counts it delivered after.
        assert wait_until(lambda: reporter.backlog == 3, timeout=2)
        time.sleep(0.5)  # several attempts for job 1, none of its later statuses before its first
        other.start()
        assert reporter.flush(5)
        assert other.reports == [(1, "Building", CLIENT), (1, "Uploaded", CLIENT), (1, "Done", CLIENT)]
        assert [report.job_id for report in pybit_web.reports] == [2, 2, 2]
    finally:
        other.stop()


def test_restart_with_a_spool_never_lets_a_deleted_job_hold_back_others(
        pybit_web, make_reporter, tmp_path, caplog):
    """Across a restart with a spool: the statuses a stopped worker could not deliver go first in
    their jobs; those of a job deleted in PyBit meanwhile are dropped with one warning each, and
    the other jobs' arrive in order at once; the spool ends empty."""
    spool = tmp_path / "statuses.jsonl"
    known(pybit_web, 1, 2)
    first = make_reporter(settings(pybit_web), spool_path=spool, **DEFAULT_RETRY)
    first.start()
    pybit_web.stop()
    first.report(1, pybit_web.web_host, "Building", queue="q")
    first.report(2, pybit_web.web_host, "Building", queue="q")
    first.report(1, pybit_web.web_host, "Done", queue="q")
    first.report(2, pybit_web.web_host, "Done", queue="q")
    first.stop(timeout=0.2)
    assert len(spool.read_text().splitlines()) == 4

    pybit_web.delete_job(1)
    pybit_web.start()
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="rbit.reporting")
    second = make_reporter(settings(pybit_web), spool_path=spool, **DEFAULT_RETRY)
    began = time.monotonic()
    second.start()
    assert second.flush(2)
    assert time.monotonic() - began < 1.0
    assert pybit_web.reports == [(2, "Building", CLIENT), (2, "Done", CLIENT)]
    dropped = [r.getMessage() for r in warnings_about(caplog, 1)]
    assert len(dropped) == 2
    assert "status Building dropped" in dropped[0] and "status Done dropped" in dropped[1]
    assert all("HTTP 500" in text and "answers 404" in text for text in dropped)
    assert spool.read_text() == ""


def test_worker_restart_with_state_dir_drops_a_deleted_jobs_statuses_and_delivers_the_rest(
        tmp_path, vhost, unique, pybit_web):
    """A worker with state_dir that ran two jobs while PyBit was down keeps their statuses across
    a restart; the restarted worker drops those of the job deleted in PyBit meanwhile, with one
    warning each, delivers the other job's in order at once, and empties its spool."""
    state = tmp_path / "state"
    path, _ = make_config(tmp_path, vhost, unique, pybit=pybit_section(pybit_web),
                          rbit_keys={"state_dir": str(state)})
    queue, key = queue_for(unique)
    pybit_web.add_job(301)
    pybit_web.add_job(302)
    pybit_web.stop()
    with WorkerProcess(path) as worker:
        worker.wait_ready(timeout=20)
        vhost.publish_build(body_for(302, unique, package="plain-x"), key)
        worker.wait_log(r"job 302: .* ended Done")
        vhost.publish_build(body_for(301, unique, package="uploaded-x"), key)
        worker.wait_log(r"job 301: .* ended Done")
    spool = state / f"w{unique}.statuses.jsonl"
    assert [json.loads(line)["job_id"] for line in spool.read_text().splitlines()] == [302, 302, 301, 301, 301]

    pybit_web.delete_job(302)
    pybit_web.start()
    with WorkerProcess(path) as worker:
        worker.wait_ready(timeout=20)
        assert pybit_web.wait_for((301, "Done"), timeout=3), worker.log[-3000:]
        assert wait_until(lambda: spool.read_text() == "", timeout=3)
    assert pybit_web.reports == [(301, "Building", f"w{unique}"), (301, "Uploaded", f"w{unique}"),
                                 (301, "Done", f"w{unique}")]
    for status in ("Building", "Done"):
        assert len(re.findall(rf"WARNING rbit\.reporting: job 302 queue {re.escape(queue)}: "
                              rf"status {status} dropped: .*HTTP 500.*answers 404", worker.log)) == 1
    assert pybit_web.password not in worker.log
