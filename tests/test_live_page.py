"""The live page on [rbit] http: ``/jobs``, ``/jobs/ID/log`` (whole, from
an offset, followed), read-only and on the configured address only, and ``/`` in a real headless
browser (Debian's chromium, driven by Playwright, under the page's own Content-Security-Policy): new lines show without a reload, finished jobs
are listed with their outcome, and hostile text is shown as text and runs nothing.

The browser tests fail, never skip, when chromium is missing (CI installs it). With
RBIT_SCREENSHOT=1 the page test writes docs/live-page.png for the README.
"""

import http.client
import json
import os
import re
import shutil
import socket
import time

import pytest
from playwright.sync_api import expect

from .harness import ROOT, wait_until
from .test_job_logs import Rig
from .test_metrics import free_port

#: Chromium's switches for a quiet, headless run in a container (no sandbox: tests run as root).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

#: The issue's bound: a line a running job writes shows on the page within this many seconds.
LIVE_WITHIN_MS = 2000

#: A log line and request fields that would run script if a page ever treated them as HTML.
HOSTILE_LINE = "<script>window.pwned = 'log line'</script><img src=x onerror=\"window.pwned = 'log img'\">"
HOSTILE_PACKAGE = "<img src=x onerror=\"window.pwned = 'package'\">"
HOSTILE_VERSION = "<script>window.pwned = 'version'</script>"


