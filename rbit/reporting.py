"""Reporting job statuses to PyBit's web front end, in order, without ever failing a job."""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import requests

from . import statuses
from .errors import UnknownStatus
from .pybit_http import auth as _auth, job_url, redact as _redact, safe_url

if TYPE_CHECKING:
    from .config import PybitSettings

log = logging.getLogger(__name__)

#: Every status a job reports is logged here, whether or not it goes to PyBit.
status_log = logging.getLogger("rbit.status")

#: Log templates (lazy ``%`` arguments; each line carries the job id and queue).
STATUS_LOG = "job %s queue %s: %s"
STATUS_TEXT_LOG = "job %s queue %s: %s: %s"
RETRY_LOG = "job %s queue %s: status %s not delivered to %s (attempt %d: %s); retrying in %.3gs"
DROP_LOG = "job %s queue %s: status %s dropped, PyBit at %s refused it (%s); retrying cannot help"
SPOOL_ERROR_LOG = "status spool %s: %s"

#: HTTP answers in the 4xx range that are worth retrying; every 5xx is retried too.
RETRY_CODES = frozenset({408, 429})

#: Seconds ``stop()`` waits for the delivery thread to end after its timeout ran out
#: (it wakes at once from a backoff; a request in flight may take ``pybit.timeout``).
STOP_GRACE = 0.5

#: After this many reports are delivered, the spool is compacted even if the queue
#: is not empty yet; bounds how many statuses a crash can make rbit send twice.
COMPACT_EVERY = 64

_DELIVERED, _RETRY, _DROPPED = "delivered", "retry", "dropped"


@dataclass(frozen=True)
class _Report:
    """One status to deliver; also one line of the spool."""

    job_id: int
    web_host: str | None
    status: str
    text: str | None = None
    queue: str | None = None

    def to_line(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":")) + "\n"

    @classmethod
    def from_line(cls, line: str) -> _Report:
        """Parse one spool line; raise ``ValueError`` if it is not a report."""
        data = json.loads(line)
        if not isinstance(data, dict) or set(data) != {"job_id", "web_host", "status", "text", "queue"}:
            raise ValueError("not a status report")
        if not isinstance(data["job_id"], int) or isinstance(data["job_id"], bool):
            raise ValueError("job_id is not an integer")
        for key in ("web_host", "text", "queue"):
            if data[key] is not None and not isinstance(data[key], str):
                raise ValueError(f"{key} is not a string")
        statuses.check(data["status"])  # UnknownStatus is a ValueError
        return cls(**data)


