"""Dead workers: a silent worker's jobs come back by themselves, and a
cut-off worker never builds beside the worker that took its jobs over.

The rules first, without a broker (rbit.lease, rbit.outcome, rbit.reclaim's announcements, the
job process's lease, the configuration); then the reclaim protocol and the worker's loop on the
in-memory broker, with clocks the tests move on; then real ``python -m rbit`` workers with
``reclaim_after = 10`` and ``[amqp] heartbeat = 2``, on a vhost of each test's own (so that no
other test's worker watches or is watched), with the reliability tests' Rig and runners, and a
private RabbitMQ node for the broker restarts.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from rbit import jobs, queues, reclaim, runners, statuses
from rbit.config import PybitSettings
from rbit.errors import ConfigError
from rbit.lease import FENCE_FRACTION, Lease, Watch, interval
from rbit.lease import clock as lease_clock
from rbit.message import Message
from rbit.outcome import Ended, Fate, Result, Stop, decide
from rbit.pybit import decode_build_request
from rbit.reclaim import Announcement, decode
from rbit.reporting import StatusReporter

from .broker import drop_vhost, make_vhost
from .harness import ROOT, alive, environment, wait_until, write_config
from .pybit_models import request_body
from .reliability_runners import events
from .test_metrics import free_port, http_get
from .memory_broker import MemoryBroker
from .test_reliability import Rig, assert_gone, module_node, node  # noqa: F401  (fixtures)
from .test_worker_loop import KEY, QUEUE, forks, harness, server, turn_until  # noqa: F401  (fixtures)

#: ``[rbit]`` and ``[amqp]`` keys of every worker here: short times.
RECLAIM_AFTER = 10
RBIT = {"reclaim_after": str(RECLAIM_AFTER)}
AMQP = {"heartbeat": "2"}


# -- The rules, without a broker ---------------------------------------------------------------


def test_lease_runs_out_at_four_fifths_of_reclaim_after_and_each_announcement_renews_it():
    """README "Recovering a dead worker's jobs": a worker that could not renew its liveness for
    4/5 of reclaim_after is fenced (once); the next confirmed announcement renews the lease from
    the moment it was sent."""
    lease = Lease(10)
    assert lease.deadline is None and not lease.runs_out(1e9), "no lease before the first announcement"
    assert lease.renew(100.0) == 100.0 + FENCE_FRACTION * 10 == 108.0
    assert not lease.runs_out(107.9) and not lease.fenced
    assert lease.runs_out(108.0) and lease.fenced
    assert not lease.runs_out(200.0), "fenced once, not again"
    assert lease.renew(300.0) == 308.0 and not lease.fenced


def test_reclaim_after_0_holds_no_lease():
    """``reclaim_after = 0``: the worker is never fenced and its jobs hold no lease."""
    lease = Lease(0)
    assert lease.renew(100.0) is None
    assert not lease.runs_out(1e9) and not lease.fenced


def test_announcements_come_every_tenth_of_reclaim_after_at_least_a_second_apart():
    """README ``[rbit] reclaim_after``: announcements every reclaim_after/10, at least 1 s apart
    (every 30 s with reclaiming off)."""
    assert interval(300) == 30
    assert interval(10) == 1
    assert interval(5) == 1
    assert interval(0) == 30


def test_silence_counts_on_the_watchers_clock_from_its_own_start_and_each_new_announcement():
    """README: a worker is silent when no new announcement of it has been seen for its own
    reclaim_after, on the watching worker's own clock, and never counting a time when the watcher
    itself was not watching (a connection loss alone is no reason to reclaim)."""
    watch = Watch()
    watch.saw("a", ("run", 1), 10, now=0.0)
    assert watch.silent(100.0) == [], "not watching: nothing counts"
    watch.restart(50.0)
    assert watch.silent(59.9) == []
    assert [name for name, _, _ in watch.silent(60.0)] == ["a"]
    watch.saw("a", ("run", 2), 10, now=61.0)          # it spoke
    assert watch.silent(70.9) == [] and watch.silence("a", 70.9) == pytest.approx(9.9)
    watch.saw("a", ("run", 2), 10, now=65.0)          # the same announcement again: still silent since 61
    assert [name for name, _, _ in watch.silent(71.0)] == ["a"]
    watch.stop()                                      # the watcher lost its connection
    assert watch.silent(500.0) == []
    watch.restart(500.0)
    assert watch.silent(509.0) == [] and watch.silent(510.0)


def test_a_worker_with_reclaim_after_0_or_an_unreadable_announcement_is_never_silent():
    """README: a worker with ``reclaim_after = 0`` is never reclaimed; one whose announcement
    cannot be read is not judged at all."""
    watch = Watch()
    watch.restart(0.0)
    watch.saw("off", ("run", 1), 0, now=0.0)
    watch.saw("unreadable", None, 0, now=0.0)
    watch.saw("gone", ("run", 1), 10, now=0.0)
    assert [name for name, _, _ in watch.silent(1e6)] == ["gone"]
    watch.keep(["off"])
    assert watch.silent(1e6) == []


def test_a_fenced_jobs_end_reports_nothing_and_leaves_its_message_alone():
    """rbit.outcome.decide: a job stopped by a fence reports no status, whatever the runner did,
    and its message is left for whoever puts it back (Fate.LOST)."""
    for result, last_final in [(None, None), (Result(Ended.RETURNED), None),
                               (Result(Ended.RAISED, statuses.FAILED, "x"), None),
                               (Result(Ended.RETURNED), statuses.DONE)]:
        decision = decide(result, last_final=last_final, stop=Stop.FENCED)
        assert decision.status is None and decision.fate is Fate.LOST and decision.outcome == "lost"


def test_announcements_say_who_and_refuse_anything_else():
    """rbit.reclaim: an announcement round-trips through its JSON; a body that is not one of the
    named worker's announcements is ignored (never a reason to reclaim)."""
    sent = Announcement("w1", "abc", 7, 10.0, 2, (41, 42), 1700000000.5)
    assert decode(sent.outgoing().body, "w1") == sent
    assert decode(sent.outgoing().body, "w2") is None
    for body in ("", "[]", "{not json", '{"name": "w1"}',
                 '{"name": "w1", "run": "a", "seq": 1, "reclaim_after": -1}',
                 '{"name": "w1", "run": "a", "seq": 1, "reclaim_after": NaN}',
                 '{"name": "w1", "run": "a", "seq": "1", "reclaim_after": 10}'):
        assert decode(body, "w1") is None, body


