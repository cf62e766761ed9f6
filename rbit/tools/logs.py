"""``rbit logs CONFIG JOB [--follow]``: a job's log, from the log directory or from the running worker.

``--follow`` on a file prints what is there, then what is added, until the
attempt's ``.json`` records its end (the worker writes it when the job ends);
it stops too when the worker that ran the attempt is gone from this host, and
moves on to a newer attempt of the job when one appears.
"""

from __future__ import annotations

import http.client
import os
import socket
import time
import urllib.parse

from .. import logdir
from ..errors import NoLog

#: Seconds between two looks at a followed log file.
FOLLOW_POLL = 0.2

#: Seconds to wait for the worker's HTTP answer to begin.
CONNECT_TIMEOUT = 10


def show(settings, job_id: int, out, follow: bool = False, attempt: int | None = None) -> int:
    """Print the job's log (its newest attempt, or *attempt*) to *out* (binary); the exit status."""
    path = logdir.attempt_path(settings.log_dir, job_id, attempt)
    if path is not None:
        return from_file(settings.log_dir, job_id, path, out, follow, newer=attempt is None)
    if settings.http is None:
        raise NoLog(f"no log of job {job_id} in {settings.log_dir}")
    return from_worker(settings.http, settings.log_dir, job_id, out, follow, attempt)


def from_file(log_dir, job_id: int, path, out, follow: bool, newer: bool = True, sleep=time.sleep) -> int:
    """Print the log file *path*; with *follow*, until its attempt ends (or, with *newer*, a newer begins)."""
    offset = 0
    while True:
        meta = logdir.read_meta(path) if follow else {}
        offset = _copy(path, offset, out)
        if not follow or "outcome" in meta:
            return 0
        newest = logdir.attempt_path(log_dir, job_id) if newer else path
        if newest is not None and newest != path:
            out.write(f"\n[rbit logs: attempt {newest.stem} of job {job_id} began]\n".encode())
            path, offset = newest, 0
            continue
        if _gone(meta):
            out.write(f"\n[rbit logs: the worker running this attempt (pid {meta['pid']}) is gone; "
                      f"the job runs again when a worker takes it back]\n".encode())
            out.flush()
            return 1
        sleep(FOLLOW_POLL)


def _copy(path, offset: int, out) -> int:
    """Write what *path* holds past *offset*; the new offset."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return offset
    if size < offset:  # the log passed log_max: its head stays, its newest part comes at the end
        out.write(b"\n[rbit logs: the log passed log_max; its newest part follows when the job ends]\n")
        offset = size
    while offset < size:
        data = logdir.read_file(path, offset, min(1 << 20, size - offset))
        if not data:
            break
        out.write(data)
        offset += len(data)
    out.flush()
    return offset


def _gone(meta: dict) -> bool:
    """True when *meta* names a worker process of this host that is no longer there."""
    if meta.get("host") != socket.gethostname() or not isinstance(meta.get("pid"), int):
        return False
    try:
        os.kill(meta["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def from_worker(address, log_dir, job_id: int, out, follow: bool, attempt: int | None) -> int:
    """The log as the worker at *address* (``[rbit] http``) serves it, followed with ``?follow=1``."""
    host, port = address
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    query = urllib.parse.urlencode({**({"follow": "1"} if follow else {}),
                                    **({"attempt": attempt} if attempt is not None else {})})
    path = f"/jobs/{job_id}/log" + (f"?{query}" if query else "")
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"
    connection = http.client.HTTPConnection(host, port, timeout=CONNECT_TIMEOUT)
    try:
        connection.request("GET", path)
        sock = connection.sock  # the answer keeps it; the connection forgets it (HTTP/1.0)
        answer = connection.getresponse()
        if answer.status == 404:
            raise NoLog(f"no log of job {job_id} in {log_dir} nor at the worker ({url})")
        if answer.status != 200:
            raise NoLog(f"the worker at {url} answered {answer.status} {answer.reason}")
        sock.settimeout(None)  # a followed job may be quiet for long
        while chunk := answer.read1(1 << 16):  # as it arrives
            out.write(chunk)
            out.flush()
    except BrokenPipeError:  # our reader went away (rbit logs ... | head)
        raise
    except OSError as exc:
        raise NoLog(f"no log of job {job_id} in {log_dir}, and the worker at {url} does not answer "
                    f"({exc.strerror or exc})") from None
    finally:
        connection.close()
    return 0
