"""Benchmark of one rbit worker against the local RabbitMQ, in one run of under five minutes.

Usage::

    python bench/bench.py [--quick] [--json] [--markdown] [--joblog] [--both-paths] [--no-celery]

First the Celery columns (bench/celery_bench.py, if Celery 5 is installed:
``pip install -r bench/requirements.txt``), then one real rbit worker started
as the systemd unit starts it (the ``rbit`` console script beside this Python,
``rbit CONFIG``; ``--both-paths`` also ``python -m rbit CONFIG``), concurrency
1, in its own throw-away vhost:

1. warm-up: one job, so that first-job costs (imports, the fork server's first
   fork) are not counted as idle or latency;
2. idle: PSS (``/proc/PID/smaps_rollup``) of the worker and of every process
   below it (rbit's fork server, and the guard and a waiting job process per
   slot that it forked), added up, then CPU time
   (utime+stime from ``/proc/PID/stat``) over 10 s of idleness;
3. pickup latency: one request at a time, the publisher's ``time.time()`` just
   before ``basic_publish`` against the runner's ``time.time()`` at its start
   (bench/runners.py sends it back by UDP); the next request is published only
   once the job has ended and the worker consumes again (idle worker); then
   the same for the pickup's floor (bench/floors.py ``pickup``): rbit's steps
   for one message and its waiting process in a bare loop, on a vhost of its
   own, with the copy's confirm timed alone;
4. baselines (the floor): a bare kombu consume-and-ack loop (prefetch 1) over
   N pre-loaded requests of the same kind, and ``subprocess.run(['/bin/true'])``
   N times; then the floors rbit's promises set (bench/floors.py): the
   promises' broker steps alone (confirmed copy, nowait cancel, ack, nowait
   purge, consume again) on a vhost of their own, no process; and a fresh process per
   job from rbit's fork server alone (``rbit.jobs.JobProcess``), no broker,
   sequential and overlapped, for a no-op ``python!`` and a ``shell!/bin/true``
   job; and the two together in one bare loop (no rbit loop), measured, on a
   vhost of its own;
5. throughput of a no-op python runner: N requests pre-loaded, rate from the
   first job's start to the last job's end (both stamped by the runner);
6. throughput of ``shell!/bin/true``: N requests pre-loaded between two
   malformed "marker" messages; the worker moves each marker to its rejected
   queue, where the benchmark sees it arrive: the rate is N over the time
   between the two markers (the job processes cannot stamp themselves);
7. memory soak: up to 20,000 no-op jobs, as many as the time left allows
   (the count actually run is printed), then the PSS again;
8. broker round trips: the worker restarted with bench/amqp_trace on its
   PYTHONPATH, 20 jobs one at a time, the AMQP methods it sent per job.

Pre-loading uses the worker's own behaviour: a "gate" job holds its only slot,
so it has cancelled its consumers; the benchmark fills a queue, then lets the
gate job end.

Every figure is printed next to Celery's, the floor and its target, with PASS or MISS
for rbit, and a table of ratios; then, for each throughput figure, the floors that bound it
and whether its target is above them.
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from pathlib import Path
from typing import ClassVar

import amqp
from floors import PROCESS_RUNNERS, broker_floor, served_queues
from kombu import Connection, Consumer, Queue

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from rbit.pybit import encode, make_request
from tests.harness import write_config

AMQP_HOST = os.environ.get("RBIT_TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("RBIT_TEST_AMQP_PORT", "5672"))

#: The whole run must end within this many seconds (``--budget``).
TOTAL_BUDGET = 300.0
#: Seconds kept in reserve for stopping the worker and deleting the vhost.
RESERVE = 20.0
#: Job id written into the template request, replaced by each message's own.
TEMPLATE_ID = 987654321

#: The throughput targets: no-op python! jobs/s, and shell!/bin/true's share of the bare subprocess.run loop.
NOOP_TARGET = 150
SHELL_SHARE = 0.3
#: The pickup targets, p50 and p99, in ms.
PICKUP_P50, PICKUP_P99 = 5, 20

#: The table's rows, by result key: (label, unit, whether higher is better, floor key, test, target as printed).
#: The targets are issue 12's; the verdict is on the rbit columns.
FIGURES = {
    "latency_p50_ms": ("pickup p50", "ms", False, "pickup_floor_p50_ms", lambda v: v <= PICKUP_P50, f"<= {PICKUP_P50} ms"),
    "latency_p99_ms": ("pickup p99", "ms", False, "pickup_floor_p99_ms", lambda v: v <= PICKUP_P99, f"<= {PICKUP_P99} ms"),
    "noop_rate": ("no-op jobs/s", "/s", True, "bare_kombu_rate", lambda v: v >= NOOP_TARGET, f">= {NOOP_TARGET} /s"),
    "shell_rate": ("/bin/true jobs/s", "/s", True, "bare_subprocess_rate", None, "(see next)"),
    "shell_ratio": ("/bin/true / floor", "", True, None, lambda v: v >= SHELL_SHARE, f">= {SHELL_SHARE}"),
    "mem_idle_mb": ("idle PSS, all kept", "MB", False, None, lambda v: v <= 78, "<= 78 MB"),
    "mem_growth_mb": ("PSS growth", "MB", False, None, lambda v: v < 2, "< 2 MB"),
    "cpu_idle_pct": ("idle CPU", "%", False, None, lambda v: v < 1, "< 1 %"),
}

#: What the floor phases record beside their rates, carried to a later column with them.
FLOOR_FACTS = ("broker_floor_queues", "broker_floor_n", "process_floor_n", "process_floor_rounds",
               "process_python_sequential_all_rate", "process_python_overlapped_all_rate",
               "process_shell_sequential_all_rate", "process_shell_overlapped_all_rate",
               "combined_floor_n", "combined_floor_rounds", "combined_floor_queues",
               "combined_python_all_rate", "combined_shell_all_rate",
               "pickup_floor_n", "pickup_floor_queues", "pickup_floor_mean_ms", "pickup_floor_confirm_p50_ms",
               "pickup_floor_confirm_p99_ms")

#: Phase sizes: full run and --quick.
SIZES = {
    "full": {"idle_s": 10.0, "latency_n": 200, "batch_n": 500, "batch_box": 40.0, "soak_n": 20000, "soak_box": 120.0,
                 "budget": TOTAL_BUDGET, "celery_latency_n": 100, "celery_batch_n": 300, "celery_soak_box": 10.0,
                 "celery_pause": 0.05, "celery_box": 20.0, "celery_latency_box": 30.0, "module_soak_box": 20.0,
                 "floor_n": 300},
    "quick": {"idle_s": 3.0, "latency_n": 30, "batch_n": 100, "batch_box": 20.0, "soak_n": 1000, "soak_box": 10.0,
                  "budget": TOTAL_BUDGET, "celery_latency_n": 20, "celery_batch_n": 50, "celery_soak_box": 3.0,
                  "celery_pause": 0.05, "celery_box": 8.0, "celery_latency_box": 12.0, "module_soak_box": 5.0,
                  "floor_n": 90},
}

#: The floor of the promises' broker steps and a fresh process per job measured in one loop, as its rows say.
TOGETHER = "the promises' broker steps and a fresh process per job, together (no rbit loop)"

#: The pickup's floor, as its rows say.
PICKUP = "pickup: the promises' steps for one message and its warm process (no rbit loop), idle"

#: The floors measured in the run, by result key: (label, what it is). bench/floors.py measures the
#: promises' two, apart and together; the bare loops are the older floors.
FLOORS = {
    "bare_kombu_rate": ("bare kombu consume+ack, prefetch 1", "msg/s"),
    "broker_floor_rate": ("the promises' broker steps, no process", "msg/s"),
    "process_python_sequential_rate": ("a fresh process per job, no-op python!, sequential", "proc/s"),
    "process_python_overlapped_rate": ("a fresh process per job, no-op python!, overlapped", "proc/s"),
    "process_shell_sequential_rate": ("a fresh process per job, shell!/bin/true, sequential", "proc/s"),
    "process_shell_overlapped_rate": ("a fresh process per job, shell!/bin/true, overlapped", "proc/s"),
    "combined_python_rate": (f"{TOGETHER}, no-op python!", "jobs/s"),
    "combined_shell_rate": (f"{TOGETHER}, shell!/bin/true", "jobs/s"),
    "bare_subprocess_rate": ("bare subprocess.run(['/bin/true'])", "runs/s"),
    "pickup_floor_p50_ms": (f"{PICKUP}, p50", "ms"),
    "pickup_floor_p99_ms": (f"{PICKUP}, p99", "ms"),
}


def floor_text(value, unit):
    """A floor's figure as printed: rates whole, times to a tenth of a millisecond."""
    return f"{value:.1f} {unit}" if unit == "ms" else f"{value:.0f} {unit}"


