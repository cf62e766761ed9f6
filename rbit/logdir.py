"""Where job logs live: ``LOG_DIR/JOB/ATTEMPT.log``, their ``.json``, the default directory, retention.

Attempts are numbered from 1; the highest is the job's log. ``ATTEMPT.json``
says who runs the attempt (worker, pid, host) and, once it has ended, how
(``outcome``, ``duration``, ``bytes``, ``left_out``, ``lost``); ``ATTEMPT.tail``
holds the newest part of a log past ``log_max`` while its job runs
(:mod:`rbit.joblog`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: A job's attempt log, ``N.log``; its metadata ``N.json``; the tail ring ``N.tail``.
ATTEMPT_FILE = re.compile(r"^(\d+)\.(log|json|tail)$")


def default_log_dir(environ) -> Path:
    """systemd's ``$LOGS_DIRECTORY/jobs`` when set, else ``$XDG_STATE_HOME/rbit/jobs`` (``~/.local/state``)."""
    if environ.get("LOGS_DIRECTORY"):
        return Path(environ["LOGS_DIRECTORY"].split(":")[0]) / "jobs"
    state = environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):
        state = os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".local", "state")
    return Path(state) / "rbit" / "jobs"


def attempts(log_dir: Path, job_id: int) -> list[int]:
    """The attempt numbers of the job's logs, oldest first."""
    try:
        names = os.listdir(Path(log_dir) / str(job_id))
    except OSError:
        return []
    return sorted(int(m.group(1)) for m in map(ATTEMPT_FILE.match, names) if m and m.group(2) == "log")


def attempt_path(log_dir: Path, job_id: int, attempt: int | None = None) -> Path | None:
    """The log of *attempt* (default: the newest) of the job, or None when there is none."""
    found = attempts(log_dir, job_id)
    if attempt is None:
        attempt = found[-1] if found else None
    if attempt not in found:
        return None
    return Path(log_dir) / str(job_id) / f"{attempt}.log"


def read_meta(log_path: Path) -> dict:
    """The attempt's ``.json`` ({} when missing or unreadable)."""
    try:
        return json.loads(log_path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def read_file(path: Path, offset: int, limit: int) -> bytes:
    """Up to *limit* bytes of a log file from *offset* (b"" past its end or when unreadable)."""
    try:
        with open(path, "rb") as handle:
            return os.pread(handle.fileno(), limit, offset)
    except OSError:
        return b""


def sweep(log_dir: Path, keep_days: float, keep_jobs=(), now: float | None = None) -> int:
    """Remove attempt files older than *keep_days* (not those of *keep_jobs*); the number removed."""
    if keep_days <= 0:
        return 0
    cutoff = (time.time() if now is None else now) - keep_days * 86400
    removed = 0
    try:
        jobs = [entry for entry in os.scandir(log_dir) if entry.name.isdigit() and entry.is_dir(follow_symlinks=False)]
    except OSError:
        return 0
    for job in jobs:
        if int(job.name) in keep_jobs:
            continue
        try:
            for entry in os.scandir(job.path):
                if ATTEMPT_FILE.match(entry.name) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            os.rmdir(job.path)  # only when empty
        except OSError:
            pass
    return removed


def write_meta(path: Path, data: dict) -> None:
    """Replace the attempt's ``.json`` with *data* (a failure is only logged: the job goes on)."""
    temporary = path.with_suffix(".json.new")
    try:
        temporary.write_text(json.dumps(data), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        log.debug("cannot write %s: %s", path, exc)