@pytest.mark.parametrize("value, error", [("2", "must be 0 (off) or at least 5, not '2'"),
                                          ("-1", "must be at least 0"), ("soon", "must be a number")])
def test_reclaim_after_is_0_or_at_least_5_seconds(tmp_path, value, error):
    """README configuration errors: ``reclaim_after`` is a number of seconds, 0 (off) or at
    least 5; the default is 300."""
    from rbit.config import load

    sections = {"x_any_latex_pdf": {"runner": "python!rbitext.hello:hello"}}
    default = load(write_config(tmp_path / "d.ini", name="d", vhost=None, runners=sections))
    assert default.worker.reclaim_after == 300
    off = load(write_config(tmp_path / "o.ini", name="o", vhost=None, runners=sections, rbit={"reclaim_after": "0"}))
    assert off.worker.reclaim_after == 0
    with pytest.raises(ConfigError) as caught:
        load(write_config(tmp_path / "b.ini", name="b", vhost=None, runners=sections,
                          rbit={"reclaim_after": value}))
    assert "section [rbit], key 'reclaim_after'" in str(caught.value) and error in str(caught.value)


def test_a_lost_jobs_statuses_not_yet_sent_are_dropped():
    """README: a fenced worker reports nothing more for the jobs it lost, not even statuses that
    were waiting for PyBit; other jobs' statuses stay."""
    reporter = StatusReporter(PybitSettings(url="http://127.0.0.1:9"), "me")  # not started: all wait
    for status in (statuses.BUILDING, statuses.UPLOADED, statuses.DONE):
        reporter.report(1, None, status)
    reporter.report(2, None, statuses.BUILDING)
    assert reporter.discard(1) == 3
    assert reporter.backlog == 1
    assert reporter.discard(1) == 0