# -- /proc -------------------------------------------------------------------


def _proc_mb(path, key):
    """The ``KEY: N kB`` line *key* of the /proc file *path*, in MB (1 MB = 1024 kB); None if
    the file cannot be read (the process is gone) or has no such line."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb(pid):
    """VmRSS of *pid* in MB, or None if it is gone."""
    return _proc_mb(f"/proc/{pid}/status", "VmRSS:")


def cpu_ticks(pid):
    """utime + stime of *pid*, in clock ticks."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def children(pid):
    """{child pid: command line} of *pid*'s direct children."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as cmd:
                    found[int(entry)] = cmd.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    return found


def pss_mb(pid):
    """Proportional set size of *pid* in MB, from /proc/PID/smaps_rollup (VmRSS if unreadable), or None."""
    pss = _proc_mb(f"/proc/{pid}/smaps_rollup", "Pss:")
    return pss if pss is not None else rss_mb(pid)


def descendants(pid):
    """{pid: (parent pid, command line)} of every process below *pid* (children, their children, ...)."""
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, cmdline in children(parent).items():
            if child not in found:
                found[child] = (parent, cmdline)
                todo.append(child)
    return found


def session_leader(pid):
    """True if *pid* leads its own session (a job process calls setsid first thing); None if it is gone."""
    try:
        return os.getsid(pid) == pid
    except OSError:
        return None


#: What the command line of rbit's fork server (rbit/forkserver.py), and so of every process it
#: forks, contains: it is started as ``python -c "...; from rbit.forkserver import main; main(...)"``.
FORK_SERVER_MARK = "rbit.forkserver"


#: The order of rbit's processes in a memory breakdown (any other process comes after them).
ROLE_ORDER = {"fork server": 0, "guard": 1, "waiting job process": 2}


def role(pid, parent, cmdline, worker_pid, forkserver_pid):
    """A short name for a process the worker keeps, from where it sits in the tree.

    The fork server is the worker's child whose command line has
    :data:`FORK_SERVER_MARK`. Its children have its command line too (they are
    forked from it): a job process makes itself a session leader first thing,
    the guard (rbit/guard.py) does not. With no job running, each job process
    is one waiting for its slot's next job.
    """
    if parent == worker_pid and FORK_SERVER_MARK in cmdline:
        return "fork server"
    if parent == forkserver_pid:
        return "waiting job process" if session_leader(pid) else "guard"
    return cmdline.split(" ")[0].rsplit("/", 1)[-1][:20]


def tree_memory(pid):
    """(PSS in MB of *pid* and every process it keeps, added up; {pid: (short name, MB)})."""
    parts = {pid: ("main", pss_mb(pid))}
    below = descendants(pid)
    forkserver = next((child for child, (parent, cmdline) in below.items()
                       if parent == pid and FORK_SERVER_MARK in cmdline), None)
    roles = {child: role(child, parent, cmdline, pid, forkserver) for child, (parent, cmdline) in below.items()}
    for child in sorted(roles, key=lambda child: ROLE_ORDER.get(roles[child], len(ROLE_ORDER))):
        parts[child] = (roles[child], pss_mb(child))
    return sum(mb for _, mb in parts.values() if mb is not None), parts


def memory_parts_text(parts):
    """'main 30.1, fork server 12.0, guard 3.1, ...': each process's PSS in MB, by role."""
    return ", ".join(f"{label} {mb:.1f}" for label, mb in parts.values() if mb is not None)


def fork_server_pid(worker_pid):
    """The pid of the worker's fork server (rbit/forkserver.py), or None when it has none."""
    return next((pid for pid, cmdline in children(worker_pid).items() if FORK_SERVER_MARK in cmdline), None)


# -- The broker side -----------------------------------------------------------


def rabbitmqctl(*args):
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60)


class BenchBroker:
    """The benchmark's connections to its own vhost: publishing, queue checks, markers."""

    def __init__(self, vhost, rejected_queue):
        self.url = f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{vhost}"
        self.confirmed = Connection(self.url, transport_options={"confirm_publish": True})
        self.bulk = Connection(self.url)
        self.watch = Connection(self.url)
        self.confirm_channel = self.confirmed.channel()
        self.bulk_channel = self.bulk.channel()
        self.watch_channel = self.watch.channel()
        self.rejected_queue = rejected_queue
        self.markers = {}
        self._marker_consumer = None

    def close(self):
        for conn in (self.confirmed, self.bulk, self.watch):
            with contextlib.suppress(Exception):  # closing at the end: a broken connection is no news
                conn.release()

    def declare_build_queue(self, queue, routing_key):
        """Declare a build queue exactly as PyBit does, so that messages wait for the worker."""
        channel = self.bulk_channel
        channel.exchange_declare("pybit", "direct", durable=True, auto_delete=False)
        channel.queue_declare(queue, durable=True, exclusive=False, auto_delete=False)
        channel.queue_bind(queue, "pybit", routing_key)

    def queue_info(self, queue):
        """(ready messages, consumers) of *queue*."""
        ok = self.bulk_channel.queue_declare(queue, passive=True)
        return ok.message_count, ok.consumer_count

    def publish_confirmed(self, body, routing_key):
        """Publish like PyBit (exchange pybit, persistent, mandatory), waiting for the confirm."""
        message = amqp.Message(body, delivery_mode=2, content_type="application/json")
        self.confirm_channel.basic_publish(message, exchange="pybit", routing_key=routing_key, mandatory=True)

    def publish_bulk(self, bodies, routing_key, queue, timeout=10.0):
        """Publish many bodies without confirms, then wait until *queue* holds them all.

        Only for a queue nobody consumes at the time. The broker's message count
        lags the publishes a little, so it is polled.
        """
        before, _ = self.queue_info(queue)
        for body in bodies:
            message = amqp.Message(body, delivery_mode=2, content_type="application/json")
            self.bulk_channel.basic_publish(message, exchange="pybit", routing_key=routing_key)
        deadline = time.monotonic() + timeout
        while (depth := self.queue_info(queue)[0]) - before < len(bodies):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{queue}: expected {len(bodies)} more messages, found {depth - before}")
            time.sleep(0.01)
        if depth - before != len(bodies):
            raise RuntimeError(f"{queue}: expected {len(bodies)} more messages, found {depth - before}")

    def purge(self, queue):
        return self.bulk_channel.queue_purge(queue) or 0

    def watch_markers(self):
        """Consume the worker's rejected queue: each marker body is timed on arrival."""
        queue = Queue(self.rejected_queue, durable=True, auto_delete=False)
        queue(self.watch_channel).declare()

        def on_message(message):
            body = message.body
            self.markers[body.decode() if isinstance(body, bytes) else body] = time.time()

        self._marker_consumer = Consumer(self.watch_channel, queues=[queue], on_message=on_message,
                                         no_ack=True, auto_declare=False)
        self._marker_consumer.consume()

    def wait_marker(self, body, timeout):
        """Time at which the marker *body* reached the rejected queue, or None after *timeout*."""
        deadline = time.monotonic() + timeout
        while body not in self.markers:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                self.watch.drain_events(timeout=min(left, 1.0))
            except TimeoutError:
                pass
        return self.markers[body]


