"""Stand-alone check: where Celery's process-per-task worker spends its time between two tasks.

Usage::

    python bench/celery_recycle_check.py [--tasks 20]

Starts Celery's documented set-up for a fresh process per task, ``celery
worker --pool=prefork --concurrency=1 --max-tasks-per-child=1`` (the command
of bench/celery_bench.py), in a throw-away vhost of the local RabbitMQ, with
this file as its app: the tasks of bench/celery_tasks.py, and wrappers that
log, without changing, three steps of the pool (billiard and
celery.concurrency.asynpool):

* ``sentinel``: the pool sees a pool process's sentinel pipe close
  (``AsynPool._event_process_exit``), its only prompt cue that the process
  ended, and reaps right then;
* ``reap``: ``Pool._join_exited_workers``, the exit codes it collected, and
  whether the call came from the sentinel or from the pool's 5 s timer
  (``AsynPool.timers``: ``maintain_pool`` every 5.0 s);
* ``new process``: ``Pool._create_worker_process``.

TASKS no-op tasks are pre-loaded behind a gate task, as bench/bench.py does,
and the check prints, for each task, the time from the previous task's end to
its start and the pool's steps in between. A task that waits about 5 s shows
the cause: the sentinel closed before the kernel let the process be reaped,
so that reap found nothing, and the sentinel is not watched again; the
replacement is started by the next timer tick.
"""

import argparse
import itertools
import os
import sys
import time
from pathlib import Path


def _log_to(path):
    """A function appending ``TIME EVENT DETAIL`` lines to *path* (one write each, so lines never mix)."""
    def log(event, detail=""):
        with open(path, "a") as handle:
            handle.write(f"{time.time()!r} {event} {detail}\n")
    return log


def instrument(path):
    """Wrap the pool's exit handling to log its steps; behaviour is unchanged."""
    from billiard import pool as bpool
    from celery.concurrency import asynpool

    log = _log_to(path)
    origin = {"from": "timer"}
    join, on_exit, create = (bpool.Pool._join_exited_workers, asynpool.AsynPool._event_process_exit,
                             bpool.Pool._create_worker_process)

    def join_exited(self, *args, **kwargs):
        codes = join(self, *args, **kwargs)
        log("reap", f"from={origin['from']} exit_codes={codes} alive={[p.pid for p in self._pool]}")
        return codes

    def event_process_exit(self, hub, proc):
        log("sentinel", f"pid={proc.pid}")
        origin["from"] = "sentinel"
        try:
            return on_exit(self, hub, proc)
        finally:
            origin["from"] = "timer"

    def create_worker_process(self, index):
        log("new-process")
        return create(self, index)

    bpool.Pool._join_exited_workers = join_exited
    asynpool.AsynPool._event_process_exit = event_process_exit
    bpool.Pool._create_worker_process = create_worker_process


def report(done, events):
    """Print each task's wait since the previous one ended, with the pool's steps in that wait."""
    print(f"{'task':>4} {'wait ms':>8}  pool steps in the wait (ms after the previous task ended)")
    slow = 0
    for number, (previous, task) in enumerate(itertools.pairwise(done), 2):
        ended, started = previous[1], task[0]
        steps = [f"+{(t - ended) * 1000:.0f} {event} {detail}".strip()
                 for t, event, detail in events if ended <= t <= started]
        wait = (started - ended) * 1000
        slow += wait > 1000
        print(f"{number:>4} {wait:8.0f}  " + "; ".join(steps))
    print(f"{slow} of {len(done) - 1} tasks waited over 1 s for their process")


def read_events(path):
    events = []
    for line in Path(path).read_text().splitlines():
        stamp, event, detail = (line.split(" ", 2) + [""])[:3]
        events.append((float(stamp), event, detail))
    return events


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20)
    args = parser.parse_args(argv)
    import celery_bench

    import bench

    stamps = bench.Stamps()
    run = celery_bench.CeleryRun("celery_ppt", dict(bench.SIZES["quick"]), stamps, log=lambda _: None,
                                 app_module="celery_recycle_check")
    trace = run.tmp / "pool-steps.txt"
    run.extra_env["RBIT_BENCH_CELERY_PROBE"] = str(trace)
    try:
        run.setup()
        for _ in range(2):  # the worker is up, and its first process has run a task
            _, _, ended = run.run_one()
            run.wait_idle(ended)
        _, _, _, done = run.batch("bench.stamp", args.tasks, timeout=8.0 * args.tasks)
        print(" ".join(run.command))
        report(done, read_events(trace))
    finally:
        run.cleanup()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
elif os.environ.get("RBIT_BENCH_CELERY_PROBE"):
    # Imported by the worker (``celery -A celery_recycle_check``): the benchmark's app, instrumented.
    from celery_tasks import app  # noqa: F401 - the app Celery looks for

    instrument(os.environ["RBIT_BENCH_CELERY_PROBE"])