def test_a_job_process_stops_its_own_group_when_the_lease_runs_out(tmp_path):
    """README "the worker's host freezes": a job process whose worker does not renew its lease
    (frozen: the pipe stays open) kills its whole process group when the lease runs out, whether
    it was never renewed or renewed for a while; while the worker renews it, the job runs on."""
    record = tmp_path / "runs.log"
    runner = runners.load("python!tests.reliability_runners:slow",
                          {"seconds": "60", "child": "yes", "record": str(record)})
    launcher = jobs.fork_server()
    processes = {}
    try:
        for job_id in (1, 2):
            body = request_body(job_id, f"p{job_id}", "1.0", "d", "any", "s", "pdf")
            message = Message(body=body, request=decode_build_request(body), queue="d_any_s_pdf")
            processes[job_id] = (jobs.JobProcess(launcher), message)
        started = lease_clock()
        for process, message in processes.values():
            process.start(lease=started + 3.0)
            process.begin(runner, message)
        processes = {job_id: process for job_id, (process, _) in processes.items()}
        renewed, never = processes[1], processes[2]
        assert wait_until(lambda: len(events(record, "child")) == 2, 10), "the runners never started their child"
        children = {job_id: int(extra) for _, job_id, _, _, extra in events(record, "child")}
        while lease_clock() < started + 5.0:
            renewed.renew(lease_clock() + 1.0)
            time.sleep(0.2)
        assert never.process.exitcode == -signal.SIGKILL, "the job outlived a lease never renewed"
        assert_gone(children[2], timeout=1)
        assert renewed.process.exitcode is None and alive(children[1]), "the job died while its lease was renewed"
        stopped_renewing = time.monotonic()
        assert wait_until(lambda: renewed.process.exitcode is not None, 5), "the job outlived its lease"
        assert time.monotonic() - stopped_renewing < 1.0 + 1.0
        assert renewed.process.exitcode == -signal.SIGKILL
        assert_gone(children[1], timeout=2)
    finally:
        for process in processes.values():
            if process.process is not None:
                process.kill()
                process.close()
        launcher.close()


def test_a_waiting_job_process_holds_no_job_to_stop_until_it_is_handed_one(tmp_path):
    """A process started ahead of its job outlives a lease that runs out while it waits (it has
    nothing to stop, and does not wake for the lease); handed a job once the lease is gone, it
    stops its group at once, before the runner does anything."""
    record = tmp_path / "runs.log"
    runner = runners.load("python!tests.reliability_runners:slow", {"seconds": "60", "record": str(record)})
    body = request_body(3, "p3", "1.0", "d", "any", "s", "pdf")
    message = Message(body=body, request=decode_build_request(body), queue="d_any_s_pdf")
    launcher = jobs.fork_server()
    process = jobs.JobProcess(launcher)
    process.start(lease=lease_clock() + 0.5)
    try:
        time.sleep(1.5)
        assert process.process.exitcode is None, "a process with no job died with the lease"
        process.begin(runner, message)
        assert wait_until(lambda: process.process.exitcode is not None, 2), "the job outlived its lease"
        assert process.process.exitcode == -signal.SIGKILL
        assert not events(record), "the runner ran past the lease"
    finally:
        process.kill()
        process.close()
        launcher.close()


# -- The loop and the protocol on the in-memory broker ------------------------------------------


class Clock:
    """The lease's clock for one worker, standing still but for what the test moves it on (its job
    processes hold deadlines on it: keep the test's real time shorter than its lease)."""

    def __init__(self):
        self.now = lease_clock()

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def pass_time(workers, seconds, step=0.4):
    """Move each (worker, clock) on by *seconds*, a turn of each worker's loop every *step*."""
    workers = list(workers)
    for _ in range(round(seconds / step)):
        for worker, clock in workers:
            clock.advance(step)
            turn(worker)


def turn(worker):
    """One turn of *worker*'s loop, without waiting out a wait measured on a clock that stands still."""
    worker.wakeup.wake()
    worker.loop()


def turn_while_still(worker, predicate, timeout=5.0):
    """Turn *worker*'s loop (see :func:`turn`) until *predicate()* is true."""
    assert wait_until(lambda: predicate() or turn(worker), timeout, interval=0), "the worker never got there"