def wait_for_consumer(broker, queue, who, timeout=10.0, check=lambda: None):
    """Wait until *queue* has a consumer (*who* consumes again), calling *check* at each look;
    TimeoutError after *timeout*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check()
        if broker.queue_info(queue)[1] >= 1:
            return
        time.sleep(0.002)
    raise TimeoutError(f"{who} does not consume its queues")


class Stamps:
    """Receives the runners' UDP datagrams (``start|end JOB_ID TIME``) in a thread."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.events = {}
        self.cond = threading.Condition()
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self):
        while True:
            try:
                data = self.sock.recv(512)
            except OSError:
                return
            kind, job_id, stamp = data.decode().split()
            with self.cond:
                self.events[(kind, int(job_id))] = float(stamp)
                self.cond.notify_all()

    def wait(self, kind, job_id, timeout=30.0):
        with self.cond:
            if not self.cond.wait_for(lambda: (kind, job_id) in self.events, timeout):
                raise TimeoutError(f"no {kind} stamp for job {job_id} within {timeout} s")
            return self.events[(kind, job_id)]

    def get(self, kind, job_id):
        with self.cond:
            return self.events.get((kind, job_id))

    def latest(self, kind):
        """The time of the latest *kind* stamp so far (0.0 without one)."""
        with self.cond:
            return max((stamp for key, stamp in self.events.items() if key[0] == kind), default=0.0)

    def wait_after(self, kind, after, timeout=30.0):
        """The first *kind* stamp later than *after*, as (id, time); None after *timeout*.

        For stamps whose id is not known in advance (a Celery pool process's
        ``ready PID TIME``).
        """
        def first():
            found = [(stamp, key[1]) for key, stamp in self.events.items() if key[0] == kind and stamp > after]
            return min(found) if found else None

        with self.cond:
            hit = self.cond.wait_for(first, timeout)
            return (hit[1], hit[0]) if hit else None


# -- The worker ----------------------------------------------------------------


#: How the worker is started: the label printed, and whether it is the console script.
PATHS = {"script": "rbit CONFIG", "module": "python -m rbit"}


def rbit_command(path, config_path):
    """The worker's command line: ``rbit CONFIG`` as the systemd unit runs it, or ``python -m rbit CONFIG``.

    The console script is the one installed beside the Python running the
    benchmark (``pip install -e .`` puts it there), as in the unit's
    ``ExecStart=/opt/rbit/bin/rbit /etc/rbit/rbit.ini``.
    """
    if path == "module":
        return [sys.executable, "-m", "rbit", str(config_path)]
    script = Path(sys.executable).parent / "rbit"
    if not script.exists():
        raise SystemExit(f"no rbit console script beside {sys.executable}: pip install -e . first")
    return [str(script), str(config_path)]


class WorkerUnderTest:
    """``rbit CONFIG`` (or ``python -m rbit CONFIG`` with path="module", or *command*) as a real subprocess."""

    def __init__(self, config_path, log_path, command=None, env=None, path="script"):
        self.config_path = config_path
        self.log_path = log_path
        self.command = command or rbit_command(path, config_path)
        self.env = env or {}
        self.process = None

    def start(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(BENCH)]), **self.env}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - the worker's output; closed by stop()
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            cwd=str(self.config_path.parent),
        )

    @property
    def pid(self):
        return self.process.pid

    def check_alive(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"the worker exited with status {self.process.returncode}; see {self.log_path}")

    def stop(self):
        if self.process is None:
            return
        stop_process(self.process, 15)
        self._log.close()


