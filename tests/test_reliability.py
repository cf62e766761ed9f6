"""The reliability promises, each against a real broker: "rbit never loses a job and never runs
one twice because of the broker", and the README's "What happens to a job when something fails"
and "Signals".

Every test runs the real ``python -m rbit CONFIG`` with runners from
tests/reliability_runners.py that crash, leak, hang or sleep on purpose, a
fake PyBit web front end that counts the statuses, and RabbitMQ:

- the shared broker on 127.0.0.1:5672 (the session's vhost) for everything
  that leaves the broker alone;
- a PRIVATE RabbitMQ node (tests/rabbit_node.py), started once for this
  module, for the tests that stop the broker, change its consumer_timeout or
  need listeners of their own. The shared broker is never stopped or changed.

These tests are slow (one waits out RabbitMQ's once-a-minute consumer
timeout check); together they take a few minutes.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rbit import statuses
from rbit.queues import HEADER_RECOVERED, in_progress_name
from rbit.jobs import KILL_GRACE

from .broker import rabbitmqctl
from .harness import ROOT, WorkerProcess, alive, cmdline, environment, wait_until, write_config
from .pybit_models import cancel_body, request_body
from .rabbit_node import RabbitNode
from .reliability_runners import events

#: How the worker's job processes import the runners.
RUNNERS = "python!reliability_runners"


# -- helpers -------------------------------------------------------------------


def rss_kb(pid):
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        return int(next(line.split()[1] for line in handle if line.startswith("VmRSS:")))


class Rig:
    """One test's world: its queues, its worker name, its workers and the runners' record file.

    *vhost* is a tests.broker.Vhost (shared broker) or a rabbit_node.NodeVhost;
    *amqp* are the ``[amqp]`` overrides for a private node.
    """

    def __init__(self, tmp_path, unique, vhost, web, amqp=None):
        self.dir = Path(tmp_path)
        self.unique = unique
        self.vhost = vhost
        self.web = web
        self.amqp = dict(amqp or {})
        self.name = f"rel-{unique}"
        self.record = self.dir / "runs.log"
        self.workers = []
        self.base_id = random.randrange(10_000, 99_999) * 100

    # -- names and messages

    def queue(self, label="q"):
        """This test's build queue ``<label><unique>_any_s_pdf``."""
        return f"{label}{self.unique}_any_s_pdf"

    @staticmethod
    def routing_key(queue):
        return queue.replace("_", ".")

    def job(self, n):
        """The PyBit job id of this test's job number *n*."""
        return self.base_id + n

    def in_progress(self, slot=0, name=None):
        return in_progress_name(name or self.name, slot)

    def body(self, job_id, queue):
        dist, arch, suite, fmt = queue.split("_")
        return request_body(job_id, f"pkg{job_id}", "1.0", dist, arch, suite, fmt, web_host=self.web.web_host)

    def publish(self, n, queue):
        """Publish job *n* to *queue* as PyBit does (recording the job, Waiting, and declaring
        the queue first, as PyBit does)."""
        self.web.add_job(self.job(n))
        key = self.routing_key(queue)
        self.vhost.declare_build_queue(queue, key)
        self.vhost.publish_build(self.body(self.job(n), queue), key)
        return self.job(n)

    def cancel(self, n, worker_name=None):
        """Publish PyBit's CancelRequest for job *n* to the worker's own routing key."""
        name = worker_name or self.name
        self.vhost.publish_build(cancel_body(self.job(n), name, web_host=self.web.web_host), name)

    # -- workers

    def config(self, runners, *, name=None, rbit=None, amqp=None, filename=None, pybit=True):
        """Write a configuration; *runners* maps queue -> (runner function, extra keys)."""
        sections = {}
        for queue, (function, keys) in runners.items():
            sections[queue] = {"runner": f"{RUNNERS}:{function}", "record": str(self.record), **keys}
        name = name or self.name
        pybit_section = None
        if pybit:
            pybit_section = {"url": self.web.url, "user": self.web.user,
                             "password": self.web.password, "timeout": "2"}
        return write_config(
            self.dir / (filename or f"{name}.ini"), name=name, vhost=self.vhost, runners=sections,
            rbit=rbit, pybit=pybit_section, amqp={**self.amqp, **(amqp or {})},
        )

    def start(self, config, *args, env=None, ready=True, timeout=30):
        """Start a worker on *config* (its own log file); wait until it serves when *ready*."""
        log_path = self.dir / f"worker{len(self.workers)}.log"
        worker = WorkerProcess(config, *args, env=env, log_path=log_path)
        self.workers.append(worker)
        worker.start()
        if ready:
            worker.wait_ready(timeout=timeout)
        return worker

    # -- what happened

    def runs(self, event="start", n=None):
        """Recorded runner events (``start`` by default), of job *n* when given."""
        found = events(self.record, event)
        if n is not None:
            found = [entry for entry in found if entry[1] == self.job(n)]
        return found

    def wait_runs(self, count, event="start", n=None, timeout=30):
        assert wait_until(lambda: len(self.runs(event, n)) >= count, timeout), (
            f"expected {count} {event!r} record(s), got {self.runs(event, n)}\n{self.logs()}")
        return self.runs(event, n)

    def child_pid(self, n):
        """The pid of the ``sleep 1000`` that job *n*'s runner started in its group."""
        entries = self.wait_runs(1, "child", n)
        return int(entries[-1][4])

    def start_slow_job(self, **rbit):
        """A worker running job 1, a 60 s job with a ``sleep`` child in its group, on a queue of
        its own; *rbit* adds ``[rbit]`` keys. Returns (queue, config, worker, job pid, child pid)."""
        queue = self.queue()
        config = self.config({queue: ("slow", {"seconds": "60", "child": "yes"})},
                             **({"rbit": rbit} if rbit else {}))
        worker = self.start(config)
        self.publish(1, queue)
        job_pid = self.wait_runs(1, n=1)[0][2]
        return queue, config, worker, job_pid, self.child_pid(1)

    def statuses(self, n):
        """The statuses the workers reported for job *n*, in the order PyBit got them."""
        return [report.status for report in self.web.reports if report.job_id == self.job(n)]

    def wait_status(self, n, status, timeout=30):
        assert self.web.wait_for((self.job(n), status), timeout), (
            f"job {self.job(n)} never reported {status}: {self.statuses(n)}\n{self.logs()}")

    def logs(self, chars=3000):
        return "\n".join(f"--- {w.log_path.name}\n{w.log[-chars:]}" for w in self.workers)

    def ended(self, worker, n, outcome=r"\w+", timeout=30):
        """Wait for the worker's log line saying job *n* ended (with *outcome*); the match."""
        return worker.wait_log(rf"job {self.job(n)}: .* ended {outcome}\b[^\n]*", timeout=timeout)

    # -- cleaning up

    def cleanup(self):
        for worker in self.workers:
            process = worker.process
            if process is not None and process.poll() is None:
                # A second SIGTERM stops at once; SIGKILL if even that does not.
                process.send_signal(signal.SIGTERM)
                time.sleep(0.2)
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
            worker.stop()
        for _, _, pid, _, extra in events(self.record, "child"):
            child = int(extra)
            if alive(child) and "sleep" in cmdline(child):
                os.kill(child, signal.SIGKILL)
        for _, _, pid, _, _ in events(self.record, "start"):
            if alive(pid) and "multiprocessing" in cmdline(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def rig(tmp_path, unique, vhost, pybit_web):
    """A Rig on the shared broker (this session's vhost); its workers are stopped after the test."""
    made = Rig(tmp_path, unique, vhost, pybit_web)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture(scope="module")
def module_node():
    """A private RabbitMQ node for this module (listening on 127.0.0.1 only); removed after."""
    node = RabbitNode()
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture
def node(module_node):
    """The private node, serving, with its default consumer_timeout; put back so after the test."""
    if not module_node.reachable():
        module_node.start_app()
    yield module_node
    if not module_node.reachable():
        module_node.start_app()


@pytest.fixture
def node_rig(tmp_path, unique, node, pybit_web):
    """A Rig on the private node."""
    made = Rig(tmp_path, unique, node.vhost(), pybit_web, amqp=node.amqp_settings())
    try:
        yield made
    finally:
        made.cleanup()


def queue_state(vhost_name, queue):
    """(ready, unacknowledged, consumers) of *queue* on the shared broker, from rabbitmqctl."""
    out = rabbitmqctl("list_queues", "-p", vhost_name, "--formatter", "json", "name",
                      "messages_ready", "messages_unacknowledged", "consumers").stdout
    for row in json.loads(out or "[]"):
        if row["name"] == queue:
            return row["messages_ready"], row["messages_unacknowledged"], row["consumers"]
    return None


def assert_gone(*pids, timeout=KILL_GRACE + 3):
    assert wait_until(lambda: not any(alive(pid) for pid in pids), timeout), (
        f"still alive: {[pid for pid in pids if alive(pid)]}")


# -- 1. Isolation: a runner cannot take the worker down ------------------------


CRASHES = {
    "segfault": r"killed by SIGSEGV",
    "null_pointer": r"killed by SIGSEGV",
    "leak": r"MemoryError|exited with status|killed by",
    "hard_exit": r"exited with status 3",
}


@pytest.mark.parametrize("runner", sorted(CRASHES))
def test_crashing_runner_fails_its_job_and_the_worker_takes_the_next(rig, runner):
    """A runner that crashes, segfaults or runs out of memory cannot take the worker down: "Its
    process ends; the job is Failed; the worker goes on." A runner that segfaults (SIGSEGV / ctypes
    NULL read), leaks memory until it runs out, or leaves through os._exit: the worker lives on,
    reports the job Failed (Building then Failed), acks it, keeps none of the leaked memory, and
    runs the next job to Done."""
    crash_queue, ok_queue = rig.queue("crash"), rig.queue("ok")
    config = rig.config({crash_queue: (runner, {}), ok_queue: ("ok", {})})
    worker = rig.start(config)
    rss_before = rss_kb(worker.process.pid)
    rig.publish(1, crash_queue)
    match = rig.ended(worker, 1)
    assert "ended Failed" in match.group(0), match.group(0)
    assert re.search(CRASHES[runner], worker.log), worker.log[-3000:]
    rig.wait_status(1, statuses.FAILED)
    assert rig.statuses(1) == [statuses.BUILDING, statuses.FAILED]
    assert worker.process.poll() is None, "the worker died with its runner"
    if runner == "leak":
        assert rig.runs("leaked", 1), "the leaking runner never got to leak"
        assert rss_kb(worker.process.pid) < rss_before + 50_000, "the worker holds the leaked memory"

    rig.publish(2, ok_queue)
    rig.ended(worker, 2, "Done")
    rig.wait_status(2, statuses.DONE)
    assert rig.statuses(2) == [statuses.BUILDING, statuses.DONE]
    assert worker.process.poll() is None
    for queue in (crash_queue, ok_queue, rig.in_progress()):
        assert rig.vhost.depth(queue) == 0, queue


@pytest.mark.parametrize("runner", ["hang", "stubborn"])
def test_runner_past_its_timeout_is_stopped_with_its_whole_process_group(rig, runner):
    """The runner hangs past ``timeout``: "its whole process group is stopped; Failed". With
    ``timeout = 2`` a runner that never returns (``stubborn`` also ignores SIGTERM, so SIGKILL
    must follow) is stopped together with the ``sleep 1000`` it started in its process group; the
    job is reported Failed, its message acked, and the worker runs the next job."""
    hang_queue, ok_queue = rig.queue("hang"), rig.queue("ok")
    config = rig.config({hang_queue: (runner, {"timeout": "2", "child": "yes"}), ok_queue: ("ok", {})})
    worker = rig.start(config)
    rig.publish(1, hang_queue)
    started = rig.wait_runs(1, n=1)[0]
    job_pid = started[2]
    child = rig.child_pid(1)
    match = rig.ended(worker, 1, timeout=2 + KILL_GRACE + 10)
    assert "ended Failed" in match.group(0) and "timed out" in match.group(0), match.group(0)
    assert_gone(job_pid, child, timeout=3)
    rig.wait_status(1, statuses.FAILED)
    assert rig.statuses(1) == [statuses.BUILDING, statuses.FAILED]
    elapsed = time.time() - started[3]
    assert elapsed < 2 + KILL_GRACE + 8, f"the job was stopped only after {elapsed:.1f} s"
    rig.publish(2, ok_queue)
    rig.ended(worker, 2, "Done")
    assert worker.process.poll() is None
    assert rig.vhost.depth(hang_queue) == 0 and rig.vhost.depth(rig.in_progress()) == 0


def test_heartbeats_flow_during_a_long_job(rig):
    """The AMQP heartbeat "keeps going while jobs run", so the broker never drops a worker that is
    busy: with ``heartbeat = 2`` and a 10 s job the loop keeps the AMQP heartbeats going, the
    broker never closes the connection, and the job ends Done and is acked."""
    queue = rig.queue()
    config = rig.config({queue: ("slow", {"seconds": "10"})}, amqp={"heartbeat": "2"})
    worker = rig.start(config)
    rig.publish(1, queue)
    rig.ended(worker, 1, "Done", timeout=30)
    rig.wait_status(1, statuses.DONE)
    assert rig.statuses(1) == [statuses.BUILDING, statuses.DONE]
    assert "lost the broker connection" not in worker.log, worker.log[-3000:]
    assert len(re.findall("connected to the broker", worker.log)) == 1, worker.log[-3000:]
    assert rig.vhost.depth(queue) == 0 and rig.vhost.depth(rig.in_progress()) == 0
    assert len(rig.runs(n=1)) == 1


# -- 2. Concurrency ------------------------------------------------------------


def test_concurrency_two_runs_two_jobs_at_once_and_holds_no_third(rig):
    """``[rbit] concurrency = 2`` (jobs run at once), and the worker "never holds a message it is not
    running": two jobs run at the same time; a third waits on its queue (ready, not unacknowledged)
    until a slot is free, then runs."""
    queue = rig.queue()
    config = rig.config({queue: ("slow", {"seconds": "6"})}, rbit={"concurrency": "2"})
    rig.start(config)
    for n in (1, 2, 3):
        rig.publish(n, queue)
    first_two = rig.wait_runs(2, timeout=15)
    assert {entry[1] for entry in first_two[:2]} == {rig.job(1), rig.job(2)}
    assert abs(first_two[0][3] - first_two[1][3]) < 2.0, first_two
    time.sleep(1.0)
    assert len(rig.runs()) == 2, "a third job started while two were running"
    assert queue_state(rig.vhost.name, queue)[:2] == (1, 0), "the worker holds a message it does not run"
    third = rig.wait_runs(3, timeout=20)[2]
    assert third[1] == rig.job(3)
    assert third[3] >= min(entry[3] for entry in rig.runs("end")) - 0.5
    for n in (1, 2, 3):
        rig.wait_status(n, statuses.DONE, timeout=20)
    assert rig.vhost.depth(rig.in_progress(0)) == 0 and rig.vhost.depth(rig.in_progress(1)) == 0


def test_two_workers_share_the_work_and_a_third_gets_the_next_job_at_once(rig):
    """A worker "never holds a message it is not running, and an idle worker beside it gets the next
    job at once": two workers serving the same two queues each run one of two slow jobs at the same
    time; a third job stays ready on its queue (no worker holds it unacknowledged), and a third
    worker started later gets it at once, while the first two are still busy."""
    q1, q2 = rig.queue("a"), rig.queue("b")
    runners = {q1: ("slow", {"seconds": "15"}), q2: ("slow", {"seconds": "15"})}
    workers = [rig.start(rig.config(runners, name=f"{rig.name}-{k}")) for k in ("a", "b")]
    rig.publish(1, q1)
    rig.publish(2, q1)
    first = rig.wait_runs(2, timeout=10)
    assert abs(first[0][3] - first[1][3]) < 3.0, first
    ran_by = {}
    for n in (1, 2):
        for index, worker in enumerate(workers):
            if re.search(rf"job {rig.job(n)}: starting", worker.log):
                ran_by[n] = index
    assert sorted(ran_by.values()) == [0, 1], f"both jobs ran on the same worker: {ran_by}\n{rig.logs()}"

    rig.publish(3, q2)
    time.sleep(1.0)
    assert len(rig.runs()) == 2
    assert queue_state(rig.vhost.name, q2)[:2] == (1, 0), "a busy worker holds the third job"
    third_worker = rig.start(rig.config(runners, name=f"{rig.name}-c"))
    ready_at = time.time()
    third = rig.wait_runs(3, timeout=10)[2]
    assert third[1] == rig.job(3)
    assert third[3] - ready_at < 3.0
    assert not rig.runs("end"), "the third job had to wait for a busy worker"
    assert re.search(rf"job {rig.job(3)}: starting", third_worker.log)


# -- 3. Long jobs and the broker's consumer_timeout (private node) -------------


def test_job_longer_than_consumer_timeout_runs_once(node, node_rig):
    """A job runs longer than RabbitMQ's ``consumer_timeout``: "Nothing: the message was acknowledged
    when the job started". On a broker whose consumer_timeout is 5 s, a 75 s job outlives
    RabbitMQ's once-a-minute timeout check: it runs once, is reported Building once and Done once,
    the connection is never closed under it, and its message is not redelivered (queue and
    in-progress queue empty afterwards)."""
    rig = node_rig
    old = node.set_env("consumer_timeout", "5000")
    try:
        assert node.eval("application:get_env(rabbit, consumer_timeout).") == "{ok,5000}"
        queue = rig.queue()
        config = rig.config({queue: ("slow", {"seconds": "75"})})
        worker = rig.start(config)
        rig.publish(1, queue)
        rig.wait_runs(1, n=1, timeout=15)
        rig.ended(worker, 1, "Done", timeout=120)
        rig.wait_status(1, statuses.DONE)
        time.sleep(3)
        assert len(rig.runs(n=1)) == 1, rig.runs()
        assert rig.statuses(1) == [statuses.BUILDING, statuses.DONE]
        assert "lost the broker connection" not in worker.log, worker.log[-3000:]
        assert rig.vhost.depth(queue) == 0 and rig.vhost.depth(rig.in_progress()) == 0
        assert worker.process.poll() is None
    finally:
        match = re.fullmatch(r"\{ok,(\d+)\}", old)
        if match:
            node.eval(f"application:set_env(rabbit, consumer_timeout, {match.group(1)}).")
        else:
            node.eval("application:unset_env(rabbit, consumer_timeout).")


# -- 4. A worker killed mid-job ------------------------------------------------


def test_sigkill_mid_job_kills_the_group_and_the_next_start_runs_the_job(rig):
    """No job is lost when the worker is killed (SIGKILL) mid-job: the job's process group dies with
    the worker (lifeline), the message waits in rbit.inprogress.<name>.0, and the worker started
    again runs the job to an end, with the redelivered flag set."""
    queue, config, worker, job_pid, child = rig.start_slow_job()
    worker.process.kill()
    worker.process.wait(10)
    assert_gone(job_pid, child, timeout=5)
    assert rig.vhost.depth(rig.in_progress()) == 1
    assert rig.vhost.depth(queue) == 0

    config.write_text(config.read_text().replace("seconds = 60", "seconds = 1"))
    again = rig.start(config)
    rig.ended(again, 1, "Done", timeout=20)
    runs = rig.runs(n=1)
    assert len(runs) == 2, runs
    assert runs[0][4] == "redelivered=False" and runs[1][4] == "redelivered=True", runs
    rig.wait_status(1, statuses.DONE)
    assert statuses.FAILED not in rig.statuses(1)
    assert rig.vhost.depth(queue) == 0 and rig.vhost.depth(rig.in_progress()) == 0


def recover(config):
    return subprocess.run(
        [sys.executable, "-m", "rbit", "recover", str(config)], capture_output=True, text=True,
        timeout=60, cwd=str(ROOT),
        env=environment(),
    )


def test_recover_command_puts_back_the_job_of_a_worker_that_never_returns(rig):
    """Recovering a dead worker's jobs with ``rbit recover``: while the worker is connected the
    command refuses (status 1) and leaves its in-progress copy alone; once the worker is SIGKILLed
    for good, ``python -m rbit recover CONFIG`` puts the job back on its queue (header
    x-rbit-recovered), and another worker runs it to an end as a redelivery."""
    queue = rig.queue()
    config = rig.config({queue: ("slow", {"seconds": "60"})})
    worker = rig.start(config)
    rig.publish(1, queue)
    rig.wait_runs(1, n=1)
    assert rig.vhost.depth(rig.in_progress()) == 1

    refused = recover(config)
    assert refused.returncode == 1, refused
    assert "connected" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert rig.vhost.depth(rig.in_progress()) == 1 and rig.vhost.depth(queue) == 0
    assert worker.process.poll() is None

    worker.process.kill()
    worker.process.wait(10)
    done = recover(config)
    assert done.returncode == 0, done
    assert "put back 1" in done.stdout, done.stdout
    assert rig.vhost.depth(rig.in_progress()) == 0
    assert rig.vhost.depth(queue) == 1

    other = rig.config({queue: ("slow", {"seconds": "1"})}, name=f"{rig.name}-other")
    second = rig.start(other)
    rig.ended(second, 1, "Done", timeout=20)
    runs = rig.runs(n=1)
    assert [entry[4] for entry in runs] == ["redelivered=False", "redelivered=True"], runs
    assert rig.vhost.depth(queue) == 0


def test_power_cut_mid_job_the_job_runs_to_an_end_after_both_come_back(node, node_rig):
    """No job is lost when the host loses power: the worker and the broker's VM are both SIGKILLed
    mid-job (the job's group dies with the worker); the broker's confirmed, persistent in-progress
    copy survives its unclean restart, and the worker started again runs the job to an end as a
    redelivery.

    RabbitMQ does not make acknowledgements durable at once, so after an unclean broker stop the
    acknowledged original may be back on its queue beside the copy. PyBit's history then keeps
    the job from running a third time: once the rerun has reported Done, the second copy is
    dropped ("not run: PyBit's history ends in Done")."""
    rig = node_rig
    queue, config, worker, job_pid, child = rig.start_slow_job()
    worker.process.kill()
    node.kill()
    worker.process.wait(10)
    assert_gone(job_pid, child, timeout=5)
    node.start()
    assert rig.vhost.depth(rig.in_progress()) == 1, "the confirmed in-progress copy was lost"
    copies = rig.vhost.depth(rig.in_progress()) + rig.vhost.depth(queue)
    assert copies in (1, 2), copies

    config.write_text(config.read_text().replace("seconds = 60", "seconds = 1"))
    again = rig.start(config)
    rig.ended(again, 1, "Done", timeout=20)
    rig.wait_status(1, statuses.DONE)
    assert wait_until(lambda: rig.vhost.depth(queue) == 0 and rig.vhost.depth(rig.in_progress()) == 0, 20)
    runs = rig.runs(n=1)
    assert len(runs) == 2, runs
    assert [entry[4] for entry in runs] == ["redelivered=False", "redelivered=True"], runs
    if copies == 2:
        again.wait_log(rf"job {rig.job(1)}: .* not run: PyBit's history ends in Done", timeout=20)
    assert rig.statuses(1).count(statuses.DONE) == 1


# -- 5. The broker going away (private node) -----------------------------------


def test_broker_stopped_while_idle_reconnects_with_capped_backoff_and_serves(node, node_rig):
    """The broker restarts: "the worker reconnects with a backoff of 1, 3, 5, ... seconds, capped at
    30, logging each attempt". stop_app while idle, the worker logs each failed attempt with a
    growing (at most 30 s) wait, and after start_app it serves again: a job published then runs to
    Done."""
    rig = node_rig
    queue = rig.queue()
    worker = rig.start(rig.config({queue: ("ok", {})}))
    node.stop_app()
    worker.wait_log(r"lost the broker connection", timeout=15)
    worker.wait_log(r"cannot reach the broker .* next attempt in", count=3, timeout=20)
    waits = [float(w) for w in re.findall(r"cannot reach the broker .* next attempt in (\d+) s", worker.log)]
    assert all(0 <= w <= 30 for w in waits), waits
    assert waits == sorted(waits) and waits[-1] > waits[0], f"no backoff: {waits}"
    assert worker.process.poll() is None
    node.start_app()
    worker.wait_ready(count=2, timeout=40)
    rig.publish(1, queue)
    rig.ended(worker, 1, "Done", timeout=20)
    rig.wait_status(1, statuses.DONE)


@pytest.mark.parametrize("ends", ["while_down", "after_restart"])
def test_broker_stopped_mid_job_the_job_runs_once(node, node_rig, ends):
    """The broker restarts mid-job: "The job keeps running ... The job is reported once and not run
    again". stop_app in the middle of a job; the job keeps running, ends (while the broker is still
    down, or after it is back), is reported Building and Done once, and after start_app is neither
    run again nor left in any queue; the next job runs."""
    rig = node_rig
    queue = rig.queue()
    seconds, down_for = (4, 8) if ends == "while_down" else (10, 3)
    worker = rig.start(rig.config({queue: ("slow", {"seconds": str(seconds)})}))
    rig.publish(1, queue)
    job_pid = rig.wait_runs(1, n=1)[0][2]
    time.sleep(1)
    node.stop_app()
    worker.wait_log(r"lost the broker connection", timeout=15)
    time.sleep(down_for)
    if ends == "while_down":
        assert rig.runs("end", 1), "the job did not go on while the broker was down"
    else:
        assert alive(job_pid) and not rig.runs("end", 1)
    node.start_app()
    worker.wait_ready(count=2, timeout=40)
    rig.ended(worker, 1, "Done", timeout=30)
    rig.wait_status(1, statuses.DONE, timeout=30)
    assert wait_until(lambda: rig.vhost.depth(rig.in_progress()) == 0, 15), "in-progress copy left behind"
    time.sleep(3)
    assert len(rig.runs(n=1)) == 1, rig.runs()
    assert rig.statuses(1) == [statuses.BUILDING, statuses.DONE]
    assert rig.vhost.depth(queue) == 0
    assert worker.process.poll() is None
    # The slot is free again and the queue served: the next job runs.
    rig.publish(2, queue)
    rig.wait_runs(1, n=2, timeout=15)


def test_broker_down_at_start_is_waited_for(node, node_rig):
    """The broker is down when the worker starts: "The worker waits for it, logging each attempt." The
    worker starts first and logs its attempts; after start_app it serves, and a job runs to Done."""
    rig = node_rig
    queue = rig.queue()
    config = rig.config({queue: ("ok", {})})
    node.stop_app()
    worker = rig.start(config, ready=False)
    worker.wait_log(r"cannot reach the broker", count=2, timeout=20)
    assert worker.process.poll() is None
    node.start_app()
    worker.wait_ready(timeout=40)
    rig.publish(1, queue)
    rig.ended(worker, 1, "Done", timeout=20)
    rig.wait_status(1, statuses.DONE)


def test_sigterm_while_waiting_for_the_broker_exits_0(node, node_rig):
    """Exit status 0 after a clean stop, on SIGTERM: a worker still waiting for a broker that is down
    stops promptly on SIGTERM, with status 0."""
    rig = node_rig
    config = rig.config({rig.queue(): ("ok", {})})
    node.stop_app()
    worker = rig.start(config, ready=False)
    worker.wait_log(r"cannot reach the broker", timeout=20)
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0, worker.log[-3000:]
    assert time.monotonic() - started < 5


# -- 6. Shutdown -----------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_while_idle_exits_0_quickly(rig, signum):
    """SIGTERM, exit status 0 after a clean stop: an idle worker stops at once."""
    worker = rig.start(rig.config({rig.queue(): ("ok", {})}))
    started = time.monotonic()
    worker.signal(signum)
    assert worker.wait(15) == 0, worker.log[-3000:]
    assert time.monotonic() - started < 6


def test_sigterm_mid_job_within_grace_lets_the_job_finish(rig):
    """First SIGTERM: "No new job. Running jobs get shutdown_grace seconds to finish": a 4 s job with
    shutdown_grace = 30 ends Done and is acked; a job published after the signal stays on its
    queue; exit status 0."""
    queue = rig.queue()
    config = rig.config({queue: ("slow", {"seconds": "4"})}, rbit={"shutdown_grace": "30"})
    worker = rig.start(config)
    rig.publish(1, queue)
    rig.wait_runs(1, n=1)
    worker.signal(signal.SIGTERM)
    time.sleep(0.5)
    rig.publish(2, queue)
    assert worker.wait(30) == 0, worker.log[-3000:]
    rig.wait_status(1, statuses.DONE, timeout=10)
    assert rig.statuses(1) == [statuses.BUILDING, statuses.DONE]
    assert rig.runs("end", 1)
    assert not rig.runs(n=2), "a job was taken after SIGTERM"
    assert rig.vhost.depth(queue) == 1
    assert rig.vhost.depth(rig.in_progress()) == 0


def test_sigterm_mid_job_past_grace_stops_it_and_puts_the_message_back(rig):
    """First SIGTERM, past shutdown_grace: "their process groups get SIGTERM ..., their messages go
    back on their queues, Waiting is reported, and rbit exits 0". With shutdown_grace = 1 a long
    job's process group is stopped, the message is back on its own queue with header
    x-rbit-recovered, Waiting is reported, and the worker exits 0."""
    queue, config, worker, job_pid, child = rig.start_slow_job(shutdown_grace="1")
    worker.signal(signal.SIGTERM)
    assert worker.wait(20) == 0, worker.log[-3000:]
    assert_gone(job_pid, child, timeout=3)
    assert not rig.runs("end", 1)
    rig.wait_status(1, statuses.WAITING, timeout=10)
    assert rig.statuses(1) == [statuses.BUILDING, statuses.WAITING]
    assert rig.vhost.depth(rig.in_progress()) == 0
    assert rig.vhost.depth(queue) == 1
    message = rig.vhost.get(queue)
    body = message.body if isinstance(message.body, str) else message.body.decode()
    assert body == rig.body(rig.job(1), queue)
    assert message.properties.get("application_headers", {}).get(HEADER_RECOVERED), message.properties


def test_second_sigterm_stops_at_once_and_loses_nothing(rig):
    """Second SIGTERM: "Running jobs are killed at once; their messages go back on their queues". With
    a long grace, the second SIGTERM ends the worker within seconds (exit 0), the job's group is
    gone, and its message is either back on its queue or in the in-progress queue, so the next
    start runs it to an end."""
    queue, config, worker, job_pid, child = rig.start_slow_job(shutdown_grace="60")
    worker.signal(signal.SIGTERM)
    worker.wait_log(r"SIGTERM received", timeout=5)
    time.sleep(0.5)
    assert worker.process.poll() is None, "the first SIGTERM did not wait for the job"
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    code = worker.wait(15)
    assert time.monotonic() - started < 8, "the second SIGTERM did not stop at once"
    assert code == 0, worker.log[-3000:]
    assert_gone(job_pid, child, timeout=3)
    assert rig.vhost.depth(queue) + rig.vhost.depth(rig.in_progress()) == 1

    config.write_text(config.read_text().replace("seconds = 60", "seconds = 1"))
    again = rig.start(config)
    rig.ended(again, 1, "Done", timeout=20)
    assert rig.vhost.depth(queue) == 0 and rig.vhost.depth(rig.in_progress()) == 0


def slow_job_then_broker_down(node, rig, grace):
    """A worker running a 60 s job (with a child process) whose broker has just gone away.

    Returns (queue, config path, worker, job pid, child pid)."""
    started = rig.start_slow_job(shutdown_grace=str(grace))
    node.stop_app()
    started[2].wait_log(r"lost the broker connection", timeout=15)
    return started


def test_second_sigterm_while_the_broker_is_down_keeps_the_job_for_the_next_start(node, node_rig):
    """Second SIGTERM with the broker away: the messages "stay in the in-progress queue for the next
    start", so no job is lost. The worker stops within seconds, the job's group is gone, the
    confirmed in-progress copy is still on the broker when it comes back, and the next start runs
    the job to an end."""
    rig = node_rig
    queue, config, worker, job_pid, child = slow_job_then_broker_down(node, rig, grace=60)
    worker.signal(signal.SIGTERM)
    worker.wait_log(r"SIGTERM received", timeout=5)
    time.sleep(0.5)
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    worker.wait(15)
    assert time.monotonic() - started < 8, "the second SIGTERM did not stop at once"
    assert_gone(job_pid, child, timeout=3)
    node.start_app()
    assert rig.vhost.depth(queue) + rig.vhost.depth(rig.in_progress()) == 1

    config.write_text(config.read_text().replace("seconds = 60", "seconds = 1"))
    again = rig.start(config)
    rig.ended(again, 1, "Done", timeout=20)
    assert len(rig.runs(n=1)) == 2
    assert rig.vhost.depth(queue) == 0 and rig.vhost.depth(rig.in_progress()) == 0


def test_sigterm_past_grace_while_the_broker_is_down_puts_the_message_back_when_it_returns(node, node_rig):
    """First SIGTERM, past shutdown_grace, with the broker away: the job is stopped after
    shutdown_grace, Waiting is reported, and the worker waits for the broker to put the message
    back on its queue (header x-rbit-recovered), then exits 0; nothing is left in the in-progress
    queue."""
    rig = node_rig
    queue, config, worker, job_pid, child = slow_job_then_broker_down(node, rig, grace=1)
    worker.signal(signal.SIGTERM)
    rig.wait_status(1, statuses.WAITING, timeout=15)
    assert_gone(job_pid, child, timeout=3)
    node.start_app()
    assert worker.wait(40) == 0, worker.log[-3000:]
    assert rig.statuses(1) == [statuses.BUILDING, statuses.WAITING]
    assert rig.vhost.depth(rig.in_progress()) == 0
    assert rig.vhost.depth(queue) == 1
    message = rig.vhost.get(queue)
    assert message.properties.get("application_headers", {}).get(HEADER_RECOVERED), message.properties


# -- 7. Cancel -------------------------------------------------------------------


def test_cancel_stops_the_running_job_and_drops_its_message(rig):
    """PyBit cancels the job: "A CancelRequest to the worker's name stops the job's process group;
    Cancelled; the message is dropped". Queue and in-progress queue are empty after, and the worker
    takes the next job."""
    queue, config, worker, job_pid, child = rig.start_slow_job()
    rig.cancel(1)
    rig.wait_status(1, statuses.CANCELLED, timeout=15)
    assert_gone(job_pid, child)
    assert rig.statuses(1) == [statuses.BUILDING, statuses.CANCELLED]
    assert not rig.runs("end", 1)
    assert wait_until(lambda: rig.vhost.depth(rig.in_progress()) == 0, 10)
    assert rig.vhost.depth(queue) == 0
    config.write_text(config.read_text().replace("seconds = 60", "seconds = 1"))
    rig.publish(2, queue)
    rig.wait_status(2, statuses.BUILDING, timeout=15)
    assert worker.process.poll() is None


def test_cancel_for_a_job_not_running_here_is_ignored(rig):
    """PyBit cancels a job: a CancelRequest for a job this worker is not running is ignored; the
    running job ends Done."""
    queue = rig.queue()
    worker = rig.start(rig.config({queue: ("slow", {"seconds": "4"})}))
    rig.publish(1, queue)
    rig.wait_runs(1, n=1)
    rig.cancel(99)
    worker.wait_log(rf"cancel request for job {rig.job(99)}.*ignored", timeout=10)
    rig.ended(worker, 1, "Done", timeout=15)
    rig.wait_status(1, statuses.DONE)
    assert rig.statuses(1) == [statuses.BUILDING, statuses.DONE]
    assert rig.statuses(99) == []


def test_cancel_after_a_reconnection_stops_the_running_job(node, node_rig):
    """PyBit cancels the job after the broker restarted: after the broker came back in the middle of a
    job, a CancelRequest still reaches the worker (its cancel queue is declared again), stops the
    job's group, reports Cancelled and drops the message."""
    rig = node_rig
    queue = rig.queue()
    worker = rig.start(rig.config({queue: ("slow", {"seconds": "60", "child": "yes"})}))
    rig.publish(1, queue)
    job_pid = rig.wait_runs(1, n=1)[0][2]
    child = rig.child_pid(1)
    node.stop_app()
    worker.wait_log(r"lost the broker connection", timeout=15)
    node.start_app()
    worker.wait_ready(count=2, timeout=40)
    rig.cancel(1)
    rig.wait_status(1, statuses.CANCELLED, timeout=15)
    assert_gone(job_pid, child)
    assert wait_until(lambda: rig.vhost.depth(rig.in_progress()) == 0, 10)
    assert rig.vhost.depth(queue) == 0
    assert len(rig.runs(n=1)) == 1


# -- 8. PyBit's web front end going away -------------------------------------------


def test_pybit_down_during_a_job_statuses_wait_and_arrive_in_order(rig):
    """PyBit's web front end is down: "Statuses wait and are delivered with backoff when it returns,
    in order per job ... The job is not affected." PyBit stops after Building; the job still ends
    and is acked; once PyBit is back, Uploaded and Done arrive, in order."""
    queue = rig.queue()
    worker = rig.start(rig.config({queue: ("progress", {"seconds": "3"})}))
    rig.publish(1, queue)
    rig.wait_status(1, statuses.BUILDING, timeout=15)
    rig.web.stop()
    rig.ended(worker, 1, "Done", timeout=20)
    assert wait_until(lambda: rig.vhost.depth(rig.in_progress()) == 0, 10)
    assert rig.vhost.depth(queue) == 0
    time.sleep(1)
    rig.web.start()
    rig.wait_status(1, statuses.DONE, timeout=40)
    assert rig.statuses(1) == [statuses.BUILDING, statuses.UPLOADED, statuses.DONE]


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_statuses_queued_while_pybit_is_down_survive_a_worker_restart(rig, tmp_path, stop):
    """PyBit's web front end is down, with ``[rbit] state_dir``: "waiting statuses survive a restart
    of the worker". Statuses that could not be delivered before the worker stopped (cleanly, or
    killed with SIGKILL) are kept and delivered, in order, by the next worker run."""
    queue = rig.queue()
    config = rig.config({queue: ("progress", {"seconds": "1"})},
                        rbit={"state_dir": str(tmp_path / "state")})
    rig.web.stop()
    worker = rig.start(config)
    rig.publish(1, queue)
    rig.ended(worker, 1, "Done", timeout=20)
    if stop == "sigterm":
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.log[-3000:]
    else:
        time.sleep(0.5)
        worker.process.kill()
        worker.wait(10)
    assert rig.web.reports == []
    rig.web.start()
    again = rig.start(config)
    rig.wait_status(1, statuses.DONE, timeout=30)
    assert rig.statuses(1) == [statuses.BUILDING, statuses.UPLOADED, statuses.DONE]
    assert again.process.poll() is None


# -- 10. Failover between broker hosts (private nodes) -------------------------------


def test_failover_first_host_refuses_the_worker_uses_the_second(node, node_rig):
    """``[amqp] host``, several separated by commas: "the worker moves to the next while one is down".
    The first host (127.0.0.2, where nothing listens on the port) refuses; the worker connects
    through the second (127.0.0.1, the private node) and serves."""
    rig = node_rig
    queue = rig.queue()
    config = rig.config({queue: ("ok", {})}, amqp={"host": f"127.0.0.2, {node.host}"})
    worker = rig.start(config)
    assert f"connected to the broker at {node.host}:{node.port}" in worker.log, worker.log[-3000:]
    rig.publish(1, queue)
    rig.ended(worker, 1, "Done", timeout=20)


def test_failover_when_the_connected_host_goes_away(node, node_rig):
    """Several ``[amqp] host`` entries, and the broker going away: two private nodes on the same port,
    one on 127.0.0.1 and one on 127.0.0.2; the worker connected to the first moves to the second
    when the first stops, and serves a job published there."""
    rig = node_rig
    second = RabbitNode(host="127.0.0.2", port=node.port)
    try:
        second.start()
        other = second.vhost()
        queue = rig.queue()
        config = rig.config({queue: ("ok", {})}, amqp={"host": f"{node.host}, {second.host}"})
        worker = rig.start(config)
        assert f"connected to the broker at {node.host}:{node.port}" in worker.log
        node.stop_app()
        worker.wait_log(rf"connected to the broker at {re.escape(second.host)}:{node.port}", timeout=30)
        worker.wait_ready(count=2, timeout=30)
        rig.vhost = other
        rig.publish(1, queue)
        rig.ended(worker, 1, "Done", timeout=20)
    finally:
        rig.cleanup()
        second.stop()
