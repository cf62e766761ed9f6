"""Reporting job statuses to PyBit's web front end, in order, without ever failing a job."""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import requests

from . import statuses
from .pybit_http import auth as _auth, job_url, redact as _redact, safe_url
from .spool import Report, Spool

if TYPE_CHECKING:
    from .config import PybitSettings

log = logging.getLogger(__name__)

#: Every status a job reports is logged here, whether or not it goes to PyBit.
status_log = logging.getLogger("rbit.status")

#: Log templates (lazy ``%`` arguments; each line about a status carries the job id and queue).
STATUS_LOG = "job %s queue %s: %s"
STATUS_TEXT_LOG = "job %s queue %s: %s: %s"
DELIVERED_LOG = "job %s queue %s: status %s delivered to %s"
RETRY_LOG = "job %s queue %s: status %s not delivered to %s (attempt %d: %s); retrying in %.3gs"
DROP_LOG = "job %s queue %s: status %s dropped: PyBit at %s refuses it for good (%s)"
UNSENDABLE_LOG = "job %s queue %s: status %s dropped: cannot send it to %s: %s"
NO_URL_LOG = ("job %s queue %s: status %s not sent: no PyBit url configured "
              "and the request gives no web_host")
LEFT_BEHIND_LOG = "status delivery thread still waiting for PyBit; leaving it behind"
UNDELIVERED_LOG = "%d status report(s) not delivered to PyBit, %s"

#: HTTP answers that mean "later", retried without more questions: 408 and 429 say
#: so; 502, 503 and 504 come from a proxy, or a PyBit that is restarting. Any other
#: 5xx is retried only while ``GET <job>/status`` shows that PyBit still has the job
#: (it answers 500 to a status for a job it does not have); any other 4xx is dropped.
RETRY_CODES = frozenset({408, 429, 502, 503, 504})

#: Seconds ``stop()`` waits for the delivery thread to end after its timeout ran out
#: (it wakes at once from a backoff; a request in flight may take ``pybit.timeout``).
STOP_GRACE = 0.5

#: After this many reports are delivered or dropped, the spool is compacted even if
#: reports are still pending; bounds how many statuses a crash can make rbit send twice.
COMPACT_EVERY = 64

_DELIVERED, _RETRY, _DROPPED = "delivered", "retry", "dropped"


@dataclass
class _Lane:
    """One job's reports still to deliver (sequence numbers, oldest first) and its own backoff."""

    delay: float
    seqs: collections.deque[int] = field(default_factory=collections.deque)
    attempt: int = 0  # failed attempts at the first report so far, plus the one in flight
    due: float = 0.0  # time.monotonic() of the next attempt
    drop_head: bool = False  # the first report was discarded while on its way: never retry it


