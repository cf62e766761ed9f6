"""The Celery columns of bench/bench.py: a Celery 5 worker on the same broker, measured the same way.

Two set-ups, each a ``celery -A celery_tasks worker --pool=prefork
--concurrency=1`` in its own throw-away vhost (``rbit-bench-celery-XXXXXXXX``):

* "process per task": ``--max-tasks-per-child=1``, a fresh process for every
  task, as rbit runs every job in its own process;
* "reused process": ``--max-tasks-per-child`` unset, one process for all tasks.

The tasks are in bench/celery_tasks.py and stamp themselves like
bench/runners.py. Pickup is the publisher's ``time.time()`` just before
``send_task`` against the task's first line, on an idle worker, as rbit's: with
``--max-tasks-per-child=1`` the next sample waits until the replacement pool
process has stamped ``ready`` (its ``worker_process_init``), and the time that
took is recorded too. Throughput pre-loads N tasks behind a gate task holding
the only process, then counts from the first task's start to the last one's
end (or to the cut, when the time box ends the batch): the waits for new
processes are in it, as a user with a queue of tasks sees them. Memory is the
PSS of the Celery main process and every process below it, added up.

Why process per task is slow on this broker and machine: the pool learns that
a process ended from its sentinel pipe, and reaps it then; when the pipe closes
before the kernel lets the process be reaped, that reap finds nothing and the
replacement is started only by the pool's 5 s ``maintain_pool`` timer.
bench/celery_recycle_check.py shows it step by step.
"""

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench import (
    AMQP_HOST,
    AMQP_PORT,
    BENCH,
    percentile,
    rabbitmqctl,
    stop_process,
    summarise_latency,
    tree_memory,
)

#: Task ids, shared by the set-ups of one run (the stamps' receiver is shared too).
_IDS = itertools.count(10**8 + 1)

#: The two set-ups: (label, extra worker options, whether each task ends its process).
SETUPS = {
    "celery_ppt": ("Celery process per task", ["--max-tasks-per-child=1"], True),
    "celery_reused": ("Celery reused process", [], False),
}


def summarise_gaps(gaps_ms):
    """Waits in ms (for a new pool process, or between tasks): count, p50, max, and how many took over 1 s."""
    return {"n": len(gaps_ms), "p50_ms": percentile(gaps_ms, 0.5), "max_ms": max(gaps_ms),
            "over_1s": sum(1 for gap in gaps_ms if gap > 1000)}


def celery_missing():
    """None when Celery 5 can be imported here, else the reason."""
    try:
        import celery
    except ImportError:
        return "Celery is not installed: pip install -r bench/requirements.txt"
    if not celery.__version__.startswith("5."):
        return f"Celery {celery.__version__} is installed, the comparison wants 5.x: pip install -r bench/requirements.txt"
    return None