class StatusReporter:
    """Sends statuses to PyBit from one background thread, strictly in order.

    ``report()`` only logs and queues; the thread started by ``start()`` does
    the HTTP. A report that PyBit cannot take now (down, timeout, 5xx) is
    retried with a capped exponential backoff and holds back those queued
    after it, so PyBit sees every job's statuses in the order they happened.
    With ``spool_path`` the queue is also kept in a file (one JSON line per
    report), so a restarted worker delivers what its predecessor could not:
    at worst a status is sent twice, never lost or reordered. One spool file
    serves one reporter at a time.

    ``pybit=None`` (no ``[pybit]`` section): statuses are only logged.
    """

    def __init__(self, pybit: PybitSettings | None, client_name: str, *,
                 spool_path: str | os.PathLike | None = None,
                 retry_initial: float = 1.0, retry_max: float = 60.0):
        self._pybit = pybit
        self._client_name = client_name
        self._spool_path = Path(spool_path) if spool_path is not None else None
        self._retry_initial = retry_initial
        self._retry_max = max(retry_max, retry_initial)
        self._cond = threading.Condition()
        self._queue: collections.deque[_Report] = collections.deque()
        self._enqueued = 0  # reports ever queued
        self._finished = 0  # of which delivered or dropped
        self._since_compact = 0
        self._spool_loaded = False
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()

    # -- the worker's side -------------------------------------------------

    def start(self) -> None:
        """Start the delivery thread; spooled reports of an earlier run go first."""
        if self._pybit is None:
            return
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                if not self._stop_event.is_set():
                    return  # already running
                raise RuntimeError("the previous delivery thread is still waiting for PyBit")
            self._load_spool_locked()
            self._stop_event = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(self._stop_event,),
                name="rbit-status-reporter", daemon=True,
            )
            self._thread.start()

    def report(self, job_id, web_host: str | None, status: str, text: str | None = None,
               queue: str | None = None) -> None:
        """Log and queue one status; never blocks on the network, never raises for it.

        Raises :class:`~rbit.errors.UnknownStatus` for a status PyBit does not know.
        """
        statuses.check(status)
        if text is None:
            status_log.info(STATUS_LOG, job_id, queue, status)
        else:
            status_log.info(STATUS_TEXT_LOG, job_id, queue, status, text)
        if self._pybit is None:
            return
        if not self._pybit.url and not web_host:
            log.error("job %s queue %s: status %s not sent: no PyBit url configured "
                      "and the request gives no web_host", job_id, queue, status)
            return
        item = _Report(job_id, web_host, status, text, queue)
        with self._cond:
            self._load_spool_locked()
            self._queue.append(item)
            self._enqueued += 1
            self._append_spool_locked(item)
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until all reports queued so far are delivered or dropped; False on timeout."""
        with self._cond:
            target = self._enqueued
            return self._cond.wait_for(lambda: self._finished >= target, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is queued within *timeout*, then stop; the rest stays in the spool."""
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        with self._cond:
            self._stop_event.set()
            self._cond.notify_all()
        thread.join(max(deadline - time.monotonic(), STOP_GRACE))
        if thread.is_alive():
            log.warning("status delivery thread still waiting for PyBit; leaving it behind")
        left = self.backlog
        if left:
            where = f"kept in {self._spool_path}" if self._spool_path else "lost"
            log.warning("%d status report(s) not delivered to PyBit, %s", left, where)

    @property
    def backlog(self) -> int:
        """Number of reports not yet delivered (for metrics)."""
        with self._cond:
            return len(self._queue)

    # -- the delivery thread ----------------------------------------------

    def _run(self, stop: threading.Event) -> None:
        session = requests.Session()
        delay = self._retry_initial
        attempt = 0
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._queue or stop.is_set())
                    if stop.is_set():
                        return
                    item = self._queue[0]
                attempt += 1
                outcome = self._attempt(session, item, attempt, delay)
                if outcome == _RETRY:
                    if stop.wait(delay):
                        return
                    delay = min(delay * 2, self._retry_max)
                    continue
                delay, attempt = self._retry_initial, 0
                with self._cond:
                    self._queue.popleft()
                    self._finished += 1
                    self._since_compact += 1
                    # A thread left behind by stop() must not rewrite a spool
                    # that a new reporter may own by now.
                    if not stop.is_set() and (not self._queue or self._since_compact >= COMPACT_EVERY):
                        self._compact_spool_locked()
                    self._cond.notify_all()
        finally:
            session.close()

    def _attempt(self, session: requests.Session, item: _Report, attempt: int, delay: float) -> str:
        """Send one report once; log what went wrong; return what to do with it."""
        pybit = self._pybit
        url = job_url(pybit, item.web_host, item.job_id)
        shown = safe_url(url)
        try:
            response = session.put(
                url,
                data={"status": item.status, "client": self._client_name},
                auth=_auth(pybit),
                timeout=pybit.timeout,
                allow_redirects=False,
            )
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as exc:
            log.warning(RETRY_LOG, item.job_id, item.queue, item.status, shown, attempt,
                        _redact(pybit, exc), delay)
            return _RETRY
        except Exception as exc:  # noqa: BLE001 - a bad URL must not kill the thread
            log.error(DROP_LOG, item.job_id, item.queue, item.status, shown, _redact(pybit, exc))
            return _DROPPED
        with response:
            code, reason = response.status_code, response.reason
        if 200 <= code < 300:
            log.debug("job %s queue %s: status %s delivered to %s", item.job_id, item.queue,
                      item.status, shown)
            return _DELIVERED
        if code >= 500 or code in RETRY_CODES:
            log.warning(RETRY_LOG, item.job_id, item.queue, item.status, shown, attempt,
                        f"HTTP {code} {reason}", delay)
            return _RETRY
        log.error(DROP_LOG, item.job_id, item.queue, item.status, shown, f"HTTP {code} {reason}")
        return _DROPPED

    # -- the spool (all called with self._cond held) -----------------------

    def _load_spool_locked(self) -> None:
        """Put the reports left in the spool at the head of the queue (once)."""
        if self._spool_path is None or self._spool_loaded:
            return
        self._spool_loaded = True
        path = self._spool_path
        found = []
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, encoding="utf-8") as spool:
                for number, line in enumerate(spool, 1):
                    if not line.strip():
                        continue
                    try:
                        found.append(_Report.from_line(line))
                    except (ValueError, TypeError, UnknownStatus) as exc:
                        log.error("status spool %s line %d skipped: %s", path, number, exc)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error(SPOOL_ERROR_LOG, path, exc)
            return
        if found:
            log.info("status spool %s: %d report(s) from an earlier run to deliver first",
                     path, len(found))
        self._queue.extendleft(reversed(found))
        self._enqueued += len(found)

    def _append_spool_locked(self, item: _Report) -> None:
        if self._spool_path is None:
            return
        try:
            with open(self._spool_path, "a", encoding="utf-8") as spool:
                spool.write(item.to_line())
                spool.flush()
        except OSError as exc:
            log.error(SPOOL_ERROR_LOG, self._spool_path, exc)

    def _compact_spool_locked(self) -> None:
        """Rewrite the spool with the undelivered reports only, atomically."""
        self._since_compact = 0
        if self._spool_path is None:
            return
        temporary = self._spool_path.with_name(self._spool_path.name + ".tmp")
        try:
            with open(temporary, "w", encoding="utf-8") as spool:
                spool.writelines(item.to_line() for item in self._queue)
                spool.flush()
                os.fsync(spool.fileno())
            os.replace(temporary, self._spool_path)
        except OSError as exc:
            log.error(SPOOL_ERROR_LOG, self._spool_path, exc)