class PageRig(Rig):
    """A worker with [rbit] http on a free port, running the gated runner."""

    def __init__(self, tmp_path, vhost, unique, **settings):
        self.port = free_port()
        super().__init__(tmp_path, vhost, unique, "gated", rbit_keys={"http": f"127.0.0.1:{self.port}"},
                         **settings)
        self.base = f"http://127.0.0.1:{self.port}"

    def get(self, path, method="GET"):
        """(status, headers, body) of a request to the worker."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path)
            answer = connection.getresponse()
            return answer.status, answer.headers, answer.read()
        finally:
            connection.close()

    def jobs(self):
        return json.loads(self.get("/jobs")[2])

    def release(self, name):
        (self.tmp_path / name).touch()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless chromium (Debian's, never one Playwright downloads) with a fresh profile."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed (apt-get install chromium): the live page's tests need it")
    from playwright.sync_api import sync_playwright  # the test extra installs it

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=chromium, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1100, "height": 760})
        yield context
        context.close()


@pytest.fixture
def page(browser):
    """A new tab; any dialog (alert, confirm) a page opens fails the test."""
    tab = browser.new_page()
    dialogs = []
    tab.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    yield tab
    tab.close()
    assert dialogs == [], f"the page opened dialogs: {dialogs}"


# -- The API --------------------------------------------------------------------------


def test_jobs_and_log_api(tmp_path, vhost, unique):
    """/jobs gives the worker, its broker, each running job (id, package, version, queue, slot,
    elapsed, last status, log) and the finished ones (outcome, duration); /jobs/ID/log the whole
    log as text/plain, and ?offset=N from byte N, with the offset to ask for next."""
    rig = PageRig(tmp_path, vhost, unique)
    with rig.worker() as worker:
        worker.wait_ready()
        rig.publish(801, package="hello", version="2.0")
        assert wait_until(lambda: rig.jobs()["running"] and rig.jobs()["running"][0]["status"] == "Building", 20)
        state = rig.jobs()
        assert (state["worker"], state["broker"], state["broker_address"]) == (f"jl{unique}", "connected",
                                                                               "127.0.0.1:5672")
        (job,) = state["running"]
        assert {key: job[key] for key in ("id", "package", "version", "queue", "slot", "status", "attempt", "log")} == {
            "id": 801, "package": "hello", "version": "2.0", "queue": rig.queue, "slot": 0, "status": "Building",
            "attempt": 1, "log": "/jobs/801/log"}
        assert job["elapsed"] >= 0 and state["finished"] == []

        assert wait_until(lambda: b"job 801 is waiting\n" in rig.get("/jobs/801/log")[2])
        code, headers, body = rig.get("/jobs/801/log")
        assert code == 200 and headers["Content-Type"] == "text/plain; charset=utf-8"
        assert headers["X-Content-Type-Options"] == "nosniff" and "default-src 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Rbit-Job"] == "running" and int(headers["X-Rbit-Log-Offset"]) == len(body)
        offset = len(body)
        rig.release("go-1")
        assert wait_until(lambda: rig.get(f"/jobs/801/log?offset={offset}")[2] == b"line 1 of job 801\n")
        code, headers, rest = rig.get(f"/jobs/801/log?offset={offset}")
        assert int(headers["X-Rbit-Log-Offset"]) == offset + len(rest)

        rig.release("end")
        worker.wait_log(r"job 801: .* ended Done")
        assert wait_until(lambda: rig.jobs()["finished"], 10)
        (done,) = rig.jobs()["finished"]
        assert (done["id"], done["outcome"], done["package"], done["version"]) == (801, "Done", "hello", "2.0")
        assert done["duration"] > 0 and done["log"] == "/jobs/801/log"
        code, headers, whole = rig.get("/jobs/801/log")
        assert headers["X-Rbit-Job"] == "ended" and whole == rig.log(801).encode()
        assert rig.get("/jobs/802/log")[0] == 404
        assert rig.get("/jobs/801/log?offset=-1")[0] == 400


def test_a_followed_log_streams_until_the_job_ends(tmp_path, vhost, unique):
    """/jobs/ID/log?follow=1 sends the log, then each new line as it is written, and ends with the
    job (curl -N shows it live)."""
    rig = PageRig(tmp_path, vhost, unique)
    with rig.worker() as worker:
        worker.wait_ready()
        rig.publish(811)
        assert wait_until(lambda: rig.get("/jobs/811/log")[0] == 200, 20)
        connection = http.client.HTTPConnection("127.0.0.1", rig.port, timeout=20)
        connection.request("GET", "/jobs/811/log?follow=1")
        answer = connection.getresponse()
        seen = b""

        def until(text):
            nonlocal seen
            while text not in seen:
                chunk = answer.read1(65536)
                assert chunk, seen
                seen += chunk

        until(b"job 811 is waiting\n")
        for n in (1, 2):
            rig.release(f"go-{n}")
            until(f"line {n} of job 811\n".encode())
        rig.release("end")
        until(b"ended Done")
        seen += answer.read()  # the stream ends with the job
        connection.close()
    assert seen == rig.log(811).encode()


def test_the_page_and_api_are_read_only_and_on_the_configured_address_only(tmp_path, vhost, unique):
    """Read-only: POST, PUT and DELETE are refused; the server listens on [rbit] http's address
    alone (127.0.0.1 here: another loopback address is refused)."""
    rig = PageRig(tmp_path, vhost, unique)
    with rig.worker() as worker:
        worker.wait_ready()
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            assert rig.get("/jobs", method)[0] == 501, method
        assert rig.get("/")[0] == 200
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", rig.port), timeout=5).close()
        worker.wait_log(r"serving the live page, /jobs, /healthz and /metrics on http://127\.0\.0\.1:\d+")


# -- In a browser ----------------------------------------------------------------------


def test_page_shows_new_lines_live_and_finished_jobs_with_their_outcome(tmp_path, vhost, unique, page):
    """The page, with no reload: the worker's name and broker connection; a running job (id,
    package, version, queue, slot, elapsed, last status) whose new line shows within 2 s of being
    written; finished jobs with their outcome, duration and a link to the log."""
    rig = PageRig(tmp_path, vhost, unique)
    with rig.worker() as worker:
        worker.wait_ready()
        rig.publish(821, package="libfoo", version="1.2-1")
        rig.publish(822, package="fail-bar", version="0.9")
        rig.release("end-821")
        rig.release("end-822")
        worker.wait_log(r"job 822: .* ended Failed")
        page.goto(rig.base + "/")
        page.wait_for_selector('#finished tr[data-job="822"]')
        rig.publish(823, package="hello", version="2.0-3")
        box = page.wait_for_selector('.job[data-job="823"]')
        assert page.text_content("#worker") == f"jl{unique}"
        assert page.text_content("#broker").startswith("connected to the broker at 127.0.0.1:5672")
        expect(page.locator('.job[data-job="823"] pre')).to_contain_text("job 823 is waiting")
        expect(page.locator('.job[data-job="823"] .facts')).to_contain_text("status Building")
        facts = box.text_content()
        for part in ("job 823", "package hello", "version 2.0-3", f"queue {rig.queue}", "slot 0", "elapsed"):
            assert part in facts, facts
        for n in (1, 2, 3):
            rig.release(f"go-{n}")
            started = time.monotonic()
            expect(page.locator('.job[data-job="823"] pre')).to_contain_text(f"line {n} of job 823",
                                                                            timeout=LIVE_WITHIN_MS)
            assert time.monotonic() - started < LIVE_WITHIN_MS / 1000
        if os.environ.get("RBIT_SCREENSHOT"):
            (ROOT / "docs").mkdir(exist_ok=True)
            page.set_viewport_size({"width": 1100, "height": 420})
            page.screenshot(path=str(ROOT / "docs" / "live-page.png"), full_page=True)
        rig.release("end-823")
        row = page.wait_for_selector('#finished tr[data-job="823"]')
        assert page.locator('.job[data-job="823"]').count() == 0
        cells = [cell.text_content() for cell in row.query_selector_all("td")]
        assert cells[:4] == ["823", "hello", "2.0-3", "Done"] and re.match(r"[0-9.]+ s$", cells[4])
        assert row.query_selector("a").get_attribute("href") == "/jobs/823/log"
        failed = [cell.text_content() for cell in page.query_selector_all('#finished tr[data-job="822"] td')]
        assert failed[:4] == ["822", "fail-bar", "0.9", "Failed"]
        assert [r.get_attribute("data-job") for r in page.query_selector_all("#finished tbody tr")] == ["823", "822", "821"]


def test_hostile_log_lines_and_package_names_are_shown_as_text_and_run_nothing(tmp_path, vhost, unique, page):
    """Safe to open: a log line with <script> and <img onerror>, a package name and a version made
    of HTML show literally, on the page and as the log itself, and no script of theirs runs."""
    rig = PageRig(tmp_path, vhost, unique, line=HOSTILE_LINE)
    with rig.worker() as worker:
        worker.wait_ready()
        page.goto(rig.base + "/")
        rig.publish(831, package=HOSTILE_PACKAGE, version=HOSTILE_VERSION)
        expect(page.locator('.job[data-job="831"] pre')).to_contain_text("job 831 is waiting")
        pre = page.text_content('.job[data-job="831"] pre')
        assert HOSTILE_LINE + "\n" in pre
        facts = page.text_content('.job[data-job="831"] .facts')
        assert f"package {HOSTILE_PACKAGE}" in facts and f"version {HOSTILE_VERSION}" in facts
        rig.release("end")
        row = page.wait_for_selector('#finished tr[data-job="831"]')
        assert [cell.text_content() for cell in row.query_selector_all("td")][1:3] == [HOSTILE_PACKAGE, HOSTILE_VERSION]
        assert page.evaluate("window.pwned") is None
        assert page.locator("img").count() == 0
        assert page.evaluate("Array.from(document.scripts, s => s.src)") == [rig.base + "/page.js"]
        page.goto(rig.base + "/jobs/831/log")
        assert page.evaluate("document.contentType") == "text/plain"
        assert HOSTILE_LINE in page.text_content("body")
        assert page.evaluate("window.pwned") is None and page.locator("img").count() == 0