def stop_process(process, grace):
    """SIGTERM *process* if it still runs, and SIGKILL it if it has not ended *grace* seconds later."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


# -- The benchmark ---------------------------------------------------------------


class Bench:
    """One run: the vhost, the worker, the phases and their figures."""

    QUEUES: ClassVar[dict] = {
        # kind: (routing key, runner line); the queue is bench_KIND_SUFFIX
        "lat": ("bench.any.lat.x", "python!runners:stamp"),
        "noop": ("bench.any.noop.x", "python!runners:stamp"),
        "shell": ("bench.any.shell.x", "shell!/bin/true"),
        "soak": ("bench.any.soak.x", "python!runners:noop"),
        "gate": ("bench.any.gate.x", "python!runners:gate"),
    }

    def __init__(self, sizes, log=print, path="script", stamps=None, baselines=None, trace=False):
        self.sizes = sizes
        self.log = log
        self.path = path
        self.trace = trace  # count the broker round trips per job at the end (a second, traced worker)
        self.baselines = baselines  # bare kombu and subprocess rates measured by an earlier run, if any
        self.started = time.monotonic()
        self.suffix = uuid.uuid4().hex[:8]
        self.vhost = f"rbit-bench-{self.suffix}"
        self.name = f"rbit-bench-{self.suffix}"
        self.rejected = f"rbit.rejected.{self.name}"
        self.tmp = Path(tempfile.mkdtemp(prefix="rbit-bench-"))
        self.release_dir = self.tmp / "release"
        self.release_dir.mkdir()
        self.stamps = stamps or Stamps()
        self.results = {}
        self.notes = []
        self.broker = None
        self.worker = None
        self._job_ids = iter(range(1, 10**8))
        self._template = encode(make_request(TEMPLATE_ID, "hello", "1.0", "bench", "any", "x", "x"))

    # -- set-up and clean-up ---------------------------------------------------

    def queue(self, kind):
        return f"bench_{kind}_{self.suffix}"

    def routing_key(self, kind):
        return self.QUEUES[kind][0]

    def body(self, job_id):
        """A PyBit build request (PyBit's exact jsonpickle format) with *job_id*."""
        return self._template.replace(f'"id": {TEMPLATE_ID},', f'"id": {job_id},', 1)

    def setup(self):
        """Make the vhost and the queues, then start the worker and wait until it consumes."""
        self.setup_broker()
        self.start_worker()

    def setup_broker(self):
        rabbitmqctl("add_vhost", self.vhost)
        rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        self.broker = BenchBroker(self.vhost, self.rejected)
        for kind in self.QUEUES:
            self.broker.declare_build_queue(self.queue(kind), self.routing_key(kind))
        self.broker.watch_markers()

    def start_worker(self, wait=True):
        runners = {}
        for kind, (key, line) in self.QUEUES.items():
            section = {"runner": line, "routing_key": key}
            if line.startswith("python!"):
                section["report_to"] = self.stamps.address  # where the runner sends its stamps
            if kind == "gate":
                section["release_dir"] = str(self.release_dir)
            runners[self.queue(kind)] = section
        config = write_config(
            self.tmp / "bench.ini", name=self.name, vhost=types.SimpleNamespace(name=self.vhost),
            runners=runners, rbit={"concurrency": "1", "rejected_queue": self.rejected},
        )
        config.chmod(0o600)  # else the worker warns that every user can read the password
        self.config = config
        self.worker = self.make_worker(config)
        self.worker.start()
        if wait:
            self.wait_consuming(timeout=30)

    def make_worker(self, config):
        """The worker under test (a subclass may run it differently)."""
        return WorkerUnderTest(config, self.tmp / "worker.log", path=self.path)

    def cleanup(self, keep_files=False):
        """Stop the worker, close the connections, delete the vhost (and the temporary files)."""
        if self.worker is not None:
            self.worker.stop()
        if self.broker is not None:
            self.broker.close()
        try:
            rabbitmqctl("delete_vhost", self.vhost)
        except Exception as exc:  # noqa: BLE001 - report, never hide the figures
            print(f"warning: could not delete vhost {self.vhost}: {exc}", file=sys.stderr)
        if not keep_files:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def elapsed(self):
        return time.monotonic() - self.started

    # -- waiting for the worker --------------------------------------------------

    def wait_consuming(self, timeout=10.0):
        """Wait until the worker consumes its queues again (it is idle, between jobs).

        The worker starts its consumers one queue at a time, in the order of the
        configuration, so the last queue having its consumer means all have.
        """
        wait_for_consumer(self.broker, self.queue(list(self.QUEUES)[-1]), "the worker", timeout,
                          check=self.worker.check_alive)

    def run_one(self, kind="lat"):
        """Publish one request; once the worker is idle again, return (job id, publish time, start, end)."""
        job_id = next(self._job_ids)
        body = self.body(job_id)
        published = time.time()
        self.broker.publish_confirmed(body, self.routing_key(kind))
        started = self.stamps.wait("start", job_id)
        ended = self.stamps.wait("end", job_id)
        self.wait_consuming()
        return job_id, published, started, ended

    # -- pre-loading behind a gate job ---------------------------------------

    def batch(self, kind, count, timeout):
        """Run *count* jobs of *kind* from a pre-loaded queue, bracketed by two markers.

        Returns a dict: job ids, jobs actually run, and the times the markers
        reached the rejected queue. After *timeout* the rest of the queue is
        purged and the count of jobs run says so.
        """
        gate_id = next(self._job_ids)
        self.broker.publish_confirmed(self.body(gate_id), self.routing_key("gate"))
        self.stamps.wait("start", gate_id)  # the slot is taken: the worker consumes nothing now
        first_id = next(self._job_ids)
        ids = [first_id] + [next(self._job_ids) for _ in range(count - 1)]
        begin, end = f"marker begin {first_id}", f"marker end {first_id}"
        bodies = [begin] + [self.body(job_id) for job_id in ids] + [end]
        self.broker.publish_bulk(bodies, self.routing_key(kind), self.queue(kind))
        (self.release_dir / str(gate_id)).touch()
        t_begin = self.broker.wait_marker(begin, 30)
        t_end = self.broker.wait_marker(end, timeout)
        run = count
        if t_end is None:
            purged = self.broker.purge(self.queue(kind))
            stop = f"marker stop {first_id}"
            self.broker.publish_confirmed(stop, self.routing_key(kind))
            t_end = self.broker.wait_marker(stop, 60)  # the job running at the purge has ended
            # Unless the end marker slipped through before the purge, it was purged too.
            run = count - purged + (0 if end in self.broker.markers else 1)
        self.wait_consuming()
        return {"ids": ids, "run": run, "t_begin": t_begin, "t_end": t_end}

    # -- phases -------------------------------------------------------------------

    def phase_warmup(self):
        """One job (first-job costs are not the idle state), then find the fork server."""
        self.run_one()
        time.sleep(1.0)
        self.forkserver = fork_server_pid(self.worker.pid)
        if self.forkserver is None:
            raise RuntimeError("no fork server found among the worker's children")

    def memory(self):
        """PSS (MB) of the worker, of its fork server, and of all it keeps added up (the fork server,
        the guard and the waiting job processes)."""
        total, parts = tree_memory(self.worker.pid)
        return {
            "total": total,
            "parts": parts,
            "worker": pss_mb(self.worker.pid),
            "forkserver": pss_mb(self.forkserver),
            "worker_rss": rss_mb(self.worker.pid),
        }

    def phase_idle(self):
        seconds = self.sizes["idle_s"]
        memory = self.memory()
        self.results.update({
            "mem_idle_mb": memory["total"],
            "mem_idle_parts": {str(pid): [name, mb] for pid, (name, mb) in memory["parts"].items()},
            "pss_idle_mb": memory["worker"],
            "rss_idle_mb": memory["worker_rss"],
            "forkserver_pss_idle_mb": memory["forkserver"],
        })
        pids = {"worker": self.worker.pid, "forkserver": self.forkserver}
        before = {who: cpu_ticks(pid) for who, pid in pids.items()}
        t0 = time.monotonic()
        time.sleep(seconds)
        wall = time.monotonic() - t0
        hz = os.sysconf("SC_CLK_TCK")
        for who, pid in pids.items():
            used = (cpu_ticks(pid) - before[who]) / hz
            key = "cpu_idle_pct" if who == "worker" else "forkserver_cpu_idle_pct"
            self.results[key] = 100.0 * used / wall
        self.results["cpu_idle_window_s"] = wall

    def phase_latency(self):
        samples = []
        for _ in range(self.sizes["latency_n"]):
            _, published, started, _ = self.run_one()
            samples.append((started - published) * 1000)
        self.results.update(summarise_latency(samples))

    def phase_bare_kombu(self):
        """A bare consume-and-ack loop, prefetch 1, over pre-loaded requests of the same kind."""
        if self.baselines:
            self.results["bare_kombu_rate"] = self.baselines["bare_kombu_rate"]
            return
        count = self.sizes["batch_n"]
        queue = self.queue("bare")
        self.broker.declare_build_queue(queue, "bench.any.bare.x")
        self.broker.publish_bulk([self.body(i + 1) for i in range(count)], "bench.any.bare.x", queue)
        times = []
        with Connection(self.broker.url) as conn:
            channel = conn.channel()
            channel.basic_qos(prefetch_size=0, prefetch_count=1, a_global=True)

            def on_message(message):
                received = time.time()
                message.ack()
                times.append((received, time.time()))

            consumer = Consumer(channel, queues=[Queue(queue, no_declare=True)], on_message=on_message,
                                auto_declare=False)
            consumer.consume()
            while len(times) < count:
                conn.drain_events(timeout=30)
        window = times[-1][1] - times[0][0]
        self.results["bare_kombu_rate"] = count / window

    def phase_bare_subprocess(self):
        if self.baselines:
            self.results["bare_subprocess_rate"] = self.baselines["bare_subprocess_rate"]
            return
        count = self.sizes["batch_n"]
        t0 = time.perf_counter()
        for _ in range(count):
            subprocess.run(["/bin/true"], check=True)
        self.results["bare_subprocess_rate"] = count / (time.perf_counter() - t0)

    @contextlib.contextmanager
    def floor_vhost(self):
        """The AMQP URL of a vhost of the floors' own (``VHOST-floor``), deleted after."""
        vhost = f"{self.vhost}-floor"
        rabbitmqctl("add_vhost", vhost)
        try:
            rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
            yield f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{vhost}"
        finally:
            rabbitmqctl("delete_vhost", vhost)

    def phase_broker_floor(self):
        """The promises' broker steps alone (bench/floors.py), on a vhost of their own, no process."""
        if self.baselines:
            self.results.update({key: value for key, value in self.baselines.items() if key.startswith("broker_floor")})
            return
        with self.floor_vhost() as url:
            bodies = [self.body(i + 1) for i in range(self.sizes["batch_n"])]
            self.results.update(broker_floor(url, bodies, served=len(self.QUEUES)))

    def phase_process_floor(self):
        """A fresh process per job from rbit's fork server alone (bench/floors.py), no broker.

        In a process of its own: it starts its own fork server, and the
        benchmark's threads (the UDP stamps) are not in it.
        """
        if self.baselines:
            self.results.update({key: value for key, value in self.baselines.items() if key.startswith("process_")})
            return
        done = subprocess.run(
            [sys.executable, str(BENCH / "floors.py"), "process", str(self.sizes["floor_n"])],
            capture_output=True, text=True, timeout=180, check=False, cwd=str(BENCH),
        )
        if done.returncode != 0:
            raise RuntimeError(f"bench/floors.py process failed: {done.stderr.strip()[-2000:]}")
        figures = json.loads(done.stdout)
        for kind in ("python", "shell"):
            for mode in ("sequential", "overlapped"):
                self.results[f"process_{kind}_{mode}_rate"] = figures[kind][mode]
                self.results[f"process_{kind}_{mode}_all_rate"] = figures[kind][f"{mode}_all"]
        self.results["process_floor_n"] = figures["n"]
        self.results["process_floor_rounds"] = figures["rounds"]
        self.notes += [f"process floor: {text}" for text in figures["failed"]]

    def phase_combined_floor(self):
        """The promises' broker steps and a fresh process per job together, in one bare loop (bench/floors.py).

        In a process of its own, as the process floor, on a vhost of its own,
        consuming as many queues as the worker serves.
        """
        if self.baselines:
            self.results.update({key: value for key, value in self.baselines.items() if key.startswith("combined_")})
            return
        with self.floor_vhost() as url:
            done = subprocess.run(
                [sys.executable, str(BENCH / "floors.py"), "combined", str(self.sizes["floor_n"]), "--url", url,
                 "--served", str(len(self.QUEUES))],
                capture_output=True, text=True, timeout=180, check=False, cwd=str(BENCH),
            )
        if done.returncode != 0:
            raise RuntimeError(f"bench/floors.py combined failed: {done.stderr.strip()[-2000:]}")
        figures = json.loads(done.stdout)
        for kind in PROCESS_RUNNERS:
            self.results[f"combined_{kind}_rate"] = figures[kind]["rate"]
            self.results[f"combined_{kind}_all_rate"] = figures[kind]["all"]
        self.results["combined_floor_n"] = figures["n"]
        self.results["combined_floor_rounds"] = figures["rounds"]
        self.results["combined_floor_queues"] = figures["queues"]
        self.notes += [f"combined floor: {text}" for text in figures["failed"]]

    def phase_pickup_floor(self):
        """The pickup's floor (bench/floors.py ``pickup``): rbit's steps for one message and its waiting
        process in a bare loop of their own, idle between messages, timed as the worker's pickup is.

        In a process of its own, on a vhost of its own, consuming as many queues as the worker
        serves; the requests are published as :meth:`run_one` publishes them, one at a time, the next
        once the loop consumes again.
        """
        if self.baselines:
            self.results.update({key: value for key, value in self.baselines.items() if key.startswith("pickup_floor")})
            return
        count, served = self.sizes["latency_n"], len(self.QUEUES)
        queues = served_queues(served)
        routing_key = "bench.any.floor.x"
        samples = []
        with self.floor_vhost() as url:
            loop = subprocess.Popen(
                [sys.executable, str(BENCH / "floors.py"), "pickup", str(count), "--url", url,
                 "--served", str(served), "--report-to", self.stamps.address],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(BENCH),
            )
            broker = None
            try:
                if loop.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"bench/floors.py pickup failed: {loop.communicate(timeout=30)[1][-2000:]}")
                broker = BenchBroker(f"{self.vhost}-floor", None)
                broker.declare_build_queue(queues[0], routing_key)  # as floors.py declared it, bound as PyBit's
                for index in range(count):
                    job_id = next(self._job_ids)
                    published = time.time()
                    broker.publish_confirmed(self.body(job_id), routing_key)
                    started = self.stamps.wait("start", job_id)
                    self.stamps.wait("end", job_id)
                    if index < count - 1:  # consuming again: idle, as run_one waits (after its last, it ends)
                        wait_for_consumer(broker, queues[-1], "bench/floors.py pickup")
                    samples.append((started - published) * 1000)
                out, err = loop.communicate(timeout=60)
            except BaseException:
                loop.kill()
                loop.wait()
                raise
            finally:
                if broker is not None:
                    broker.close()
        if loop.returncode != 0:
            raise RuntimeError(f"bench/floors.py pickup failed: {err.strip()[-2000:]}")
        figures = json.loads(out)
        latency = summarise_latency(samples)
        confirms = figures["confirm_ms"]
        self.results.update({
            "pickup_floor_p50_ms": latency["latency_p50_ms"],
            "pickup_floor_p99_ms": latency["latency_p99_ms"],
            "pickup_floor_mean_ms": latency["latency_mean_ms"],
            "pickup_floor_n": latency["latency_n"],
            "pickup_floor_queues": figures["queues"],
            "pickup_floor_confirm_p50_ms": percentile(confirms, 0.50),
            "pickup_floor_confirm_p99_ms": percentile(confirms, 0.99),
        })
        if figures["failed"]:
            self.notes.append(f"pickup floor: {figures['failed']} of {count} job processes exited non-zero")

    def phase_noop(self):
        count = self.sizes["batch_n"]
        result = self.batch("noop", count, timeout=self.sizes["batch_box"])
        pairs = [(self.stamps.get("start", j), self.stamps.get("end", j)) for j in result["ids"]]
        done = [(s, e) for s, e in pairs if s is not None and e is not None]
        if len(done) != result["run"]:
            self.notes.append(f"no-op batch: {result['run']} jobs ran, {len(done)} with both stamps; "
                              "the rate counts those")
        window = max(e for _, e in done) - min(s for s, _ in done)
        rate = len(done) / window
        self.results.update({
            "noop_n": len(done),
            "noop_rate": rate,
            "noop_rate_markers": result["run"] / (result["t_end"] - result["t_begin"]),
            "noop_cycle_ms": 1000 / rate,
            "noop_runner_ms": statistics.median((e - s) * 1000 for s, e in done),
            "noop_ratio": rate / self.results["bare_kombu_rate"],
        })
        self._note_cut("no-op python batch", result, count)

    def phase_shell(self):
        count = self.sizes["batch_n"]
        result = self.batch("shell", count, timeout=self.sizes["batch_box"])
        rate = result["run"] / (result["t_end"] - result["t_begin"])
        self.results.update({
            "shell_n": result["run"],
            "shell_rate": rate,
            "shell_cycle_ms": 1000 / rate,
            "shell_ratio": rate / self.results["bare_subprocess_rate"],
        })
        self._note_cut("shell!/bin/true batch", result, count)

    def _note_cut(self, what, result, count):
        if result["run"] < count:
            self.notes.append(f"{what}: time box of {self.sizes['batch_box']:.0f} s reached; "
                              f"{result['run']} of {count} jobs ran and the rate counts those")

    def phase_soak(self):
        """As many no-op jobs as fit (up to soak_n), then the resident memory again."""
        before = self.memory()
        left = self.sizes["budget"] - RESERVE - self.elapsed() - (25 if self.trace else 10)
        box = max(5.0, min(self.sizes["soak_box"], left))
        rate = self.results.get("noop_rate_markers") or self.results["noop_rate"]
        count = max(1, min(self.sizes["soak_n"], int(rate * box * 1.05)))
        t0 = time.monotonic()
        result = self.batch("soak", count, timeout=box)
        took = time.monotonic() - t0
        time.sleep(1.0)
        after = self.memory()
        self.results.update({
            "soak_target": self.sizes["soak_n"],
            "soak_published": count,
            "soak_run": result["run"],
            "soak_s": took,
            "soak_rate": result["run"] / (result["t_end"] - result["t_begin"]),
            "mem_before_soak_mb": before["total"],
            "mem_after_soak_mb": after["total"],
            "mem_growth_mb": after["total"] - self.results["mem_idle_mb"],
            "mem_growth_soak_only_mb": after["total"] - before["total"],
            "pss_after_soak_mb": after["worker"],
            "forkserver_pss_after_mb": after["forkserver"],
            "forkserver_growth_mb": after["forkserver"] - self.results["forkserver_pss_idle_mb"],
        })
        if result["run"] < self.sizes["soak_n"]:
            self.notes.append(
                f"memory soak: {result['run']} jobs run, not {self.sizes['soak_n']}: at "
                f"{self.results['soak_rate']:.1f} jobs/s only that many fit its time box of {box:.0f} s "
                f"(at most what the {self.sizes['budget']:.0f} s budget leaves); the growth is over those jobs"
            )

    def phase_round_trips(self, jobs=20):
        """Broker methods the worker sends per job, from a second worker traced by bench/amqp_trace.

        The traced worker is the same command and configuration with
        bench/amqp_trace first on PYTHONPATH: its sitecustomize wraps py-amqp's
        ``send_method`` and ``wait`` (rbit is not changed). *jobs* latency jobs
        run one at a time after two warm-up jobs; the methods the worker sent
        from the first publish until the worker is idle again, divided by
        *jobs*, are the cost of a job. A "wait" is a blocking round trip.
        """
        trace = self.tmp / "amqp-trace.txt"
        self.worker.stop()
        env = {"PYTHONPATH": os.pathsep.join([str(BENCH / "amqp_trace"), str(ROOT), str(BENCH)]),
               "RBIT_BENCH_AMQP_TRACE": str(trace)}
        self.worker = WorkerUnderTest(self.config, self.tmp / "worker-traced.log", path=self.path, env=env)
        self.worker.start()
        self.wait_consuming(timeout=30)
        for _ in range(2):
            self.run_one()
        time.sleep(0.3)
        t0 = time.time()
        for _ in range(jobs):
            self.run_one()
        time.sleep(0.5)  # anything the worker sends once it consumes again belongs to the last job
        t1 = time.time()
        sent, waits = {}, {}
        for line in trace.read_text().splitlines():
            pid, stamp, kind, name = line.split(" ", 3)
            if int(pid) != self.worker.pid or not t0 <= float(stamp) <= t1:
                continue
            (sent if kind == "send" else waits)[name] = (sent if kind == "send" else waits).get(name, 0) + 1
        self.results.update({
            "round_trip_jobs": jobs,
            "methods_per_job": sum(sent.values()) / jobs,
            "round_trips_per_job": sum(waits.values()) / jobs,
            "methods_sent": {name: count / jobs for name, count in sorted(sent.items())},
            "round_trip_waits": {name: count / jobs for name, count in sorted(waits.items())},
        })

    def run(self):
        phases = [
            ("warm-up", self.phase_warmup),
            ("idle memory and CPU", self.phase_idle),
            ("pickup latency", self.phase_latency),
            ("pickup floor (the promises' steps for one message, no rbit loop)", self.phase_pickup_floor),
            ("bare kombu baseline", self.phase_bare_kombu),
            ("bare subprocess baseline", self.phase_bare_subprocess),
            ("broker floor (the promises' broker steps, no process)", self.phase_broker_floor),
            ("process floor (a fresh process per job, no broker)", self.phase_process_floor),
            ("combined floor (the broker steps and a fresh process per job, together, no rbit loop)",
             self.phase_combined_floor),
            ("no-op python throughput", self.phase_noop),
            ("shell!/bin/true throughput", self.phase_shell),
            ("memory soak", self.phase_soak),
        ]
        if self.trace:
            phases.append(("broker round trips per job", self.phase_round_trips))
        self.results["loadavg_start"] = os.getloadavg()[0]
        self.setup()
        for title, phase in phases:
            t0 = time.monotonic()
            self.log(f"[{self.elapsed():6.1f} s] {title} ...")
            phase()
            self.worker.check_alive()
            self.log(f"[{self.elapsed():6.1f} s] {title}: done in {time.monotonic() - t0:.1f} s")
        self.results["run_s"] = self.elapsed()
        self.results["loadavg_end"] = os.getloadavg()[0]
        problems = [line for path in sorted(self.tmp.glob("worker*.log")) for line in log_problems(path)]
        self.results["worker_log_problems"] = len(problems)
        self.notes += [f"worker log: {line}" for line in problems[:5]]