class StatusReporter:
    """Sends statuses to PyBit from one background thread, in order for each job.

    ``report()`` only logs and queues; the thread started by ``start()`` does
    the HTTP. Each job has its own queue and its own backoff: a status that
    PyBit cannot take now (down, timeout, 408, 429, 502-504, or another 5xx
    for a job PyBit still has) is retried with a capped exponential backoff
    and holds back the later statuses of its job only, never another job's.
    A status PyBit refuses for good is dropped with one warning: any other
    4xx, or a 5xx for a job whose status history answers 404 (PyBit no
    longer has the job). With ``spool_path`` the queue is also kept in a
    file (see :class:`~rbit.spool.Spool`), so a restarted worker delivers
    what its predecessor could not: at worst a status is sent twice, never
    lost or reordered within its job.

    ``pybit=None`` (no ``[pybit]`` section): statuses are only logged.
    """

    def __init__(self, pybit: PybitSettings | None, client_name: str, *,
                 spool_path: str | os.PathLike | None = None,
                 retry_initial: float = 1.0, retry_max: float = 60.0):
        self._pybit = pybit
        self._client_name = client_name
        self._spool = Spool(spool_path) if spool_path is not None else None
        self._retry_initial = retry_initial
        self._retry_max = max(retry_max, retry_initial)
        self._cond = threading.Condition()
        self._pending: dict[int, Report] = {}  # by sequence number, oldest first
        self._lanes: dict[int, _Lane] = {}  # by job id, for the jobs with reports pending
        self._next_seq = 0
        self._sending: int | None = None  # the sequence number of the report on its way to PyBit
        self._since_compact = 0
        self._spool_loaded = False
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()

    # -- the worker's side -------------------------------------------------

    def start(self) -> None:
        """Start the delivery thread; spooled reports of an earlier run go first in their jobs."""
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
            log.error(NO_URL_LOG, job_id, queue, status)
            return
        item = Report(job_id, web_host, status, text, queue)
        with self._cond:
            self._load_spool_locked()
            self._queue_locked(item)
            if self._spool is not None:
                self._spool.append(item)
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until all reports queued so far are delivered or dropped; False on timeout."""
        with self._cond:
            target = self._next_seq
            return self._cond.wait_for(lambda: next(iter(self._pending), target) >= target, timeout)

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
            log.warning(LEFT_BEHIND_LOG)
        left = self.backlog
        if left:
            log.warning(UNDELIVERED_LOG, left, f"kept in {self._spool}" if self._spool else "lost")

    def discard(self, job_id) -> int:
        """Forget *job_id*'s reports not yet delivered (its job was lost: another worker reports it
        now); return how many. A report already on its way to PyBit cannot be called back."""
        with self._cond:
            lane = self._lanes.get(job_id)
            if lane is None:
                return 0
            dropped = [seq for seq in lane.seqs if seq != self._sending]
            for seq in dropped:
                lane.seqs.remove(seq)
                del self._pending[seq]
            lane.drop_head = bool(lane.seqs)
            if not lane.seqs:
                del self._lanes[job_id]
            if dropped and self._spool is not None:
                self._spool.rewrite(self._pending.values())
            self._cond.notify_all()
            return len(dropped)

    @property
    def backlog(self) -> int:
        """Number of reports not yet delivered (for metrics)."""
        with self._cond:
            return len(self._pending)

    # -- the delivery thread ----------------------------------------------

    def _run(self, stop: threading.Event) -> None:
        session = requests.Session()
        try:
            while True:
                with self._cond:
                    lane = self._due_lane_locked(stop)
                    if lane is None:
                        return
                    item = self._pending[lane.seqs[0]]
                    self._sending = lane.seqs[0]
                    lane.attempt += 1
                    attempt, delay = lane.attempt, lane.delay
                outcome = self._attempt(session, item, attempt, delay)
                with self._cond:
                    self._settle_locked(lane, item, outcome, stop)
        finally:
            session.close()

    def _due_lane_locked(self, stop: threading.Event) -> _Lane | None:
        """Wait for a job whose next report is due (the oldest first); None once stopped."""
        while not stop.is_set():
            now = time.monotonic()
            due = [lane for lane in self._lanes.values() if lane.due <= now]
            if due:
                return min(due, key=lambda lane: lane.seqs[0])
            wake = min((lane.due for lane in self._lanes.values()), default=None)
            self._cond.wait(None if wake is None else wake - now)
        return None

    def _settle_locked(self, lane: _Lane, item: Report, outcome: str, stop: threading.Event) -> None:
        """Back the job off after a failed attempt, or take its report off the queue."""
        self._sending = None
        if outcome == _RETRY and not lane.drop_head:
            lane.due = time.monotonic() + lane.delay
            lane.delay = min(lane.delay * 2, self._retry_max)
            return
        del self._pending[lane.seqs.popleft()]
        lane.attempt, lane.delay, lane.due, lane.drop_head = 0, self._retry_initial, 0.0, False
        if not lane.seqs:
            del self._lanes[item.job_id]
        self._since_compact += 1
        # A thread left behind by stop() must not rewrite a spool that a new
        # reporter may own by now.
        if not stop.is_set() and (not self._pending or self._since_compact >= COMPACT_EVERY):
            self._since_compact = 0
            if self._spool is not None:
                self._spool.rewrite(self._pending.values())
        self._cond.notify_all()

    def _attempt(self, session: requests.Session, item: Report, attempt: int, delay: float) -> str:
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
            log.error(UNSENDABLE_LOG, item.job_id, item.queue, item.status, shown, _redact(pybit, exc))
            return _DROPPED
        with response:
            code, reason = response.status_code, response.reason
        if 200 <= code < 300:
            log.debug(DELIVERED_LOG, item.job_id, item.queue, item.status, shown)
            return _DELIVERED
        answer = f"HTTP {code} {reason}"
        if code in RETRY_CODES:
            refused = False
        elif code >= 500:
            refused, history_answer = self._job_gone(session, url)
            answer = f"{answer}, and GET {shown}/status {history_answer}"
        else:
            refused = True  # a 4xx; a 3xx too, as redirects are not followed
        if refused:
            log.warning(DROP_LOG, item.job_id, item.queue, item.status, shown, answer)
            return _DROPPED
        log.warning(RETRY_LOG, item.job_id, item.queue, item.status, shown, attempt, answer, delay)
        return _RETRY

    def _job_gone(self, session: requests.Session, url: str) -> tuple[bool, str]:
        """Whether PyBit no longer has the job (its status history answers 404), and its answer."""
        pybit = self._pybit
        try:
            response = session.get(url + "/status", auth=_auth(pybit), timeout=pybit.timeout,
                                   headers={"Accept": "application/json"}, allow_redirects=False)
        except requests.RequestException as exc:
            return False, f"failed: {_redact(pybit, exc)}"
        with response:
            return response.status_code == 404, f"answers {response.status_code} {response.reason}"

    # -- the queues (called with self._cond held) ---------------------------

    def _queue_locked(self, item: Report) -> None:
        """Put *item* last in its job's queue."""
        seq = self._next_seq
        self._next_seq += 1
        self._pending[seq] = item
        lane = self._lanes.get(item.job_id)
        if lane is None:
            lane = self._lanes[item.job_id] = _Lane(self._retry_initial)
        lane.seqs.append(seq)

    def _load_spool_locked(self) -> None:
        """Queue the reports left in the spool, before any of this run (once)."""
        if self._spool is None or self._spool_loaded:
            return
        self._spool_loaded = True
        for item in self._spool.load():
            self._queue_locked(item)
