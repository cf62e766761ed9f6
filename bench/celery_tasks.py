"""The Celery app of the comparison in bench/bench.py (``celery -A celery_tasks worker``, bench/ on PYTHONPATH).

The tasks do what bench/runners.py does for rbit, and stamp themselves the same
way: one UDP datagram ``start|end JOB_ID time.time()`` to *report_to*, the start
being the task's first line. The broker URL comes from ``RBIT_BENCH_CELERY_BROKER``.
"""

import os
import subprocess
import time

import runners
from celery import Celery
from celery.signals import worker_process_init

app = Celery("rbit_bench", broker=os.environ.get("RBIT_BENCH_CELERY_BROKER", "amqp://guest:guest@127.0.0.1//"))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


def _report(report_to, kind, job_id, stamp):
    runners._send({"report_to": report_to}, f"{kind} {job_id} {stamp!r}")


@worker_process_init.connect
def _report_ready(**_):
    """Stamp ``ready PID TIME`` when a pool process has started, just before it tells the pool it is up.

    With ``--max-tasks-per-child=1`` every task runs in a fresh pool process, so
    the benchmark waits for this stamp before it publishes the next pickup
    sample: the worker is idle again, as rbit is when it consumes again. The
    stamp also times how long the replacement took. Observation only.
    """
    report_to = os.environ.get("RBIT_BENCH_CELERY_REPORT_TO")
    if report_to:
        _report(report_to, "ready", os.getpid(), time.time())


@app.task(name="bench.stamp")
def stamp(job_id, report_to):
    """A no-op task that stamps its start (first line) and end."""
    started = time.time()
    _report(report_to, "start", job_id, started)
    _report(report_to, "end", job_id, time.time())


@app.task(name="bench.noop")
def noop(job_id=None, report_to=None):
    """Nothing at all (the memory soak)."""


@app.task(name="bench.shell")
def shell(job_id, report_to):
    """``subprocess.run(['/bin/true'])``, the task's counterpart of rbit's ``shell!/bin/true``."""
    _report(report_to, "start", job_id, time.time())
    subprocess.run(["/bin/true"], check=True)
    _report(report_to, "end", job_id, time.time())


@app.task(name="bench.gate")
def gate(job_id, report_to, release_dir, max_wait=120.0):
    """Hold the only process until ``RELEASE_DIR/JOB_ID`` exists (the queue is loaded meanwhile)."""
    _report(report_to, "start", job_id, time.time())
    release = os.path.join(release_dir, str(job_id))
    deadline = time.monotonic() + max_wait
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.002)
    _report(report_to, "end", job_id, time.time())