class CeleryRun:
    """One Celery set-up: its vhost, its worker, and the figures measured like rbit's."""

    def __init__(self, key, sizes, stamps, log=print, app_module="celery_tasks", env=None):
        self.key = key
        self.label, self.options, self.recycles = SETUPS[key]
        self.app_module = app_module  # bench/celery_recycle_check.py passes its instrumented copy
        self.extra_env = env or {}
        self.sizes = sizes
        self.stamps = stamps
        self.log = log
        self.started = time.monotonic()
        self.suffix = uuid.uuid4().hex[:8]
        self.vhost = f"rbit-bench-celery-{self.suffix}"
        self.url = f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{self.vhost}"
        self.tmp = Path(tempfile.mkdtemp(prefix="rbit-bench-celery-"))
        self.release_dir = self.tmp / "release"
        self.release_dir.mkdir()
        self.results = {}
        self.notes = []
        self.process = None
        self._ids = _IDS

    def elapsed(self):
        return time.monotonic() - self.started

    def setup(self):
        rabbitmqctl("add_vhost", self.vhost)
        rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        from celery import Celery

        # The publisher's own app (tasks are sent by name); the worker imports bench/celery_tasks.py.
        self.app = Celery("rbit_bench_publisher", broker=self.url, set_as_current=False)
        self.app.conf.update(task_serializer="json", task_ignore_result=True)
        env = {**os.environ, "PYTHONPATH": str(BENCH), "RBIT_BENCH_CELERY_BROKER": self.url,
               "C_FORCE_ROOT": "1", "RBIT_BENCH_CELERY_REPORT_TO": self.stamps.address, **self.extra_env}
        self._log = open(self.tmp / "celery.log", "ab")  # noqa: SIM115 - the worker's output; closed by cleanup()
        command = [sys.executable, "-m", "celery", "-A", self.app_module, "worker", "--pool=prefork",
                   "--concurrency=1", *self.options, "--without-gossip", "--without-mingle",
                   "--without-heartbeat", "--loglevel=WARNING"]
        self.command = command
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        cwd=str(self.tmp))

    def send(self, name, *args):
        self.app.send_task(name, args=list(args))

    def check_alive(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"the Celery worker exited with status {self.process.returncode}; "
                               f"see {self.tmp / 'celery.log'}")

    def run_one(self, timeout=60.0):
        job_id = next(self._ids)
        published = time.time()
        self.send("bench.stamp", job_id, self.stamps.address)
        started = self.stamps.wait("start", job_id, timeout)
        ended = self.stamps.wait("end", job_id, timeout)
        return published, started, ended

    def wait_idle(self, ended):
        """Wait until the worker could take a task at once again; the seconds its new process took, or None.

        rbit's pickup is measured on an idle worker (it consumes again), so
        Celery's is too. With ``--max-tasks-per-child=1`` the process that ran
        the task exits, and the worker is idle only once its replacement is up
        (the ``ready`` stamp of bench/celery_tasks.py). The pause lets the main
        process read the new process's "up" message that follows the stamp.
        """
        gap = None
        if self.recycles:
            ready = self.stamps.wait_after("ready", ended, timeout=30.0)
            if ready is None:
                raise RuntimeError(f"{self.label}: no new pool process within 30 s; see {self.tmp / 'celery.log'}")
            gap = ready[1] - ended
        time.sleep(self.sizes["celery_pause"])
        return gap

    def batch(self, task, count, timeout):
        """*count* tasks pre-loaded behind a gate task; (tasks with both stamps, first start, window end, pairs)."""
        gate_id = next(self._ids)
        self.send("bench.gate", gate_id, self.stamps.address, str(self.release_dir))
        self.stamps.wait("start", gate_id)
        ids = [next(self._ids) for _ in range(count)]
        with self.app.producer_or_acquire() as producer:
            for job_id in ids:
                self.app.send_task(task, args=[job_id, self.stamps.address], producer=producer)
        (self.release_dir / str(gate_id)).touch()
        # The box starts with the first task: with a process per task, the gate's
        # own replacement may take up to 5 s, and it is not part of the rate.
        self.stamps.wait("start", ids[0], 30.0)
        deadline = time.monotonic() + timeout
        while self.stamps.get("end", ids[-1]) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        cut = time.time()
        pairs = [(self.stamps.get("start", j), self.stamps.get("end", j)) for j in ids]
        done = sorted((s, e) for s, e in pairs if s is not None and e is not None)
        first = done[0][0]
        if len(done) < count:
            # The window ends at the cut, not at the last end: a cut batch is
            # usually waiting for a new process then, and that wait is part of
            # the rate a user sees.
            self.notes.append(f"{self.label}: {task}: time box of {timeout:.0f} s reached, "
                              f"{len(done)} of {count} ran; the rate is those over first start to the cut")
            self.app.control.purge()
            return len(done), first, cut, done
        return len(done), first, done[-1][1], done

    def settle(self, rounds=5):
        """Wait until no task runs and the worker is idle, so that its memory compares with the idle figure.

        A batch cut by its time box may leave a reserved task to run, and with
        a process per task the pool may be waiting for its 5 s timer to start
        the next process: measured then, the pool would be missing from the sum.
        """
        for _ in range(rounds):
            last = self.stamps.latest("end")
            self.wait_idle(last)
            time.sleep(0.5)
            if self.stamps.latest("end") == last:
                return

    def record_gaps(self, kind, done):
        """From one task's end to the next one's start in a batch: where a process-per-task worker loses its time."""
        gaps = [(b[0] - a[1]) * 1000 for a, b in itertools.pairwise(done)]
        if gaps:
            self.results[f"{kind}_gaps"] = summarise_gaps(gaps)

    def phase_pickup(self):
        samples, gaps = [], []
        box = time.monotonic() + self.sizes["celery_latency_box"]
        for _ in range(self.sizes["celery_latency_n"]):
            if samples and time.monotonic() > box:
                self.notes.append(f"{self.label}: pickup: time box of {self.sizes['celery_latency_box']:.0f} s "
                                  f"reached after {len(samples)} samples")
                break
            published, started, ended = self.run_one()
            samples.append((started - published) * 1000)
            gap = self.wait_idle(ended)
            if gap is not None:
                gaps.append(gap * 1000)
        self.results.update(summarise_latency(samples))
        if gaps:
            self.results["replacement"] = summarise_gaps(gaps)

    def phase_throughput(self):
        for kind, task in (("noop", "bench.stamp"), ("shell", "bench.shell")):
            self.log(f"[{self.elapsed():6.1f} s] {self.label}: {task} throughput ...")
            count, first, last, done = self.batch(task, self.sizes["celery_batch_n"], self.sizes["celery_box"])
            self.results[f"{kind}_n"] = count
            self.results[f"{kind}_rate"] = count / (last - first)
            self.record_gaps(kind, done)
            self.check_alive()

    def phase_soak(self):
        rate = self.results["noop_rate"]
        count = max(1, int(rate * self.sizes["celery_soak_box"]))
        ran, _, _, _ = self.batch("bench.stamp", count, self.sizes["celery_soak_box"] + 5)
        self.settle()
        after, _ = tree_memory(self.process.pid)
        self.results.update({"soak_run": ran, "mem_after_soak_mb": after,
                             "mem_growth_mb": after - self.results["mem_idle_mb"]})

    def run(self):
        self.results["loadavg_start"] = os.getloadavg()[0]
        self.setup()
        self.log(f"[{self.elapsed():6.1f} s] {self.label}: warm-up ...")
        for _ in range(2):
            _, _, ended = self.run_one()
            self.wait_idle(ended)
        time.sleep(1.0)
        total, parts = tree_memory(self.process.pid)
        self.results["mem_idle_mb"] = total
        self.results["mem_idle_parts"] = {str(pid): [name, mb] for pid, (name, mb) in parts.items()}
        self.log(f"[{self.elapsed():6.1f} s] {self.label}: pickup latency ...")
        self.phase_pickup()
        self.phase_throughput()
        self.log(f"[{self.elapsed():6.1f} s] {self.label}: memory soak ...")
        self.phase_soak()
        self.check_alive()
        self.results["run_s"] = self.elapsed()
        self.results["loadavg_end"] = os.getloadavg()[0]

    def cleanup(self):
        if self.process is not None:
            stop_process(self.process, 20)
            self._log.close()
        with contextlib.suppress(Exception):  # the publisher's connections; the vhost goes next anyway
            self.app.pool.force_close_all()
        try:
            rabbitmqctl("delete_vhost", self.vhost)
        except Exception as exc:  # noqa: BLE001 - report, never hide the figures
            print(f"warning: could not delete vhost {self.vhost}: {exc}", file=sys.stderr)
        shutil.rmtree(self.tmp, ignore_errors=True)