# -- Figures -------------------------------------------------------------------------


def percentile(values, fraction):
    """Nearest-rank percentile of *values* (0 < fraction <= 1)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summarise_latency(samples):
    return {
        "latency_n": len(samples),
        "latency_p50_ms": percentile(samples, 0.50),
        "latency_p99_ms": percentile(samples, 0.99),
        "latency_min_ms": min(samples),
        "latency_max_ms": max(samples),
        "latency_mean_ms": statistics.fmean(samples),
    }


def log_problems(path):
    """WARNING/ERROR lines in the worker's log, other than the expected marker rejections."""
    return [
        line for line in Path(path).read_text(errors="replace").splitlines()
        if (" WARNING " in line or " ERROR " in line) and "rejected a message" not in line
    ]


def fmt(value, unit):
    if value is None:
        return "-"
    if unit == "":
        return f"{value:.2f}"
    if unit == "/s":
        return f"{value:.1f} /s"
    return f"{value:.2f} {unit}"


def print_table(columns, floors, notes, round_trips=None):
    """The figures of every column, the floor, the target and the verdict; then each figure's ratios."""
    names = list(columns)
    rbit_names = [name for name in names if name.startswith("rbit")]
    header = ["figure", *names, "floor", "target", "result"]
    rows = []
    for key, (label, unit, _, floor_key, test, target) in FIGURES.items():
        cells = [fmt(columns[name].get(key), unit) for name in names]
        floor = fmt(floors.get(floor_key), unit) if floor_key else "-"
        verdicts = []
        for name in rbit_names:
            value = columns[name].get(key)
            verdicts.append("" if test is None else "MISS" if value is None else "PASS" if test(value) else "MISS")
        rows.append([label, *cells, floor, target, "/".join(v for v in verdicts if v)])
    for key, (label, unit) in FLOORS.items():
        if floors.get(key) is not None:
            rows.append([f"floor: {label}", *["-"] * len(names), floor_text(floors[key], unit), "-", ""])
    print()
    print_rows(header, rows)
    print()
    ratio_header = ["ratio (rbit / other)"]
    ratio_rows = []
    others = [name for name in names if not name.startswith("rbit")] + ["floor"]
    for rbit in rbit_names:
        for key, (label, unit, higher, floor_key, _, _) in FIGURES.items():
            if unit == "":
                continue
            row = [f"{label} [{rbit}]"]
            for other in others:
                theirs = floors.get(floor_key) if other == "floor" else columns[other].get(key)
                ours = columns[rbit].get(key)
                row.append(f"{ours / theirs:.2f}x" if ours is not None and theirs else "-")
            ratio_rows.append(row)
    print_rows(ratio_header + others, ratio_rows)
    print("  (for jobs/s above 1 is better than the other; for ms and MB below 1 is)")
    if round_trips:
        print()
        print(round_trips)
    for note in notes:
        print(f"note: {note}")