def copy_of(job_id, worker_name, slot=0, server=None):
    """Put job *job_id*'s in-progress copy in *worker_name*'s slot queue, as the worker holds it."""
    server.publish(request_body(job_id, package="done"), queues.in_progress_name(worker_name, slot),
                   exchange="", headers={queues.HEADER_QUEUE: QUEUE})


def test_a_peer_moves_a_silent_workers_copies_only_under_its_lock_and_only_once(server):
    """README "Reclaiming, exactly once": a peer puts a silent worker's copies back only while it
    holds that worker's lock, only if the worker has not announced itself since, and a second
    peer then finds nothing to move; the copy goes back marked as recovered from the worker, and
    the worker leaves the registry."""
    dead, holder, first, second = (MemoryBroker(server, name) for name in ("d", "d-joining", "p1", "p2"))
    for broker in (dead, holder, first, second):
        broker.connect()
    dead.declare(queues.build_queue(QUEUE, KEY))
    dead.declare(queues.in_progress_queue("d", 0))
    copy_of(1, "d", server=server)
    reclaim.join(dead, "d")
    reclaim.announce(dead, Announcement("d", "run", 1, 10.0))
    seen = reclaim.latest(first, "d")
    assert seen.key == ("run", 1) and "d" in reclaim.registry(first)

    assert holder.claim(queues.reclaim_lock("d"))                 # the worker itself, joining again
    assert reclaim.reclaim(first, "d", seen, 11.0, "rej") is None
    holder.delete(queues.reclaim_lock("d").name)
    reclaim.announce(dead, Announcement("d", "run", 2, 10.0))     # it spoke
    assert reclaim.reclaim(first, "d", seen, 11.0, "rej") is None
    assert server.depth(queues.in_progress_name("d", 0)) == 1 and server.depth(QUEUE) == 0

    seen = reclaim.latest(first, "d")
    assert reclaim.reclaim(first, "d", seen, 11.0, "rej") == 1
    assert reclaim.reclaim(second, "d", seen, 11.0, "rej") == 0
    assert server.depth(queues.in_progress_name("d", 0)) == 0
    [back] = server.messages(QUEUE)
    assert back.headers[queues.HEADER_RECOVERED] == "d"
    assert "d" not in reclaim.registry(second)


def test_loop_two_live_peers_run_a_silent_workers_job_once(harness, server):
    """README "the host loses power", on the worker's loop: a worker dies mid-job; of two live
    peers, after its reclaim_after of silence on their own clocks, one puts the job back, and the
    job runs once more, as a redelivery, reported Building and Done by one peer alone."""
    dead = harness.worker("d", reclaim_after="5")
    harness.publish(1, package="wait")
    turn_until(dead, lambda: harness.runs() == [(1, 0)])
    peers = [harness.worker(name, reclaim_after="5") for name in ("p1", "p2")]
    clocks = [Clock() for _ in peers]
    for peer, clock in zip(peers, clocks):
        peer.liveness.clock = clock
        turn(peer)                                     # a first look: the dead worker is alive
    for job in dead.running():
        job.process.kill()
    dead.broker.fail()                                 # it never turns again
    harness.release(1)

    pass_time(zip(peers, clocks), 4.8)                 # they announce meanwhile: their leases hold
    assert harness.runs() == [(1, 0)], "reclaimed before reclaim_after"
    assert not any(peer.liveness.fenced for peer in peers)
    pass_time(zip(peers, clocks), 1.2)                 # the next look (every second) finds it silent
    deadline = time.monotonic() + 5
    while len(harness.runs()) < 2 or any(peer.running() for peer in peers):
        assert time.monotonic() < deadline, harness.runs()
        for peer in peers:
            turn(peer)
    assert harness.runs() == [(1, 0), (1, 1)]
    assert sorted(peer.reporter.statuses(1) for peer in peers) == [[], ["Building", "Done"]]
    assert server.depth(queues.in_progress_name("d", 0)) == 0 and server.depth(QUEUE) == 0


def health_when_fenced(worker) -> list[dict]:
    """What *worker*'s ``/healthz`` says at each fence, read the moment its lease check fences it."""
    seen = []
    check = worker.liveness.check

    def check_and_read(now=None):
        fenced = check(now)
        if fenced:
            seen.append(worker.health())
        return fenced

    worker.liveness.check = check_and_read
    return seen


