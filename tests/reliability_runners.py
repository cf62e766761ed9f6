"""Runners that misbehave on purpose, for the reliability tests (the README's
"What happens to a job when something fails").

The worker imports this module in its job processes as
``python!reliability_runners:NAME`` (the tests put ``tests/`` on its
PYTHONPATH). Every runner appends one line per event to the file named by its
``record`` setting, so that a test can count how often a job really ran and
when::

    EVENT JOB_ID PID TIME [EXTRA]

``EVENT`` is ``start`` when the runner is called and ``end`` when it returns
normally; ``child`` lines name a process the runner started in its group.
"""

import ctypes
import os
import resource
import signal
import subprocess
import time

import rbit


def record(settings, event, message, extra=""):
    """Append one event line to ``settings['record']`` (when set), flushed to disk at once.

    A ``start`` line says whether the message is a redelivery: ``redelivered=True``.
    """
    path = settings.get("record")
    if not path:
        return
    if event == "start" and not extra:
        extra = f"redelivered={message.redelivered}"
    line = f"{event} {message.job_id} {os.getpid()} {time.time():.3f} {extra}".rstrip() + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def events(path, event=None):
    """The recorded lines of *path* as ``(event, job_id, pid, time, extra)`` tuples."""
    found = []
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return found
    for line in lines:
        parts = line.split(" ", 4)
        if len(parts) < 4:
            continue
        name, job_id, pid, when = parts[:4]
        extra = parts[4] if len(parts) > 4 else ""
        if event is None or name == event:
            found.append((name, int(job_id), int(pid), float(when), extra))
    return found


def _spawn_sleeper(settings, message):
    """Start ``sleep 1000`` in the job's own process group and record its pid."""
    child = subprocess.Popen(["sleep", "1000"])
    record(settings, "child", message, str(child.pid))
    return child


# -- runners ----------------------------------------------------------------


def ok(message, set_status, settings):
    """Returns at once: the job ends Done."""
    record(settings, "start", message)
    record(settings, "end", message)


def slow(message, set_status, settings):
    """Sleeps ``seconds`` (default 5), optionally with a ``sleep 1000`` child in its group."""
    record(settings, "start", message)
    if settings.get("child") == "yes":
        _spawn_sleeper(settings, message)
    time.sleep(float(settings.get("seconds", "5")))
    record(settings, "end", message)


def progress(message, set_status, settings):
    """Reports ``Uploaded`` itself half way through ``seconds`` (default 2); the worker adds Done."""
    record(settings, "start", message)
    seconds = float(settings.get("seconds", "2"))
    time.sleep(seconds / 2)
    set_status("Uploaded")
    time.sleep(seconds / 2)
    record(settings, "end", message)


def segfault(message, set_status, settings):
    """Dies of SIGSEGV, as a crashing C extension would."""
    record(settings, "start", message)
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(10)


def null_pointer(message, set_status, settings):
    """Reads address 0 through ctypes: a real segmentation fault."""
    record(settings, "start", message)
    ctypes.string_at(0)
    time.sleep(10)


def leak(message, set_status, settings):
    """Leaks ``megabytes`` (default 200) for good, then runs out of memory under its own cap.

    The address-space cap (``cap_mb`` above what the process has, default 400)
    keeps the test from hurting the machine: the runner ends in MemoryError
    however much memory the host has.
    """
    record(settings, "start", message)
    hoard = []
    megabytes = int(settings.get("megabytes", "200"))
    for _ in range(megabytes):
        block = bytearray(1024 * 1024)
        block[::4096] = b"x" * len(block[::4096])  # touch every page: really resident
        hoard.append(block)
    with open("/proc/self/status", encoding="ascii") as status:
        rss = next(line.split()[1] for line in status if line.startswith("VmRSS:"))
    record(settings, "leaked", message, f"{rss}kB")
    with open("/proc/self/statm", encoding="ascii") as statm:
        size_pages = int(statm.read().split()[0])
    cap = size_pages * resource.getpagesize() + int(settings.get("cap_mb", "400")) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    while True:
        hoard.append(bytearray(16 * 1024 * 1024))


def hard_exit(message, set_status, settings):
    """Leaves through ``os._exit(3)``: no result, no cleanup."""
    record(settings, "start", message)
    os._exit(3)


def hang(message, set_status, settings):
    """Never returns; a ``sleep 1000`` child in its process group must die with it."""
    record(settings, "start", message)
    _spawn_sleeper(settings, message)
    while True:
        time.sleep(1)


def stubborn(message, set_status, settings):
    """Ignores SIGTERM and sleeps ``seconds`` (default 1000): only SIGKILL stops it.

    With ``child = yes`` it first starts a ``sleep 1000`` in its group.
    """
    record(settings, "start", message)
    if settings.get("child") == "yes":
        _spawn_sleeper(settings, message)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(float(settings.get("seconds", "1000")))
    record(settings, "end", message)


def blocked_once(message, set_status, settings):
    """Raises ``rbit.Blocked`` the first time it is called for a job; returns the next time."""
    seen = any(entry[1] == message.job_id for entry in events(settings["record"], "start"))
    record(settings, "start", message)
    if not seen:
        raise rbit.Blocked("a build dependency is missing")
    record(settings, "end", message)


def tick(message, set_status, settings):
    """Records a ``tick`` line every 0.2 s for ``seconds`` (default 30): while it runs, the record
    shows it alive, so that two runs of one job can be seen not to overlap."""
    record(settings, "start", message)
    end = time.monotonic() + float(settings.get("seconds", "30"))
    while time.monotonic() < end:
        record(settings, "tick", message)
        time.sleep(0.2)
    record(settings, "end", message)