def print_rows(header, rows):
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    print("  ".join(f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}" for i, (cell, w) in enumerate(zip(header, widths))))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}" for i, (cell, w) in enumerate(zip(row, widths))))


def detail_lines(name, r):
    """The measured figures behind one rbit column."""
    parts = memory_parts_text(r["mem_idle_parts"])
    lines = [
        (f"pickup: {r['latency_n']} samples, min / mean / max {r['latency_min_ms']:.2f} / "
        f"{r['latency_mean_ms']:.2f} / {r['latency_max_ms']:.2f} ms"),
        (f"no-op python!: {r['noop_n']} jobs, {r['noop_cycle_ms']:.1f} ms/job ({r['noop_rate_markers']:.1f} jobs/s "
        f"marker to marker; {r['noop_ratio']:.2f} of bare kombu); inside the runner {r['noop_runner_ms']:.3f} ms"),
        f"shell!/bin/true: {r['shell_n']} jobs, {r['shell_cycle_ms']:.1f} ms/job (marker to marker)",
        f"idle memory (PSS MB): {parts}; worker VmRSS {r['rss_idle_mb']:.1f}",
        (f"memory soak: {r['soak_run']} of {r['soak_target']} jobs ({r['soak_s']:.1f} s, {r['soak_rate']:.1f} jobs/s); "
        f"PSS {r['mem_before_soak_mb']:.1f} -> {r['mem_after_soak_mb']:.1f} MB "
        f"(soak alone {r['mem_growth_soak_only_mb']:+.2f}, fork server {r['forkserver_growth_mb']:+.2f})"),
        (f"idle CPU: worker {r['cpu_idle_pct']:.3f} %, fork server {r['forkserver_cpu_idle_pct']:.3f} % "
        f"over {r['cpu_idle_window_s']:.0f} s; worker log warnings/errors (markers excluded): {r['worker_log_problems']}"),
    ]
    return [f"[{name}] {line}" for line in lines]


def celery_detail_lines(name, r):
    parts = memory_parts_text(r["mem_idle_parts"])
    lines = [
        (f"[{name}] pickup: {r['latency_n']} samples, min / mean / max {r['latency_min_ms']:.2f} / "
        f"{r['latency_mean_ms']:.2f} / {r['latency_max_ms']:.2f} ms; no-op {r['noop_n']} tasks, "
        f"/bin/true {r['shell_n']} tasks (stamped in the task around subprocess.run)"),
        (f"[{name}] idle memory (PSS MB): {parts}; soak {r['soak_run']} tasks, "
        f"PSS {r['mem_idle_mb']:.1f} -> {r['mem_after_soak_mb']:.1f} MB"),
    ]
    if "replacement" in r:
        lines.append(f"[{name}] new pool process up after a task ended: {gap_text(r['replacement'])}")
    for kind, what in (("noop_gaps", "no-op batch"), ("shell_gaps", "/bin/true batch")):
        if kind in r:
            lines.append(f"[{name}] {what}, one task's end to the next one's start: {gap_text(r[kind])}")
    return lines


def gap_text(g):
    return (f"p50 {g['p50_ms']:.0f} ms, max {g['max_ms']:.0f} ms, {g['over_1s']} of {g['n']} over 1 s")


def round_trip_line(r):
    methods = ", ".join(f"{name} x{count:g}" for name, count in r["methods_sent"].items())
    waits = ", ".join(f"{name} x{count:g}" for name, count in r["round_trip_waits"].items()) or "none"
    return (f"broker round trips per job: {r['round_trips_per_job']:g} (blocking waits: {waits})\n"
            f"AMQP methods the worker sends per job: {r['methods_per_job']:g} ({methods}); "
            f"over {r['round_trip_jobs']} jobs one at a time, counted by bench/amqp_trace")


