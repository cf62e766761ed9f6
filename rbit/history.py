"""PyBit's history of a job, and the rule that decides from it whether the job runs.

PyBit's own build client builds a request only when the job's history ends in
``Waiting`` or ``Blocked``. rbit follows it, and also runs again a job whose
history ends in its own ``Building`` or ``Uploaded`` (an earlier run of this
worker, or of the worker the job was reclaimed from, died before it could
report the end), which PyBit's client would leave stuck for ever.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import statuses
from .pybit_http import auth, job_url, redact, safe_url

if TYPE_CHECKING:
    from .config import PybitSettings

log = logging.getLogger(__name__)

#: Statuses after which PyBit's client would build the job.
RUNNABLE = frozenset({statuses.WAITING, statuses.BLOCKED})

#: Statuses that say a client holds the job.
HELD = frozenset({statuses.BUILDING, statuses.UPLOADED})


@dataclass(frozen=True)
class Entry:
    """One line of a job's history: a status and the client that reported it."""

    status: str
    client: str | None


class Answer(enum.Enum):
    """What PyBit said when asked for a job's history, besides the history itself."""

    #: ``404``: PyBit has no such job (deleted in its web UI, or never created).
    UNKNOWN = "unknown"
    #: PyBit could not be asked (down, timeout, an unexpected answer).
    UNAVAILABLE = "unavailable"


def fetch(pybit: PybitSettings, web_host: str | None, job_id) -> list[Entry] | Answer:
    """The job's history in PyBit, oldest first, or why there is none."""
    import requests  # here: a worker without [pybit] never needs it; the fork server preloads it for one with

    url = job_url(pybit, web_host, job_id) + "/status"
    shown = safe_url(url)
    try:
        response = requests.get(url, auth=auth(pybit), timeout=pybit.timeout,
                                headers={"Accept": "application/json"})
    except requests.RequestException as exc:
        log.warning("job %s: cannot fetch its status history from %s: %s", job_id, shown,
                    redact(pybit, exc))
        return Answer.UNAVAILABLE
    with response:
        if response.status_code == 404:
            return Answer.UNKNOWN
        if response.status_code != 200:
            log.warning("job %s: unexpected answer %s %s from %s", job_id,
                        response.status_code, response.reason, shown)
            return Answer.UNAVAILABLE
        try:
            return [_entry(item) for item in response.json()]
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("job %s: unexpected status history from %s: %s", job_id, shown,
                        redact(pybit, exc))
            return Answer.UNAVAILABLE


def _entry(item) -> Entry:
    """One ``pybit.models.JobHistory`` of the JSON list; only two plain fields are read."""
    status, client = item["status"], item.get("buildclient")
    if not isinstance(status, str) or not (client is None or isinstance(client, str)):
        raise ValueError(f"not a JobHistory: {item!r}"[:200])
    return Entry(status, client or None)


def should_run(history: list[Entry] | Answer, me: str, reclaimed_from: str | None = None
               ) -> tuple[bool, str]:
    """Whether a job with *history* runs on the worker named *me*, and why.

    *reclaimed_from* names the worker whose unfinished job this is, when it
    was put back for another worker to run.
    """
    if history is Answer.UNAVAILABLE:
        return True, "PyBit cannot be asked for the job's history; running it"
    if history is Answer.UNKNOWN or not history:
        return False, "PyBit does not know the job (deleted, or never created)"
    last = history[-1]
    if last.status in RUNNABLE:
        return True, f"PyBit's history ends in {last.status}"
    if last.status in HELD:
        by = last.client or "an unnamed client"
        if last.client is not None and last.client in (me, reclaimed_from):
            return True, f"PyBit's history ends in {last.status} by {by}, whose run is gone"
        return False, f"PyBit's history ends in {last.status} by {by}"
    return False, f"PyBit's history ends in {last.status}"
