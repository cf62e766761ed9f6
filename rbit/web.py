"""The worker's live page: ``/`` (HTML), ``/jobs`` (JSON) and ``/jobs/ID/log`` (text, or followed live).

Read-only. The server's threads read a :class:`Board` that the worker's loop
updates under a lock, and the job logs (:class:`rbit.JobLog` reads are
thread-safe). Everything that comes from a message or a build is served as
data (JSON, ``text/plain``) and the page inserts it as text, under a
Content-Security-Policy that allows only rbit's own script and style.
"""

from __future__ import annotations

import collections
import importlib.resources
import json
import re
import threading
import time
from urllib.parse import parse_qs, urlsplit

from .joblog import JobLog
from .logdir import attempt_path, read_file

#: Finished jobs the page lists.
RECENT = 50

#: Seconds between two looks at a followed log that has nothing new.
FOLLOW_POLL = 0.25

#: Bytes read from a log at once.
CHUNK = 1 << 20

#: Headers on every answer: only rbit's own files run, nothing is sniffed, nothing is framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

#: The page's files (package data in rbit/static), by path.
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/page.css": ("page.css", "text/css; charset=utf-8"),
}

TEXT = "text/plain; charset=utf-8"

_LOG_PATH = re.compile(r"^/jobs/(\d{1,18})/log$")


class Board:
    """The running and recently finished jobs of one worker, as the page shows them."""

    def __init__(self, name: str, log_dir, recent: int = RECENT):
        self.name = name
        self.log_dir = log_dir
        self.lock = threading.Lock()
        #: ``host:port`` of the broker while connected (set by the worker's loop).
        self.broker_address: str | None = None
        self._running: dict[int, dict] = {}
        self._finished: collections.deque = collections.deque(maxlen=recent)
        self._logs: dict[int, JobLog] = {}

    def started(self, job_id: int, fields: dict, log: JobLog) -> None:
        with self.lock:
            self._running[job_id] = {"id": job_id, **fields, "status": None, "started": time.time(),
                                     "attempt": log.attempt}
            self._logs[job_id] = log

    def status(self, job_id: int, status: str) -> None:
        with self.lock:
            if job_id in self._running:
                self._running[job_id]["status"] = status

    def ended(self, job_id: int, outcome: str, duration: float) -> None:
        with self.lock:
            entry = self._running.pop(job_id, None)
            if entry is None:
                return
            self._finished.append({**entry, "outcome": outcome, "duration": round(duration, 3),
                                   "ended": time.time()})
            shown = set(self._running) | {finished["id"] for finished in self._finished}
            self._logs = {shown_id: log for shown_id, log in self._logs.items() if shown_id in shown}

    def log(self, job_id: int) -> tuple[JobLog | None, bool]:
        """The job's newest log that this worker holds, and whether the job is running."""
        with self.lock:
            return self._logs.get(job_id), job_id in self._running

    def snapshot(self, health: dict) -> dict:
        """What ``/jobs`` answers."""
        now = time.time()
        with self.lock:
            running = [dict(entry) for entry in self._running.values()]
            finished = [dict(entry) for entry in reversed(self._finished)]
            logs = dict(self._logs)
        for entry in running:
            entry["elapsed"] = round(now - entry["started"], 3)
            entry["log_bytes"] = logs[entry["id"]].size
        for entry in running + finished:
            entry["log"] = f"/jobs/{entry['id']}/log"
        return {"worker": self.name, "broker": health.get("broker"), "broker_address": self.broker_address,
                "healthy": health.get("healthy"), "stopping": health.get("stopping"),
                "queues": health.get("queues", []), "running": sorted(running, key=lambda e: e.get("slot", 0)),
                "finished": finished}


def handle(request, board: Board, health) -> bool:
    """Answer *request* (a BaseHTTPRequestHandler) if it is the page's; False if not."""
    url = urlsplit(request.path)
    if url.path in STATIC:
        name, content_type = STATIC[url.path]
        body = importlib.resources.files("rbit").joinpath("static", name).read_bytes()
        send(request, 200, content_type, body)
        return True
    if url.path == "/favicon.ico":  # browsers ask; there is none
        send(request, 204, TEXT, b"")
        return True
    if url.path == "/jobs":
        send(request, 200, "application/json", json.dumps(board.snapshot(health())).encode())
        return True
    match = _LOG_PATH.match(url.path)
    if match is None:
        return False
    try:
        query = {key: values[-1] for key, values in parse_qs(url.query, strict_parsing=False).items()}
        offset = int(query.get("offset", "0"))
        attempt = int(query["attempt"]) if "attempt" in query else None
        if offset < 0:
            raise ValueError(offset)
    except ValueError:
        send(request, 400, TEXT, b"offset and attempt are whole numbers\n")
        return True
    follow = query.get("follow", "") not in ("", "0", "false", "no")
    _serve_log(request, board, int(match.group(1)), offset, attempt, follow)
    return True


def send(request, code: int, content_type: str, body: bytes) -> None:
    request.send_response(code)
    request.send_header("Content-Type", content_type)
    request.send_header("Content-Length", str(len(body)))
    for name, value in SECURITY_HEADERS.items():
        request.send_header(name, value)
    request.end_headers()
    request.wfile.write(body)


def _serve_log(request, board: Board, job_id: int, offset: int, attempt: int | None, follow: bool) -> None:
    """The log from *offset*; with *follow*, streamed until the job ends (``curl -N`` shows it live)."""
    log, running = board.log(job_id)
    if log is not None and attempt not in (None, log.attempt):
        log, running = None, False
    path = None
    if log is None:
        path = attempt_path(board.log_dir, job_id, attempt)
        if path is None:
            send(request, 404, TEXT, f"no log of job {job_id} here\n".encode())
            return
    end = log.size if log is not None else _file_size(path)
    request.send_response(200)
    request.send_header("Content-Type", TEXT)
    request.send_header("X-Rbit-Job", "running" if running else "ended")
    if not follow:
        request.send_header("X-Rbit-Log-Offset", str(max(end, offset)))
    for name, value in SECURITY_HEADERS.items():
        request.send_header(name, value)
    request.end_headers()
    try:
        while True:
            if log is not None:
                data, offset = log.read(offset, CHUNK if follow else min(CHUNK, max(0, end - offset)))
            else:
                data = read_file(path, offset, CHUNK if follow else min(CHUNK, max(0, end - offset)))
                offset += len(data)
            if data:
                request.wfile.write(data)
                request.wfile.flush()
                continue
            if not follow or not running:
                return
            time.sleep(FOLLOW_POLL)
            running = board.log(job_id)[1]
    except (BrokenPipeError, ConnectionResetError):
        return


def _file_size(path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