def bound_lines(r, floors):
    """A line per throughput figure of rbit's results *r*: the floors that bound it, and its target against them.

    The floor that decides is the measured one of the broker steps and a fresh
    process per job together (bench/floors.py ``combined_floor``: one bare loop,
    no rbit loop): the target is above it or not. Beside it, each floor alone
    (the process floor the faster of sequential and overlapped, named) and the
    estimate of the two one after the other, 1 / (1/broker + 1/process), labelled
    as an estimate.
    """
    broker = floors.get("broker_floor_rate")
    bare = floors.get("bare_subprocess_rate")
    if not broker or not bare:
        return []
    lines = []
    for kind, label, key, target, target_text in (
        ("python", "no-op python!", "noop_rate", NOOP_TARGET, f">= {NOOP_TARGET} /s"),
        ("shell", "shell!/bin/true", "shell_rate", SHELL_SHARE * bare,
         f">= {SHELL_SHARE} of bare subprocess.run = {SHELL_SHARE * bare:.0f} /s"),
    ):
        value = r.get(key)
        modes = {mode: floors.get(f"process_{kind}_{mode}_rate") for mode in ("overlapped", "sequential")}
        together = floors.get(f"combined_{kind}_rate")
        if value is None or None in modes.values() or not together:
            continue
        how = max(modes, key=modes.get)
        other = "sequential" if how == "overlapped" else "overlapped"
        process = modes[how]
        series = 1 / (1 / broker + 1 / process)
        share = f" = {process / bare:.2g} of bare subprocess.run" if kind == "shell" else ""
        together_share = f" = {together / bare:.2g} of bare subprocess.run" if kind == "shell" else ""
        text = (f"{label}: {value:.1f} /s (target {target_text}). Measured floor, the broker steps and a fresh "
                f"process per job together (no rbit loop): {together:.0f} /s{together_share} (all rounds "
                f"{floors[f'combined_{kind}_all_rate']:.0f} /s); rbit reaches {value / together:.2f} of it. "
                f"Apart: broker steps alone {broker:.0f} /s, a fresh process per job alone {process:.0f} /s "
                f"({how}{share}; {other} {modes[other]:.0f} /s); estimated one after the other, from the two "
                f"apart: {series:.0f} /s. ")
        if target > together:
            text += (f"Target above the measured floor that stops it ({target:.0f} /s > {together:.0f} /s): the "
                     "broker steps and a fresh process per job together, with nothing else around them, go no faster.")
        else:
            text += (f"Target below the measured floor ({target:.0f} /s <= {together:.0f} /s together): "
                     "the promises leave room for it.")
        lines.append(text)
    return lines


def what_bounds(r, floors):
    """The lines saying what bounds rbit's results *r*: the pickup's (if its floor was measured),
    then each throughput figure's."""
    pickup = pickup_bound_line(r, floors)
    return ([pickup] if pickup else []) + bound_lines(r, floors)


def pickup_bound_line(r, floors):
    """The pickup p50 of rbit's results *r* against the measured pickup floor, and its target against
    that floor; None without the floor."""
    floor, value = floors.get("pickup_floor_p50_ms"), r.get("latency_p50_ms")
    if floor is None or value is None:
        return None
    text = (f"pickup p50: {value:.1f} ms (target <= {PICKUP_P50} ms). Measured floor, the promises' steps for one "
            f"message and its warm process in a bare loop (no rbit loop): {floor:.1f} ms (p99 "
            f"{floors['pickup_floor_p99_ms']:.1f} ms, mean {floors['pickup_floor_mean_ms']:.1f} ms); rbit takes "
            f"{abs(value - floor):.1f} ms {'more' if value >= floor else 'less (the two are measured apart)'}. Of the floor, the in-progress copy's confirm alone takes "
            f"{floors['pickup_floor_confirm_p50_ms']:.1f} ms (p50). ")
    if floor > PICKUP_P50:
        text += (f"Target below the measured floor that stops it ({PICKUP_P50} ms < {floor:.1f} ms): the promises' "
                 "steps, with nothing else around them, take longer.")
    else:
        text += f"Target above the measured floor ({PICKUP_P50} ms >= {floor:.1f} ms): the promises leave room for it."
    return text


def floor_details(floors):
    """How the promises' floors were measured, in one line each."""
    if floors.get("broker_floor_rate") is None:
        return []
    lines = [(f"floors: the promises' broker steps over {floors['broker_floor_n']} messages, "
              f"{floors['broker_floor_queues']} served queues (confirmed copy, nowait cancel, ack, nowait purge, "
              f"consume); a fresh process per job: fastest of {floors['process_floor_rounds']} rounds, "
              f"{floors['process_floor_n']} jobs each way; over all rounds python! "
              f"{floors['process_python_sequential_all_rate']:.0f} /s sequential, "
              f"{floors['process_python_overlapped_all_rate']:.0f} /s overlapped, shell!/bin/true "
              f"{floors['process_shell_sequential_all_rate']:.0f} / {floors['process_shell_overlapped_all_rate']:.0f} /s")]
    if floors.get("pickup_floor_n") is not None:
        lines.append(f"floors: {PICKUP}: {floors['pickup_floor_n']} messages published one at a time, "
                     f"{floors['pickup_floor_queues']} served queues; the copy's confirm p50 / p99 "
                     f"{floors['pickup_floor_confirm_p50_ms']:.2f} / {floors['pickup_floor_confirm_p99_ms']:.2f} ms")
    if floors.get("combined_floor_n") is not None:
        lines.append(f"floors: {TOGETHER}: fastest of {floors['combined_floor_rounds']} rounds, "
                     f"{floors['combined_floor_n']} jobs of each kind, {floors['combined_floor_queues']} served "
                     "queues, the next process started while the job runs; over all rounds python! "
                     f"{floors['combined_python_all_rate']:.0f} /s, shell!/bin/true "
                     f"{floors['combined_shell_all_rate']:.0f} /s")
    return lines


# -- Markdown for the project README -------------------------------------------------


def memory_gib():
    """The machine's memory in GiB, from /proc/meminfo."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def verdict(columns, key):
    """met / missed for each rbit column (joined by '/'), on FIGURES' test of *key*; '-' without a target."""
    test = FIGURES[key][4]
    marks = []
    for name, results in columns.items():
        if name.startswith("rbit"):
            value = results.get(key)
            marks.append("missed" if value is None or not test(value) else "met")
    return "/".join(marks) or "-"


def plural(count, noun):
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def md_pickup(r, key):
    value, n = r.get(key), r.get("latency_n")
    if value is None:
        return "-"
    if key == "latency_p50_ms":
        return f"{value:.1f} ms ({n} samples)"
    # With fewer than 100 samples the nearest-rank p99 is the slowest one: say so.
    return f"{value:.1f} ms" if n >= 100 else f"{value:.1f} ms (max of {n})"


def md_floor(floors, key):
    value = floors.get(key)
    return "-" if value is None else floor_text(value, "ms")


def md_rate(r, kind):
    rate, n = r.get(f"{kind}_rate"), r.get(f"{kind}_n")
    if rate is None:
        return "-"
    text = f"{rate:.1f} /s ({plural(n, 'job')})"
    if kind == "shell" and r.get("shell_ratio") is not None:
        text += f" = {r['shell_ratio']:.2g} of the floor"  # two digits, however small
    return text


def md_growth(r):
    if r.get("mem_growth_mb") is None:
        return "-"
    return f"{r['mem_growth_mb']:+.2f} MB over {plural(r['soak_run'], 'job')}"


def md_round_trips(r):
    if r.get("round_trips_per_job") is None:
        return "not measured"
    return f"{r['round_trips_per_job']:g} ({r['methods_per_job']:g} AMQP methods sent)"


def markdown_rows(columns, floors):
    """(figure, a cell per column, floor, target, verdict) for each figure of the README's table."""
    def cells(render):
        return [render(r) for r in columns.values()]

    return [
        ("pickup latency p50, publish to runner start, idle worker", cells(lambda r: md_pickup(r, "latency_p50_ms")),
         md_floor(floors, "pickup_floor_p50_ms"), FIGURES["latency_p50_ms"][5], verdict(columns, "latency_p50_ms")),
        ("pickup latency p99", cells(lambda r: md_pickup(r, "latency_p99_ms")),
         md_floor(floors, "pickup_floor_p99_ms"), FIGURES["latency_p99_ms"][5], verdict(columns, "latency_p99_ms")),
        ("no-op `python!` jobs/s (floor: bare kombu consume-and-ack, prefetch 1)", cells(lambda r: md_rate(r, "noop")),
         f"{floors['bare_kombu_rate']:.0f} /s", FIGURES["noop_rate"][5], verdict(columns, "noop_rate")),
        ("`shell!/bin/true` jobs/s (floor: bare `subprocess.run` loop)", cells(lambda r: md_rate(r, "shell")),
         f"{floors['bare_subprocess_rate']:.0f} /s", f"{FIGURES['shell_ratio'][5]} of the floor",
         verdict(columns, "shell_ratio")),
        ("idle memory, PSS of the worker and every process it keeps", cells(lambda r: fmt(r.get("mem_idle_mb"), "MB")),
         "-", FIGURES["mem_idle_mb"][5], verdict(columns, "mem_idle_mb")),
        ("memory growth over the soak", cells(md_growth), "-", FIGURES["mem_growth_mb"][5],
         verdict(columns, "mem_growth_mb")),
        ("broker round trips per job (blocking waits)", cells(md_round_trips), "-", "-", "-"),
    ]


