"""Runner functions for the rbit benchmark (``python!runners:NAME`` with bench/ on PYTHONPATH).

Each is called by rbit's python runner as ``function(message, set_status, settings)``
in the job's own process. The stamping runners tell the benchmark when they ran by
sending one UDP datagram per event to ``settings["report_to"]`` (``HOST:PORT``):

    ``start JOB_ID TIME`` and ``end JOB_ID TIME``

where TIME is ``time.time()`` (the same machine's wall clock as the publisher's).
UDP keeps the runner's cost to one ``sendto`` and lets the benchmark wake at once,
without polling a file.
"""

import os
import socket
import time

_sockets = {}


def _send(settings, text):
    """Send *text* as one datagram to ``settings["report_to"]``."""
    host, _, port = settings["report_to"].rpartition(":")
    sock = _sockets.get(os.getpid())
    if sock is None:
        sock = _sockets[os.getpid()] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.sendto(text.encode("ascii"), (host, int(port)))


def stamp(message, set_status, settings):
    """Record the start time (first thing) and the end time of a job that does nothing."""
    started = time.time()
    job_id = message.job_id
    _send(settings, f"start {job_id} {started!r}")
    _send(settings, f"end {job_id} {time.time()!r}")


def noop(message, set_status, settings):
    """Do nothing at all (the memory soak: no reporting cost in the job)."""


def gate(message, set_status, settings):
    """Hold the worker's only slot until the file ``RELEASE_DIR/JOB_ID`` exists.

    While every slot is busy the worker has cancelled its consumers, so the
    benchmark can pre-load a queue without the worker taking from it.
    """
    release = os.path.join(settings["release_dir"], str(message.job_id))
    _send(settings, f"start {message.job_id} {time.time()!r}")
    deadline = time.monotonic() + float(settings.get("max_wait", "120"))
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.002)
    _send(settings, f"end {message.job_id} {time.time()!r}")
