"""The Celery columns of bench/bench.py: a Celery 5 worker on the same broker, measured the same way.

Two set-ups, each a ``celery -A celery_tasks worker --pool=prefork
--concurrency=1`` in its own throw-away vhost (``rbit-bench-celery-XXXXXXXX``):

* "process per task": ``--max-tasks-per-child=1``, a fresh process for every
  task, as rbit runs every job in its own process;
* "reused process": ``--max-tasks-per-child`` unset, one process for all tasks.

The tasks are in bench/celery_tasks.py and stamp themselves like
bench/runners.py. Pickup is the publisher's ``time.time()`` just before
``send_task`` against the task's first line. Throughput pre-loads N tasks behind
a gate task holding the only process, then counts from the first task's start
to the last one's end. Memory is the PSS of the Celery main process and every
process below it, added up.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import itertools
import uuid
from pathlib import Path

from bench import AMQP_HOST, AMQP_PORT, BENCH, rabbitmqctl, summarise_latency, tree_memory

#: Task ids, shared by the set-ups of one run (the stamps' receiver is shared too).
_IDS = itertools.count(10**8 + 1)

#: The two set-ups: (label, extra worker options).
SETUPS = {
    "celery_ppt": ("Celery process per task", ["--max-tasks-per-child=1"]),
    "celery_reused": ("Celery reused process", []),
}


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

    def __init__(self, key, sizes, stamps, log=print):
        self.key = key
        self.label, self.options = SETUPS[key]
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
               "C_FORCE_ROOT": "1"}
        self._log = open(self.tmp / "celery.log", "ab")
        command = [sys.executable, "-m", "celery", "-A", "celery_tasks", "worker", "--pool=prefork",
                   "--concurrency=1", *self.options, "--without-gossip", "--without-mingle",
                   "--without-heartbeat", "--loglevel=WARNING"]
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

    def batch(self, task, count, timeout):
        """*count* tasks pre-loaded behind a gate task; (tasks with both stamps, first start, last end)."""
        gate_id = next(self._ids)
        self.send("bench.gate", gate_id, self.stamps.address, str(self.release_dir))
        self.stamps.wait("start", gate_id)
        ids = [next(self._ids) for _ in range(count)]
        with self.app.producer_or_acquire() as producer:
            for job_id in ids:
                self.app.send_task(task, args=[job_id, self.stamps.address], producer=producer)
        (self.release_dir / str(gate_id)).touch()
        deadline = time.monotonic() + timeout
        while self.stamps.get("end", ids[-1]) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        pairs = [(self.stamps.get("start", j), self.stamps.get("end", j)) for j in ids]
        done = [(s, e) for s, e in pairs if s is not None and e is not None]
        if len(done) < count:
            self.notes.append(f"{self.label}: {task}: time box of {timeout:.0f} s reached, "
                              f"{len(done)} of {count} ran; the rate counts those")
            self.app.control.purge()
        return len(done), min(s for s, _ in done), max(e for _, e in done)

    def run(self):
        self.results["loadavg_start"] = os.getloadavg()[0]
        self.setup()
        self.log(f"[{self.elapsed():6.1f} s] {self.label}: warm-up ...")
        for _ in range(2):
            self.run_one()
        time.sleep(1.0)
        total, parts = tree_memory(self.process.pid)
        self.results["mem_idle_mb"] = total
        self.results["mem_idle_parts"] = {str(pid): [name, mb] for pid, (name, mb) in parts.items()}
        self.log(f"[{self.elapsed():6.1f} s] {self.label}: pickup latency ...")
        samples = []
        box = time.monotonic() + self.sizes["celery_box"]
        for _ in range(self.sizes["celery_latency_n"]):
            if samples and time.monotonic() > box:
                self.notes.append(f"{self.label}: pickup: time box of {self.sizes['celery_box']:.0f} s reached "
                                  f"after {len(samples)} samples")
                break
            published, started, _ = self.run_one()
            samples.append((started - published) * 1000)
            time.sleep(self.sizes["celery_pause"])  # the worker is idle again (its next process is ready)
        self.results.update(summarise_latency(samples))
        for kind, task in (("noop", "bench.stamp"), ("shell", "bench.shell")):
            self.log(f"[{self.elapsed():6.1f} s] {self.label}: {task} throughput ...")
            count, first, last = self.batch(task, self.sizes["celery_batch_n"], self.sizes["celery_box"])
            self.results[f"{kind}_n"] = count
            self.results[f"{kind}_rate"] = count / (last - first)
            self.check_alive()
        self.log(f"[{self.elapsed():6.1f} s] {self.label}: memory soak ...")
        rate = self.results["noop_rate"]
        count = max(1, int(rate * self.sizes["celery_soak_box"]))
        ran, first, last = self.batch("bench.stamp", count, self.sizes["celery_soak_box"] + 5)
        time.sleep(1.0)
        after, _ = tree_memory(self.process.pid)
        self.results.update({"soak_run": ran, "mem_after_soak_mb": after,
                             "mem_growth_mb": after - self.results["mem_idle_mb"]})
        self.check_alive()
        self.results["run_s"] = self.elapsed()
        self.results["loadavg_end"] = os.getloadavg()[0]

    def cleanup(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process is not None:
            self._log.close()
        try:
            self.app.pool.force_close_all()
        except Exception:  # noqa: BLE001
            pass
        try:
            rabbitmqctl("delete_vhost", self.vhost)
        except Exception as exc:  # noqa: BLE001 - report, never hide the figures
            print(f"warning: could not delete vhost {self.vhost}: {exc}", file=sys.stderr)
        shutil.rmtree(self.tmp, ignore_errors=True)