#: The 20 MB build log's targets: a program in a job at least this share of its speed writing to a file ...
JOBLOG_SPEED = 0.25
#: ... and at most this much of the worker's CPU for the job, in ms.
JOBLOG_CPU_MS = 500


def joblog_rows(joblog, width):
    """One row per program of bench/joblog_bench.py: speed in a job against to a file, and the worker's CPU."""
    rows = []
    for program in ("cat", "seq"):
        r = joblog[program]
        speed = 1 / r["ratio"]
        met = speed >= JOBLOG_SPEED and r["worker_cpu_ms"] < JOBLOG_CPU_MS
        rows.append((f"20 MB build log, `{program}`: speed in a job against writing the same file; worker CPU",
                     [f"{speed:.2f} of the file's speed; {r['worker_cpu_ms']:.0f} ms CPU"] + ["-"] * (width - 1),
                     f"{r['program_to_file_s'] * 1000:.0f} ms to a file",
                     f">= {JOBLOG_SPEED} of the speed, < {JOBLOG_CPU_MS / 1000:g} s CPU", "met" if met else "missed"))
    return rows


def print_markdown(columns, floors, joblog, load_start, command):
    """The results as a markdown table for the project README's Performance section, and the run's setting."""
    rows = markdown_rows(columns, floors)
    if joblog:
        rows += joblog_rows(joblog, len(columns))
    for key, (label, unit) in FLOORS.items():
        if floors.get(key) is not None:
            rows.append((f"floor: {label}", ["-"] * len(columns), floor_text(floors[key], unit), "-", "-"))
    header = ["figure", *columns, "floor", "target", "met/missed"]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for label, values, floor, target, mark in rows:
        print("| " + " | ".join([label, *values, floor, target, mark]) + " |")
    rbit = next((results for name, results in columns.items() if name.startswith("rbit")), None)
    lines = what_bounds(rbit, floors) if rbit else []
    if lines:
        print()
        print("What bounds the pickup and each throughput figure (rbit `rbit CONFIG`, floors of the same run):")
        print()
        for line in lines:
            print(f"- {line.replace('python!', '`python!`').replace('shell!/bin/true', '`shell!/bin/true`')}")
    print()
    print(f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `{command}`, on a machine "
          f"with {os.cpu_count()} cores and {memory_gib():.0f} GiB of memory; load average (1 min) "
          f"{load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a fast check (about a minute and a half)")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--both-paths", action="store_true",
                        help="also measure the worker started as `python -m rbit CONFIG` (a column of its own)")
    parser.add_argument("--path", choices=sorted(PATHS), default="script",
                        help="how to start the measured worker: script (`rbit CONFIG`, as the systemd unit; "
                             "default) or module (`python -m rbit CONFIG`)")
    parser.add_argument("--no-celery", action="store_true", help="leave out the Celery columns")
    parser.add_argument("--markdown", action="store_true",
                        help="also print the results as a markdown table for the project README")
    parser.add_argument("--joblog", action="store_true",
                        help="also run bench/joblog_bench.py (a 20 MB build log, about 15 s) as a last phase")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help=f"time budget of the whole run (default {TOTAL_BUDGET:.0f})")
    parser.add_argument("--soak-box", type=float, metavar="SECONDS",
                        help="time box of rbit's memory soak (default: what the budget leaves, at most 120, "
                             "or 10 with --quick); e.g. --budget 1500 --soak-box 1250 for a full 20,000-job soak")
    args = parser.parse_args(argv)
    sizes = dict(SIZES["quick" if args.quick else "full"])
    if args.budget:
        sizes["budget"] = args.budget
    if args.soak_box:
        sizes["soak_box"] = args.soak_box
    log = lambda text: print(text, file=sys.stderr, flush=True)
    started = time.monotonic()
    stamps = Stamps()
    columns, details, notes, json_out = {}, [], [], {"sizes": sizes}
    floors = {}
    round_trips = None
    load_start = os.getloadavg()

    if args.no_celery:
        notes.append("Celery columns left out (--no-celery)")
        celery_keys = []
    else:
        import celery_bench

        reason = celery_bench.celery_missing()
        if reason:
            print(f"skipping the Celery columns: {reason}", file=sys.stderr)
            notes.append(f"Celery columns skipped: {reason}")
            celery_keys = []
        else:
            celery_keys = list(celery_bench.SETUPS)
    for key in celery_keys:
        run = celery_bench.CeleryRun(key, sizes, stamps, log=log)
        try:
            run.run()
        finally:
            run.cleanup()
        columns[run.label] = run.results
        details += celery_detail_lines(run.label, run.results)
        notes += run.notes
        json_out[key] = run.results

    paths = ["module", "script"] if args.both_paths else [args.path]
    for index, path in enumerate(paths):
        last = index == len(paths) - 1
        run_sizes = dict(sizes)
        run_sizes["budget"] = sizes["budget"] - (time.monotonic() - started)
        if not last:
            run_sizes["soak_box"] = sizes["module_soak_box"]
        bench = Bench(run_sizes, log=log, path=path, stamps=stamps, baselines=floors or None, trace=last)
        try:
            bench.run()
        except BaseException:
            bench.cleanup(keep_files=True)
            print(f"the worker's configuration and log are kept in {bench.tmp}", file=sys.stderr)
            raise
        bench.cleanup()
        name = f"rbit `{PATHS[path]}`"
        columns[name] = bench.results
        floors = {key: bench.results[key] for key in [*FLOORS, *FLOOR_FACTS]}
        details += detail_lines(name, bench.results)
        notes += [f"{name}: {note}" for note in bench.notes]
        json_out[f"rbit_{path}"] = bench.results
        if "round_trips_per_job" in bench.results:
            round_trips = round_trip_line(bench.results)
    joblog = run_joblog(log) if args.joblog else None
    if joblog:
        json_out["joblog"] = joblog
        details += joblog_lines(joblog)
    for results in columns.values():
        if results.get("shell_rate") and "shell_ratio" not in results:
            results["shell_ratio"] = results["shell_rate"] / floors["bare_subprocess_rate"]
    # rbit's columns first, in the order of the table's header.
    columns = dict(sorted(columns.items(), key=lambda item: (not item[0].startswith("rbit"),
                                                             item[0] != "rbit `rbit CONFIG`")))
    print_table(columns, floors, [], round_trips)
    print()
    print(f"floor: no-op = bare kombu consume+ack at prefetch 1 ({floors['bare_kombu_rate']:.1f} msg/s); "
          f"/bin/true = bare subprocess.run(['/bin/true']) loop ({floors['bare_subprocess_rate']:.1f} runs/s), "
          "both in this run")
    for line in floor_details(floors):
        print(line)
    rbit_name = next(name for name in columns if name.startswith("rbit"))
    for line in what_bounds(columns[rbit_name], floors):
        print(f"[{rbit_name}] {line}")
    for line in details:
        print(line)
    print(f"machine: {os.cpu_count()} CPUs, load average (1/5/15 min) {load_start[0]:.2f} {load_start[1]:.2f} "
          f"{load_start[2]:.2f} at start, {os.getloadavg()[0]:.2f} at end; run time {time.monotonic() - started:.0f} s")
    for note in notes:
        print(f"note: {note}")
    if args.json:
        print(json.dumps({**json_out, "notes": notes}, indent=2, sort_keys=True, default=str))
    if args.markdown:
        command = " ".join(["python bench/bench.py", *(argv if argv is not None else sys.argv[1:])])
        print_markdown(columns, floors, joblog, load_start[0], command)
    return 0


def joblog_lines(j):
    return [f"[20 MB build log, `{name}`] program {j[name]['program_to_file_s'] * 1000:.1f} ms to a file, "
            f"{j[name]['program_in_job_s'] * 1000:.1f} ms in a job; job {j[name]['job_s'] * 1000:.0f} ms "
            f"(bare subprocess.run {j[name]['subprocess_to_file_s'] * 1000:.0f} ms); worker CPU "
            f"{j[name]['worker_cpu_ms']:.0f} ms; medians of {j['runs']}" for name in ("cat", "seq")]


def run_joblog(log):
    """bench/joblog_bench.py's figures (both programs, medians of 5 jobs), after the other phases."""
    import joblog_bench

    log("20 MB build log (bench/joblog_bench.py) ...")
    return joblog_bench.measure(mb=20, runs=5)


if __name__ == "__main__":
    sys.exit(main())