def test_loop_a_worker_past_its_lease_reports_nothing_more_and_serves_again(harness, server, caplog):
    """README "the worker is cut off from the broker": a worker whose lease ran out stops its job
    (fenced: /healthz unhealthy), reports nothing more for that run, logs one line for the lost
    job, then joins again: with no peer to have moved it, it puts its own copy back and runs the
    job again, to Done."""
    worker = harness.worker("a", reclaim_after="5")
    clock = Clock()
    worker.liveness.clock = clock
    harness.publish(1, package="wait")
    turn_until(worker, lambda: worker.reporter.statuses(1) == ["Building"] and harness.runs() == [(1, 0)])
    job = worker.running()[0]
    at_fence = health_when_fenced(worker)
    clock.advance(FENCE_FRACTION * 5)                  # no announcement got through in time
    turn(worker)
    # The same turn may see the stopped job end and join again, so /healthz is read as the fence falls.
    assert at_fence and at_fence[0]["fenced"] is True and at_fence[0]["healthy"] is False
    assert wait_until(lambda: job.process.process.exitcode is not None, 2), "the fenced job was not stopped"
    harness.release(1)
    turn_while_still(worker, lambda: len(harness.runs()) == 2 and not worker.running())
    assert harness.runs() == [(1, 0), (1, 1)]
    assert worker.reporter.statuses(1) == ["Building", "Building", "Done"]
    assert worker.health()["fenced"] is False
    assert len([r for r in caplog.records if re.search(r"job 1: .* lost: ", r.getMessage())]) == 1
    assert server.depth(queues.in_progress_name("a", 0)) == 0 and server.depth(QUEUE) == 0


# -- Real workers --------------------------------------------------------------------------------


@pytest.fixture
def own_vhost():
    """A vhost for this test alone: its workers' registry sees no other test's workers."""
    made = make_vhost()
    yield made
    drop_vhost(made)


def stop_everything(rig):
    """Every process the test started, ended: stopped workers continued first, then the Rig's cleanup."""
    for worker in rig.workers:
        if worker.process is not None and worker.process.poll() is None:
            os.kill(worker.process.pid, signal.SIGCONT)
    rig.cleanup()


@pytest.fixture
def rig(tmp_path, unique, own_vhost, pybit_web):
    made = Rig(tmp_path, unique, own_vhost, pybit_web)
    try:
        yield made
    finally:
        stop_everything(made)


@pytest.fixture
def node_rig(tmp_path, unique, node, pybit_web):
    made = Rig(tmp_path, unique, node.vhost(f"reclaim-{unique}"), pybit_web, amqp=node.amqp_settings())
    try:
        yield made
    finally:
        stop_everything(made)


def start_worker(rig, label, runners, **rbit):
    """A worker named ``<rig name>-<label>`` with reclaim_after 10 and heartbeat 2, serving."""
    name = f"{rig.name}-{label}"
    return rig.start(rig.config(runners, name=name, rbit={**RBIT, **rbit}, amqp=AMQP)), name


