"""python! runners for the job log tests, run by the worker in its job processes.

Each takes its files from its settings; ``gated`` and ``blocked_once`` are driven
by files the test creates, so that nothing depends on timing.
"""

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import rbit

log = logging.getLogger("tests.joblog_runners")

#: Longest a runner waits for a file from its test (a stuck test must not hang the suite).
WAIT = 60.0


def _wait_for(path):
    deadline = time.monotonic() + WAIT
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise rbit.Failed(f"{path} never came")
        time.sleep(0.02)


def chatty(message, set_status, settings):
    """Writes in every way a job can: print, stderr, a log record, a child and a grandchild."""
    job = message.job_id
    print(f"job {job}: print to stdout")
    print(f"job {job}: write to stderr", file=sys.stderr)
    log.info("job %s: a log record", job)
    subprocess.run(["/bin/sh", "-c", f"echo 'job {job}: a child on stdout'; echo 'job {job}: a child on stderr' >&2;"
                    f" /bin/sh -c 'echo \"job {job}: a grandchild\"'"], check=True)
    os.write(1, f"job {job}: os.write to fd 1\n".encode())


def numbers(message, set_status, settings):
    """Writes numbered lines as fast as it can, from Python, then from a child (seq)."""
    count = int(settings.get("count", "200000"))
    write = sys.stdout.write
    for n in range(1, count + 1):
        write(f"py {n}\n")
    sys.stdout.flush()
    subprocess.run(["seq", "1", str(count)], check=True)


def tagged(message, set_status, settings):
    """Waits until every job of the test has started, then writes lines tagged with its job id."""
    job = message.job_id
    gate = Path(settings["dir"])
    (gate / f"started-{job}").touch()
    _wait_for(gate / "go")
    out = sys.stdout
    for n in range(int(settings.get("count", "50000"))):
        out.write(f"job {job} line {n}\n")
        if n % 1000 == 0:
            out.flush()


def blocked_once(message, set_status, settings):
    """Blocked on its first attempt, Done on the next (a retry)."""
    marker = Path(settings["dir"]) / f"tried-{message.job_id}"
    if not marker.exists():
        marker.touch()
        print("first attempt: the build dependencies are missing")
        raise rbit.Blocked("libfoo-dev is not built yet")
    print("second attempt: building")


def gated(message, set_status, settings):
    """Prints ``line N`` when the file ``go-N`` appears (N = 1, 2, ...); ends when ``end`` or
    ``end-JOB`` does: Failed if the package's name starts with ``fail``, else Done.

    ``line`` in the settings is printed first, as it is (hostile text for the page's tests).
    """
    gate = Path(settings["dir"])
    job = message.job_id
    if settings.get("line"):
        print(settings["line"])
    print(f"job {job} is waiting")
    n = 1
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if (gate / f"go-{n}").exists():
            print(f"line {n} of job {job}")
            n += 1
            continue
        if (gate / "end").exists() or (gate / f"end-{job}").exists():
            if message.request.get_package().startswith("fail"):
                raise rbit.Failed("it was asked to")
            return
        time.sleep(0.02)
    raise rbit.Failed("the test never ended the job")
