"""A real HTTP server that plays PyBit's web front end in tests: it takes status reports and
answers a job's history (``GET /job/ID/status``) as PyBit does."""

from __future__ import annotations

import base64
import json
import re
import threading
from collections import namedtuple
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import parse_qs

import pytest

from rbit import statuses

from .harness import wait_until

#: One status report as the fake received it.
Report = namedtuple("Report", "job_id status client")

#: One HTTP request as the fake answered it (failed ones included).
Attempt = namedtuple("Attempt", "method path code")

_JOB = re.compile(r"^/job/(\d+)/?$")
_JOB_STATUS = re.compile(r"^/job/(\d+)/status/?$")


class FakePyBit:
    """PyBit's web front end, as far as a build client sees it, answering as PyBit does.

    PyBit knows only the jobs a test adds (``add_job``, ``set_history``) and
    has not deleted (``delete_job``). ``PUT``/``POST /job/<id>`` (form fields
    ``status`` and ``client``, basic auth when created with credentials)
    records a status for a known job; ``client`` may be missing. For a job
    PyBit does not have it answers 500, as PyBit's database code fails.
    ``GET /job/<id>/status`` returns the job's history as a JSON list of
    ``pybit.models.JobHistory`` objects, oldest first; 404 when the job has no
    history. ``stop()`` and ``start()`` really close and reopen the port.
    """

    def __init__(self, user: str | None = None, password: str | None = None, *,
                 port: int = 0, host: str = "127.0.0.1"):
        self.user = user
        self.password = password
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._reports: list[Report] = []
        self._attempts: list[Attempt] = []
        self._jobs: dict[int, list[dict]] = {}  # the jobs PyBit has, each with its history
        self._failures: list[tuple[int, tuple[str, ...]]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- running -----------------------------------------------------------

    def start(self) -> FakePyBit:
        """Listen (again) on the same port; a no-op when already listening."""
        if self._server is not None:
            return self
        server = _Server((self.host, self.port), _Handler)
        server.fake = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-pybit-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: clients get "connection refused" until ``start()``."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self._thread.join(5)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> FakePyBit:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- what tests look at ------------------------------------------------

    @property
    def web_host(self) -> str:
        """``host:port``, as in a BuildRequest's ``web_host``."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The base URL, as in ``[pybit] url``."""
        return f"http://{self.web_host}"

    @property
    def reports(self) -> list[Report]:
        """Every accepted status report, in arrival order (a copy)."""
        with self._lock:
            return list(self._reports)

    @property
    def attempts(self) -> list[Attempt]:
        """Every request answered, failures included, in arrival order (a copy)."""
        with self._lock:
            return list(self._attempts)

    def statuses(self, job_id: int) -> list[str]:
        """The job's status names, oldest first ([] for an unknown job)."""
        return [status for status, _ in self.history(job_id)]

    def history(self, job_id: int) -> list[tuple[str, str | None]]:
        """The job's ``(status, buildclient)`` pairs, oldest first ([] for an unknown job)."""
        with self._lock:
            return [(entry["status"], entry["buildclient"]) for entry in self._jobs.get(int(job_id), [])]

    def add_job(self, job_id: int, *entries) -> None:
        """PyBit has the job, with history *entries* (default ``Waiting``, as PyBit creates it).

        Each entry is a status name or a ``(status, buildclient)`` pair.
        """
        self.set_history(job_id, entries or (statuses.WAITING,))

    def set_history(self, job_id: int, entries) -> None:
        """PyBit has the job, with exactly the history *entries* (oldest first; see add_job)."""
        job_id = int(job_id)
        made = [_entry(job_id, *((entry, None) if isinstance(entry, str) else entry))
                for entry in entries]
        with self._lock:
            self._jobs[job_id] = made

    def delete_job(self, job_id: int) -> None:
        """PyBit no longer has the job (deleted in its web UI): PUT answers 500, GET 404."""
        with self._lock:
            self._jobs.pop(int(job_id), None)

    def fail_next(self, n: int, code: int = 500, *, methods=("PUT", "POST")) -> None:
        """Answer the next *n* requests with one of *methods* with HTTP *code*."""
        with self._lock:
            self._failures.extend([(code, tuple(m.upper() for m in methods))] * n)

    def wait_for(self, condition, timeout: float = 5.0) -> bool:
        """Poll until *condition* holds; False if it did not within *timeout*.

        *condition* is a callable, or ``(job_id, status)``: the job has been
        reported with that status (the history a test gave the job does not count).
        """
        if callable(condition):
            predicate = condition
        else:
            job_id, status = int(condition[0]), condition[1]
            def predicate():
                return any(report.job_id == job_id and report.status == status
                           for report in self.reports)
        return wait_until(predicate, timeout, interval=0.01)

    def settings(self, *, use_url: bool = True, **overrides):
        """``[pybit]`` settings pointing at this fake (rbit.config's class if it exists)."""
        values = {"url": self.url if use_url else None, "user": self.user,
                  "password": self.password, "timeout": 2.0}
        values.update(overrides)
        try:
            from rbit.config import PybitSettings
        except ImportError:
            return SimpleNamespace(**values)
        return PybitSettings(**values)

    # -- called by the handler ---------------------------------------------

    def _take_failure(self, method: str) -> int | None:
        with self._lock:
            for index, (code, methods) in enumerate(self._failures):
                if method in methods:
                    del self._failures[index]
                    return code
        return None

    def _authorized(self, header: str | None) -> bool:
        if self.user is None and self.password is None:
            return True
        expected = base64.b64encode(f"{self.user}:{self.password or ''}".encode()).decode()
        return header == f"Basic {expected}"

    def _record(self, method: str, path: str, code: int, report: Report | None = None) -> None:
        with self._lock:
            self._attempts.append(Attempt(method, path, code))
            if report is not None:
                self._reports.append(report)
                history = self._jobs.get(report.job_id)
                if history is not None:  # unless deleted since the handler looked
                    history.append(_entry(report.job_id, report.status, report.client))

    def _knows(self, job_id: int) -> bool:
        with self._lock:
            return job_id in self._jobs

    def _history_of(self, job_id: int) -> list[dict] | None:
        """The JSON body of ``GET /job/<id>/status``; None (404) when the job has no history."""
        with self._lock:
            history = self._jobs.get(job_id)
            return [dict(entry) for entry in history] if history else None


def _entry(job_id: int, status: str, buildclient: str | None) -> dict:
    """One ``pybit.models.JobHistory``, as jsonpickle writes it (see pybit-wire/job_status_history.json)."""
    return {"py/object": "pybit.models.JobHistory", "job_id": job_id, "status": status,
            "buildclient": buildclient, "time": datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")}


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    fake: FakePyBit


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so stop() leaves no open connection behind.
    protocol_version = "HTTP/1.0"
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - quiet in tests
        pass

    def do_GET(self):
        fake = self.server.fake
        match = _JOB_STATUS.match(self.path)
        if not match:
            return self._answer(404, "not found")
        failure = fake._take_failure("GET")
        if failure is not None:
            return self._answer(failure, "failing on purpose")
        history = fake._history_of(int(match.group(1)))
        if history is None:
            return self._answer(404, "no such job")
        self._answer(200, json.dumps(history), "application/json")

    def do_PUT(self):
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace")
        match = _JOB.match(self.path)
        if not match:
            return self._answer(404, "not found")
        if not fake._authorized(self.headers.get("Authorization")):
            return self._answer(401, "authentication required",
                                headers={"WWW-Authenticate": 'Basic realm="pybit"'})
        failure = fake._take_failure(self.command)
        if failure is not None:
            return self._answer(failure, "failing on purpose")
        form = parse_qs(body, keep_blank_values=True)
        status = form.get("status", [None])[0]
        client = form.get("client", [None])[0]
        if status not in statuses.ALL:
            # PyBit's insert into its status table fails on an unknown name.
            return self._answer(500, f"unknown status {status!r}")
        job_id = int(match.group(1))
        if not fake._knows(job_id):
            # PyBit's database code fails on a job it does not have: 500, not 404.
            return self._answer(500, "Internal Server Error")
        self._answer(200, "ok", report=Report(job_id, status, client or None))

    do_POST = do_PUT

    def _answer(self, code, text, content_type="text/plain", *, headers=None, report=None):
        self.server.fake._record(self.command, self.path, code, report)
        payload = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def pybit_web():
    """A started FakePyBit with user ``admin`` and password ``secret``; stopped after."""
    with FakePyBit("admin", "secret") as fake:
        yield fake