def kill_host(worker, *pids):
    """A host lost: the worker and its job's processes die at once (SIGKILL)."""
    for pid in (worker.process.pid, *pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    worker.process.wait(10)


def starts_by(rig, n):
    """The runner's start records of job *n* as (pid, time, redelivered)."""
    return [(pid, when, extra == "redelivered=True") for _, _, pid, when, extra in rig.runs("start", n)]


def history(rig, n):
    return rig.web.history(rig.job(n))


def rbit_command(*args):
    """``python -m rbit ARGS`` as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "rbit", *map(str, args)], capture_output=True, text=True,
                          timeout=60, cwd=str(ROOT), env=environment())


def test_host_lost_a_live_peer_puts_the_job_back_and_runs_it(rig):
    """README "the host loses power" / "Recovering a dead worker's jobs": worker A and its job's
    processes are killed with SIGKILL mid-job; worker B (another name, same queue) puts the job
    back after A's reclaim_after of silence and runs it, as a redelivery, within reclaim_after
    + 15 s; A's in-progress queue is empty; PyBit's history has one Done, by B."""
    queue = rig.queue()
    a, a_name = start_worker(rig, "a", {queue: ("slow", {"seconds": "60", "child": "yes"})})
    rig.publish(1, queue)
    job_pid = rig.wait_runs(1, n=1)[0][2]
    child = rig.child_pid(1)
    rig.wait_status(1, statuses.BUILDING)
    b, b_name = start_worker(rig, "b", {queue: ("slow", {"seconds": "1"})})

    kill_host(a, job_pid, child)
    killed = time.time()
    runs = rig.wait_runs(2, n=1, timeout=RECLAIM_AFTER + 15)
    assert runs[1][3] - killed <= RECLAIM_AFTER + 15, runs
    rig.ended(b, 1, "Done", timeout=20)
    rig.wait_status(1, statuses.DONE)
    assert [entry[4] for entry in runs] == ["redelivered=False", "redelivered=True"], runs
    assert re.search(rf"worker {a_name} has been silent for \d+ s .*put back 1 job", b.log), b.log[-3000:]
    done = [client for status, client in history(rig, 1) if status == statuses.DONE]
    assert done == [b_name], history(rig, 1)
    assert history(rig, 1) == [(statuses.WAITING, None), (statuses.BUILDING, a_name),
                               (statuses.BUILDING, b_name), (statuses.DONE, b_name)]
    assert rig.vhost.depth(rig.in_progress(name=a_name)) == 0
    assert rig.vhost.depth(queue) == 0 and rig.vhost.depth(rig.in_progress(name=b_name)) == 0


def test_host_frozen_the_job_stops_before_a_peer_runs_it_and_the_worker_comes_back(rig):
    """README "the worker's host freezes": SIGSTOP on worker A only (its job's process runs on and
    records a tick every 0.2 s). The job process stops its own group when A's lease runs out, B
    puts the job back after the reclaim and runs it, and the ticks show no moment when both runs
    were alive. After SIGCONT, A logs that it was fenced and lost the job, reports nothing more
    for it, and takes the next new job."""
    queue, other = rig.queue("f"), rig.queue("n")
    a, a_name = start_worker(rig, "a", {queue: ("tick", {"seconds": "60"}), other: ("ok", {})})
    rig.publish(1, queue)
    a_pid = rig.wait_runs(1, n=1)[0][2]
    rig.wait_status(1, statuses.BUILDING)
    b, b_name = start_worker(rig, "b", {queue: ("tick", {"seconds": "3"})})

    a.signal(signal.SIGSTOP)
    try:
        stopped = time.time()
        runs = rig.wait_runs(2, n=1, timeout=RECLAIM_AFTER + 15)
        assert_gone(a_pid, timeout=1), "A's job outlived B's start"
        assert runs[1][4] == "redelivered=True", runs
        rig.ended(b, 1, "Done", timeout=20)
        rig.wait_status(1, statuses.DONE)
        ticks = rig.runs("tick", 1)
        by_a = [when for _, _, pid, when, _ in ticks if pid == a_pid]
        by_b = [when for _, _, pid, when, _ in ticks if pid == runs[1][2]]
        assert by_a and by_b, ticks
        assert max(by_a) + 0.25 < min(by_b), (
            f"A's run ticked until {max(by_a) - stopped:.2f} s after the freeze, "
            f"B's began at {min(by_b) - stopped:.2f} s")
        assert max(by_a) - stopped < FENCE_FRACTION * RECLAIM_AFTER + 1, "A's job outlived its lease"
        before = history(rig, 1)
    finally:
        a.signal(signal.SIGCONT)

    a.wait_log(r"fenced; stopping 1 job", timeout=15)
    a.wait_log(rf"job {rig.job(1)}: .* lost: ", timeout=15)
    a.wait_ready(count=2, timeout=30)
    rig.publish(2, other)
    rig.ended(a, 2, "Done", timeout=20)
    time.sleep(1)
    assert history(rig, 1) == before == [(statuses.WAITING, None), (statuses.BUILDING, a_name),
                                         (statuses.BUILDING, b_name), (statuses.DONE, b_name)]
    assert len(rig.runs(n=1)) == 2
    assert rig.vhost.depth(queue) == 0 and rig.vhost.depth(rig.in_progress(name=a_name)) == 0


def test_three_live_peers_put_a_dead_workers_two_jobs_back_once_each(rig):
    """README "Recovering a dead worker's jobs", exactly once: a dead worker (SIGKILL, with its
    jobs) had two jobs in progress; with three live peers serving the queue, each job runs
    exactly once more."""
    queue = rig.queue()
    dead, dead_name = start_worker(rig, "d", {queue: ("slow", {"seconds": "60", "child": "yes"})},
                                   concurrency="2")
    rig.publish(1, queue)
    rig.publish(2, queue)
    first = rig.wait_runs(2)
    children = [int(extra) for _, _, _, _, extra in rig.wait_runs(2, "child")]
    peers = [start_worker(rig, label, {queue: ("slow", {"seconds": "1"})})[0] for label in ("p1", "p2", "p3")]

    kill_host(dead, *(entry[2] for entry in first), *children)
    for n in (1, 2):
        rig.wait_runs(2, n=n, timeout=RECLAIM_AFTER + 20)
        rig.wait_status(n, statuses.DONE, timeout=20)
    time.sleep(RECLAIM_AFTER + 3)  # any second reclaim would have happened by now
    for n in (1, 2):
        assert len(rig.runs(n=n)) == 2, rig.runs(n=n)
        assert [status for status, _ in history(rig, n)].count(statuses.DONE) == 1, history(rig, n)
    put_back = [int(m) for peer in peers for m in re.findall(rf"worker {dead_name} has been silent .*put back (\d+)",
                                                                  peer.log)]
    assert sum(put_back) == 2, rig.logs()
    for slot in (0, 1):
        assert rig.vhost.depth(rig.in_progress(slot, name=dead_name)) == 0
    assert rig.vhost.depth(queue) == 0


def test_reclaim_after_0_is_never_reclaimed_and_reclaims_no_one(rig):
    """README ``reclaim_after = 0``: a dead worker with 0 keeps its job in its in-progress queue
    (a live peer never moves it) until ``rbit recover``; a live worker with 0 moves no one's jobs,
    not even those of a dead worker with reclaim_after 10, which the next live peer with 10 does."""
    queue = rig.queue()
    slow = {queue: ("slow", {"seconds": "60", "child": "yes"})}
    off, off_name = start_worker(rig, "off", slow, reclaim_after="0")
    rig.publish(1, queue)
    off_run = rig.wait_runs(1, n=1)[0][2]
    on, on_name = start_worker(rig, "on", slow)
    rig.publish(2, queue)
    on_run = rig.wait_runs(1, n=2)[0][2]
    watcher, _ = start_worker(rig, "w0", {queue: ("slow", {"seconds": "1"})}, reclaim_after="0")
    kill_host(off, off_run, rig.child_pid(1))
    kill_host(on, on_run, rig.child_pid(2))

    time.sleep(2 * RECLAIM_AFTER)
    assert rig.vhost.depth(rig.in_progress(name=off_name)) == 1
    assert rig.vhost.depth(rig.in_progress(name=on_name)) == 1
    assert len(rig.runs()) == 2 and "silent" not in watcher.log

    peer, _ = start_worker(rig, "w10", {queue: ("slow", {"seconds": "1"})})
    rig.wait_runs(2, n=2, timeout=RECLAIM_AFTER + 15)
    time.sleep(3)
    assert rig.vhost.depth(rig.in_progress(name=off_name)) == 1, "a worker with reclaim_after 0 was reclaimed"
    assert len(rig.runs(n=1)) == 1

    config = rig.dir / f"{off_name}.ini"
    done = rbit_command("recover", config, "--worker", off_name)
    assert done.returncode == 0 and "put back 1" in done.stdout, (done.stdout, done.stderr)
    rig.wait_runs(2, n=1, timeout=20)
    rig.wait_status(1, statuses.DONE)
    assert rig.vhost.depth(rig.in_progress(name=off_name)) == 0


def test_status_shows_each_worker_with_its_last_sign_of_life_and_its_jobs(rig):
    """README "Looking at the worker": ``rbit status`` lists every worker on the vhost with the age
    of its last announcement and its state, and each job in progress with its worker."""
    queue = rig.queue()
    busy, busy_name = start_worker(rig, "busy", {queue: ("slow", {"seconds": "60"})})
    rig.publish(1, queue)
    rig.wait_runs(1, n=1)
    idle, idle_name = start_worker(rig, "idle", {queue: ("slow", {"seconds": "60"})}, reclaim_after="0")
    shown = rbit_command("status", rig.dir / f"{busy_name}.ini")
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line for line in shown.stdout.splitlines() if line.startswith(rig.name)}
    assert re.search(r"\s\d+ s ago\s+alive, reclaim after 10 s\s+job %d: pkg%d 1\.0" % (rig.job(1), rig.job(1)),
                     rows[busy_name]), shown.stdout
    assert re.search(r"\s\d+ s ago\s+alive, reclaim off\s+idle", rows[idle_name]), shown.stdout


# -- The broker going away (private node) --------------------------------------------------------


def test_broker_restart_shorter_than_reclaim_after_changes_nothing(node, node_rig):
    """README "the broker restarts": a broker restart of a few seconds under reclaim_after 10, with a
    live peer: no fence, no reclaim; the job goes on, runs once and is reported once. The restart
    must stay well within the 8 s after which the worker fences itself; stopping and starting the
    node takes up to 5 s on a loaded machine, so the node stays down 1.5 s between them."""
    rig = node_rig
    queue = rig.queue()
    a, a_name = start_worker(rig, "a", {queue: ("slow", {"seconds": "20"})})
    rig.publish(1, queue)
    rig.wait_runs(1, n=1)
    b, _ = start_worker(rig, "b", {queue: ("slow", {"seconds": "1"})})
    time.sleep(2)
    started = time.monotonic()
    node.stop_app()
    time.sleep(1.5)
    node.start_app()
    down = time.monotonic() - started
    assert down < 6.5, f"the restart took {down:.1f} s"
    a.wait_ready(count=2, timeout=20)
    rig.ended(a, 1, "Done", timeout=30)
    rig.wait_status(1, statuses.DONE)
    time.sleep(RECLAIM_AFTER)
    assert rig.statuses(1) == [statuses.BUILDING, statuses.DONE]
    assert len(rig.runs(n=1)) == 1
    assert "fenced" not in a.log and "silent" not in b.log, rig.logs()
    assert rig.vhost.depth(queue) == 0 and rig.vhost.depth(rig.in_progress(name=a_name)) == 0


def test_cut_off_past_its_lease_the_worker_fences_then_serves_again(node, node_rig):
    """README "the worker is cut off from the broker": with the broker away for longer than 4/5 of
    reclaim_after, the worker stops its job's group, reports nothing more for that run, and
    ``/healthz`` says ``fenced``; when the broker is back it logs the lost job, puts back the copy
    no peer moved (there is none here), and serves again: the job runs again, to one Done."""
    rig = node_rig
    queue = rig.queue()
    port = free_port()
    a, a_name = start_worker(rig, "a", {queue: ("slow", {"seconds": "12", "child": "yes"})},
                             http=f"127.0.0.1:{port}")
    rig.publish(1, queue)
    job_pid = rig.wait_runs(1, n=1)[0][2]
    child = rig.child_pid(1)
    rig.wait_status(1, statuses.BUILDING)
    node.stop_app()
    try:
        a.wait_log(r"fenced; stopping 1 job", timeout=FENCE_FRACTION * RECLAIM_AFTER + 5)
        assert_gone(job_pid, child, timeout=3)
        code, _, body = http_get(f"http://127.0.0.1:{port}/healthz")
        assert code == 503 and json.loads(body)["fenced"] is True, body
    finally:
        node.start_app()
    a.wait_log(rf"job {rig.job(1)}: .* lost: ", timeout=30)
    a.wait_log(rf"put back a job that {a_name} did not finish", timeout=30)
    rig.ended(a, 1, "Done", timeout=40)
    rig.wait_status(1, statuses.DONE)
    runs = rig.runs(n=1)
    assert [entry[4] for entry in runs] == ["redelivered=False", "redelivered=True"], runs
    assert history(rig, 1) == [(statuses.WAITING, None), (statuses.BUILDING, a_name),
                               (statuses.BUILDING, a_name), (statuses.DONE, a_name)]
    code, _, body = http_get(f"http://127.0.0.1:{port}/healthz")
    assert code == 200 and json.loads(body)["fenced"] is False, body
    assert rig.vhost.depth(queue) == 0 and rig.vhost.depth(rig.in_progress(name=a_name)) == 0
