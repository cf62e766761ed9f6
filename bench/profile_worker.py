"""Where does an rbit job's time go? A step-by-step timeline of real jobs, in milliseconds.

Usage::

    python bench/profile_worker.py [--latency N] [--batch N]

Runs the same set-up as bench/bench.py (own vhost, concurrency 1, a real
worker subprocess), but the worker is started through ``serve`` below, which
wraps its steps with bench/profile_hooks.py before serving; the job processes
(each started before its job, offered it by ``JobProcess.offer`` while the broker
confirms the message's copy, and told to run it by ``JobProcess.go``) and the
guard send their own timestamps. All clocks are ``time.time()`` on this
machine. Then it prints, for idle-worker jobs (published one at a time) and for
pre-loaded no-op python and ``shell!/bin/true`` batches (five served queues,
then one), the median and 90th percentile of each step of a job's life: the
worker taking the message, the job handed to its waiting process, then, still
in ``Jobs.start`` and while the job runs, ``Jobs.warm_up`` forking the slot's
next process (rbit/ready.py); the job's side up to its result or its exec, the
worker noticing the exit (rbit's fork server reaps the process and reports it on
its socket), and the worker's tail (``_end``, the purge,
``_resume_consuming`` with its ``Jobs.warm_up``, which finds the next process
waiting, and the consume). In brackets, what overlaps: the next process's
start-up and its slack before the next job's ``JobProcess.offer``, and whether
the job got to its end while the worker was still in ``Jobs.start``. Then, per
group, how many jobs found no process waiting or found theirs not yet ready,
where the next processes were forked, the gap between jobs of a batch, and the
CPU per job of the worker, the fork server, the guard, the job processes (the
fork server's reaped children) and the broker (beam.smp).
"""

import argparse
import bisect
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import Bench, WorkerUnderTest, cpu_ticks, fork_server_pid, percentile


def serve(config_path, trace_path):
    """The worker that ``rbit CONFIG -q --poll-time 60`` runs, in this process, with timing hooks.

    This is a step timeline, so the hooks must be in the worker's own process;
    bench/bench.py measures the ``rbit`` console script itself, as users run it.

    With ``RBIT_BENCH_TRACEMALLOC=PATH`` it traces allocations instead of timing
    steps: SIGUSR1 takes the baseline snapshot; SIGUSR2 writes to PATH the
    allocation sites that grew most since then (the worker keeps running).
    """
    import profile_hooks

    memory_report = os.environ.get("RBIT_BENCH_TRACEMALLOC")
    if memory_report:
        _trace_allocations(memory_report)
    else:
        profile_hooks.install_worker_hooks()
    from rbit import cli

    config = cli.load_config(config_path, 60)
    cli.setup_logging(False, True)
    try:
        return cli.serve(config)
    finally:
        if not memory_report:
            profile_hooks.dump(trace_path)


_baseline = []


def _trace_allocations(path):
    import signal
    import tracemalloc

    tracemalloc.start(12)
    signal.signal(signal.SIGUSR1, lambda *_: _baseline.append(tracemalloc.take_snapshot()))
    signal.signal(signal.SIGUSR2, lambda *_: _write_allocation_growth(path))


def _write_allocation_growth(path):
    import gc
    import tracemalloc

    gc.collect()
    snapshot = tracemalloc.take_snapshot()
    with open(path, "w") as out:
        if not _baseline:
            out.write("no baseline snapshot (SIGUSR1 never came)\n")
            return
        stats = snapshot.compare_to(_baseline[0], "traceback")
        grown = sum(stat.size_diff for stat in stats)
        out.write(f"traced memory growth since the baseline: {grown / 1024:.1f} KiB "
                  f"(now {tracemalloc.get_traced_memory()[0] / 1024:.1f} KiB traced)\n")
        out.write(_live_consumers())
        for stat in stats[:12]:
            out.write(f"\n{stat.size_diff / 1024:+.1f} KiB in {stat.count_diff:+d} blocks\n")
            out.writelines(line + "\n" for line in stat.traceback.format()[-16:])


def _live_consumers():
    """How many kombu Consumers are alive, and what holds the oldest one (two levels up)."""
    import gc

    from kombu.messaging import Consumer

    from rbit.broker import Broker

    consumers = [obj for obj in gc.get_objects() if isinstance(obj, Consumer)]
    lines = [f"live kombu Consumer objects: {len(consumers)}"]
    for broker in (obj for obj in gc.get_objects() if isinstance(obj, Broker)):
        if broker._channel is None:
            continue
        held = {tag for group in broker._consumers.values() for c in group for tag in c._active_tags.values()}
        registered = set(broker._channel.callbacks)
        lines.append(f"py-amqp channel.callbacks: {len(registered)} consumer tags; Broker.consumers holds "
                     f"{len(held)} active tags; registered but not held: {len(registered - held)} "
                     f"(e.g. {sorted(registered - held)[:5]})")
    if consumers:
        oldest = consumers[0]
        for holder in gc.get_referrers(oldest):
            if holder is consumers:
                continue
            lines.append(f"  held by {type(holder).__name__} {_describe(holder)}")
            for upper in gc.get_referrers(holder):
                if upper is not consumers and not isinstance(upper, type(sys._getframe())):
                    lines.append(f"    which is held by {type(upper).__name__} {_describe(upper)}")
    return "\n".join(lines) + "\n"


def _describe(obj):
    if isinstance(obj, dict):
        return f"(dict of {len(obj)}; keys like {list(obj)[:3]!r})"
    if isinstance(obj, (list, tuple, set)):
        return f"({type(obj).__name__} of {len(obj)})"
    return repr(obj)[:120]


def reaped_ticks(pid):
    """cutime + cstime of *pid*: the CPU of its children that it has reaped, in clock ticks."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[13]) + int(fields[14])


def beam_pid(port=5672):
    """The pid of the process listening on the AMQP *port* (the RabbitMQ node), or None.

    Several RabbitMQ nodes may run on a shared machine; only the one serving
    our port is the broker whose CPU per job counts.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:
            continue
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                link = os.readlink(f"/proc/{entry}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(entry)
        except OSError:
            continue
    return None


class ProfileBench(Bench):
    """bench.Bench with the hooked worker and runners, and per-batch CPU accounting."""

    QUEUES: ClassVar[dict] = {kind: (key, line.replace("python!runners:", "python!profile_hooks:"))
              for kind, (key, line) in Bench.QUEUES.items()}

    def make_worker(self, config):
        self.trace = self.tmp / "spans.jsonl"
        return WorkerUnderTest(
            config, self.tmp / "worker.log",
            # -c, not this script's path: the worker's __main__ is then no script (rbit's fork
            # server never runs the worker's __main__ again in any case).
            command=[sys.executable, "-c", "import sys, profile_worker; sys.exit(profile_worker.serve(*sys.argv[1:]))",
                     str(config), str(self.trace)],
            env={"RBIT_BENCH_REPORT_TO": self.stamps.address},
        )

    def guard_pid(self):
        """The pid of the worker's guard process (it stamps ``w_guard PID`` as it starts), or None."""
        with self.stamps.cond:
            found = [(stamp, key[1]) for key, stamp in self.stamps.events.items() if key[0] == "w_guard"]
        return max(found)[1] if found else None

    def cpu_snapshot(self):
        pids = {"worker": self.worker.pid, "forkserver": self.forkserver, "guard": self.guard_pid(),
                "broker": beam_pid()}
        ticks = {who: cpu_ticks(pid) for who, pid in pids.items() if pid}
        if self.forkserver:
            # The job processes are the fork server's children, reaped by it (os.waitpid on SIGCHLD):
            # their CPU is in its cutime and cstime. The guard is its child too, but runs on, unreaped.
            ticks["job processes"] = reaped_ticks(self.forkserver)
        return ticks

    def profile(self, latency_n, batch_n):
        self.setup()
        self.phase_warmup()
        self.groups = {}
        self.published = {}
        self.cpu = {}
        ids = []
        for _ in range(latency_n):
            job_id, published, _, _ = self.run_one()
            self.published[job_id] = published
            ids.append(job_id)
        self.groups["5 queues, idle, python!stamp"] = ids
        for kind, label in (("noop", "5 queues, batch, python!stamp"), ("shell", "5 queues, batch, shell!/bin/true")):
            before, t0 = self.cpu_snapshot(), time.monotonic()
            result = self.batch(kind, batch_n, timeout=120)
            after, wall = self.cpu_snapshot(), time.monotonic() - t0
            hz = os.sysconf("SC_CLK_TCK")
            self.cpu[label] = {who: (after[who] - before[who]) / hz * 1000 / result["run"] for who in after}
            self.cpu[label]["wall"] = wall * 1000 / result["run"]
            self.groups[label] = result["ids"]


class SingleQueueProfile(ProfileBench):
    """A worker serving one queue only (the common case), pre-loaded before it starts."""

    def __init__(self, kind, log, first_id):
        super().__init__({}, log=log)
        self.kind = kind
        self._job_ids = iter(range(first_id, first_id + 10**6))
        self.QUEUES = {kind: ProfileBench.QUEUES[kind]}
        self.forkserver = None

    def profile(self, count):
        """Two warm-up jobs, then *count* jobs between two markers; returns jobs/s."""
        self.setup_broker()
        warm = [next(self._job_ids) for _ in range(2)]
        ids = [next(self._job_ids) for _ in range(count)]
        begin, end = f"marker begin {ids[0]}", f"marker end {ids[0]}"
        bodies = [self.body(j) for j in warm] + [begin] + [self.body(j) for j in ids] + [end]
        self.broker.publish_bulk(bodies, self.routing_key(self.kind), self.queue(self.kind))
        self.start_worker(wait=False)
        t_begin = self.broker.wait_marker(begin, 60)
        self.forkserver = fork_server_pid(self.worker.pid)
        before, t0 = self.cpu_snapshot(), time.monotonic()
        t_end = self.broker.wait_marker(end, 180)
        run = count
        if t_end is None:
            # As Bench.batch: the rest of the queue is dropped, and the jobs that ran are counted.
            purged = self.broker.purge(self.queue(self.kind))
            stop = f"marker stop {ids[0]}"
            self.broker.publish_confirmed(stop, self.routing_key(self.kind))
            t_end = self.broker.wait_marker(stop, 60)
            run = count - purged + (0 if end in self.broker.markers else 1)
            self.log(f"1 queue, {self.kind}: the end marker did not come within 180 s; {run} of {count} jobs ran")
            if t_end is None:
                raise RuntimeError(f"1 queue, {self.kind}: the worker took no job for 60 s after the purge")
        after, wall = self.cpu_snapshot(), time.monotonic() - t0
        hz = os.sysconf("SC_CLK_TCK")
        label = f"1 queue, batch, {self.QUEUES[self.kind][1].replace('profile_hooks:', '')}"
        self.cpu = {label: {who: (after[who] - before[who]) / hz * 1000 / run for who in after}}
        self.cpu[label]["wall"] = wall * 1000 / run
        self.groups = {label: ids[:run]}
        self.published = {}
        return run / (t_end - t_begin)


# -- Analysis --------------------------------------------------------------------


def load_spans(path):
    spans = []
    with open(path) as lines:
        for line in lines:
            name, start, end, job = json.loads(line)
            spans.append((name, start, end, job))
    spans.sort(key=lambda span: span[1])
    return spans


def job_timelines(spans, stamps, published):
    """{job id: {point or step name: value}} from the worker's spans and the processes' stamps."""
    begins = [span[1] for span in spans]

    def window(span):
        """The spans that start and end within *span* (itself included)."""
        low, high = bisect.bisect_left(begins, span[1]), bisect.bisect_right(begins, span[2])
        return [s for s in spans[low:high] if s[2] <= span[2]]

    def first_after(t0, name, limit=5000):
        low = bisect.bisect_left(begins, t0)
        return next((s for s in spans[low:low + limit] if s[0] == name), None)

    def stamp(kind, key):
        return None if key is None else stamps.get((kind, key))

    # A process is named by its fork server request (bench/profile_hooks.py: JobProcess.start does
    # not wait for the pid), and its pid, which the processes' stamps give.
    firsts = {}  # (what, job id): the first such span
    starts = {}  # request: the JobProcess.start span that asked for the process
    handed = {}  # request: the JobProcess.offer span that gave the process its job
    on_messages = []
    for span in spans:
        name, info = span[0], span[3]
        if name in ("jobs.start", "jobs._end"):
            firsts.setdefault((name, info), span)
        elif name == "jobprocess.offer" and info:
            firsts.setdefault((name, info["job"]), span)
            handed.setdefault(info.get("request"), span)
        elif name == "jobs._on_event" and info:
            firsts.setdefault((f"event:{info['event']}:{info['status'] or ''}", info["job"]), span)
        elif name == "jobprocess.exited" and info and info["exited"]:
            firsts.setdefault(("exited", info["job"]), span)
        elif name == "output.drained" and info and info["drained"]:
            firsts.setdefault(("drained", info["job"]), span)
        elif name == "jobprocess.start" and info:
            starts.setdefault(info["request"], span)
        elif name == "worker._on_message":
            on_messages.append(span)
    on_message_begins = [span[1] for span in on_messages]

    def process(info, before):
        """(JobProcess.start span, its main entered, its waiting for its job) of the process *info*
        names (its request and pid), started before *before*."""
        start = starts.get(info.get("request"))
        if start is not None and start[1] > before:
            start = None
        main, ready = stamp("w_main", info.get("pid")), stamp("w_ready", info.get("pid"))
        if start is None or main is None or not start[1] <= main <= before:
            return start, None, None  # a pid used again since: its stamps are another process's
        return start, main, ready

    timelines = {}
    for (name, job_id), start_span in list(firsts.items()):
        if name != "jobs.start" or ("jobs._end", job_id) not in firsts or ("jobprocess.offer", job_id) not in firsts:
            continue
        on_message = on_messages[bisect.bisect_right(on_message_begins, start_span[1]) - 1]
        taking, starting = window(on_message), window(start_span)
        begin = firsts[("jobprocess.offer", job_id)]
        own_start, own_main, own_ready = process(begin[3], begin[1])
        # Jobs.start: _begin tells the process offered the job to go (offering it to one started
        # now only if that one is gone), then Jobs.warm_up forks the slot's next process while the job runs.
        handing = next((s for s in starting if s[0] == "jobs._begin"), None)
        offering = next((s for s in taking if s[0] == "jobs.offer"), None)
        cold = [s for s in window(offering) + window(handing) if s[0] == "jobprocess.start"] \
            if offering and handing else []
        warm = next((s for s in starting if s[0] == "jobs.warm_up" and handing and s[1] >= handing[2]), None)
        next_start = next((s for s in window(warm) if s[0] == "jobprocess.start"), None) if warm else None
        next_begin = handed.get(next_start[3]["request"]) if next_start else None
        if next_begin is not None and next_begin[1] < next_start[2]:
            next_begin = None
        _, next_main, next_ready = process(next_start[3], next_begin[1] if next_begin else float("inf")) \
            if next_start else (None, None, None)
        end_span = firsts[("jobs._end", job_id)]
        ending = window(end_span)
        # The tail: the message's end, then _resume_consuming, whose Jobs.warm_up comes first and
        # normally finds the slot's next process waiting; a message delivered with the consume is
        # taken after it, inside the same call, so the tail ends at the consume_ok.
        finish = first_after(end_span[2], "jobs.finish")
        resume = first_after(finish[2], "worker._resume_consuming") if finish else None
        resuming = window(resume) if resume else []
        consume = next((s for s in resuming if s[0] == "broker.consume"), None)
        idle = consume[2] if consume else None
        tail_warm = next((s for s in resuming if s[0] == "jobs.warm_up"), None)
        if tail_warm and consume and tail_warm[1] > consume[1]:
            tail_warm = None  # the next job's, in its Jobs.start
        exited, drained = firsts.get(("exited", job_id)), firsts.get(("drained", job_id))
        # The job's log is closed by the first LogKeeper.close_ended after its end: at the end of the
        # loop's turn, or while the broker confirms the copy of a job taken before then.
        log_closed = first_after(end_span[2], "logkeeper.close_ended")
        t = {
            "published": published.get(job_id),
            "on_message": on_message[1],
            "decode": _duration(taking, "decode"),
            "cancel": _duration(taking, "broker.cancel"),
            "hold": _duration(taking, "queues.hold"),
            "publish": _duration(taking, "broker.publish+confirm"),
            "ack": _duration(taking, "broker.ack"),
            "jobs.start": start_span[2] - start_span[1],
            "open_log": _duration(window(offering), "jobs._open_log") if offering else None,
            "_begin": _duration(starting, "jobs._begin"),
            "begin": begin[2] - begin[1],
            "go": _duration(starting, "jobprocess.go"),
            "go_at": next((s[1] for s in starting if s[0] == "jobprocess.go"), None),
            "cold_start": sum(s[2] - s[1] for s in cold) if cold else None,
            "start_end": start_span[2],
            "begin_at": begin[1],
            "on_message_end": on_message[2],
            "own_ready": own_ready,
            "own_main": own_main,
            "own_start_at": own_start[1] if own_start else None,
            "building_seen": _start(firsts.get(("event:status:Building", job_id))),
            "exec_seen": _start(firsts.get(("event:exec:", job_id))),
            "result_seen": _start(firsts.get(("event:result:", job_id))),
            "exit_seen": exited[2] if exited else None,
            "drained_at": drained[2] if drained else None,
            "end_at": end_span[1],
            "_end": end_span[2] - end_span[1],
            "close": _duration(ending, "jobprocess.close"),
            "forget": _duration(ending, "guard.forget"),
            "report": _duration(ending, "reporter.report"),
            "log_closed": (log_closed[2] - log_closed[1]) if log_closed else None,
            "finish": (finish[2] - finish[1]) if finish else None,
            "purge": _duration(window(finish), "broker.purge") if finish else None,
            "warm_up": (warm[2] - warm[1]) if warm else None,
            "next_start": (next_start[2] - next_start[1]) if next_start else None,
            "next_start_at": next_start[1] if next_start else None,
            "watch": _duration(window(warm), "guard.watch") if warm else None,
            "next_main": next_main,
            "next_ready": next_ready,
            "next_begin_at": next_begin[1] if next_begin else None,
            "resume": (idle if idle is not None else resume[2]) - resume[1] if resume else None,
            "tail_warm_up": (tail_warm[2] - tail_warm[1]) if tail_warm else None,
            "tail_forks": sum(1 for s in window(tail_warm) if s[0] == "jobprocess.start") if tail_warm else None,
            "consume": (consume[2] - consume[1]) if consume else None,
            "idle": idle,
        }
        if t["drained_at"] is not None and t["idle"] is not None:
            tail = window((None, t["drained_at"], t["idle"], None))
            t["tail_broker"] = _duration(tail, "broker.drain") + _duration(tail, "broker.heartbeat_check")
            t["tail_tick"] = _duration(tail, "liveness.tick")
            t["tail_select"] = _duration(tail, "select")
            parts = (t["_end"], t["finish"], t["resume"], t["tail_broker"], t["tail_tick"], t["tail_select"])
            t["tail_rest"] = None if None in parts else t["idle"] - t["drained_at"] - sum(parts)
        else:
            t["tail_broker"] = t["tail_tick"] = t["tail_select"] = t["tail_rest"] = None
        for kind in ("c_handed", "c_run", "c_ran", "c_become", "c_exit"):
            t[kind] = stamp(kind, job_id)
        t["r_start"], t["r_end"] = stamp("start", job_id), stamp("end", job_id)
        timelines[job_id] = t
    return timelines


def _duration(spans, name):
    return sum(s[2] - s[1] for s in spans if s[0] == name)


def _start(span):
    return None if span is None else span[1]


#: Steps of a job's life: (label, function of a timeline giving seconds, or None if unknown).
#: Indented lines are parts of the unindented line above them; lines in brackets overlap others.
STEPS = [
    ("publish -> worker's _on_message (broker delivery, select wake-up)",
     lambda t: _gap(t["published"], t["on_message"])),
    ("  decode the request", lambda t: t["decode"]),
    ("  basic.cancel of the consumers (round trip)", lambda t: t["cancel"]),
    ("  hold: in-progress copy, basic.publish + confirm (round trip, disk)", lambda t: t["hold"]),
    ("    of which JobProcess.offer (the job pickled down the pipe, while the broker confirms)",
     lambda t: t["begin"]),
    ("    of which JobProcess.start (no process was waiting)", lambda t: t["cold_start"]),
    ("    of which the job's log opened (file, first line, board)", lambda t: t["open_log"]),
    ("  basic.ack of the original", lambda t: t["ack"]),
    ("  Jobs.start: _begin (the process offered the job is told to go)", lambda t: t["_begin"]),
    ("    of which JobProcess.go", lambda t: t["go"]),
    ("  Jobs.start: pipes watched, first output read",
     lambda t: _less(t["jobs.start"], t["_begin"], t["warm_up"])),
    ("  Jobs.start: warm_up, the slot's next process (the job runs meanwhile)", lambda t: t["warm_up"]),
    ("    of which JobProcess.start (pipes, the fork server asked; its pid not waited for)",
     lambda t: t["next_start"]),
    ("    of which guard.watch", lambda t: t["watch"]),
    ("[its process waiting for its job -> JobProcess.offer; < 0: the job waited]",
     lambda t: _gap(t["own_ready"], t["begin_at"])),
    ("[next process: JobProcess.start called -> its main entered (the fork server's fork)]",
     lambda t: _gap(t["next_start_at"], t["next_main"])),
    ("[next process: main entered -> waiting for its job (setsid, output pipe, logging)]",
     lambda t: _gap(t["next_main"], t["next_ready"])),
    ("[next process: waiting -> the next job's JobProcess.offer; < 0: that job waited]",
     lambda t: _gap(t["next_ready"], t["next_begin_at"])),
    ("JobProcess.go called -> the process has its job and the word go (pipe)",
     lambda t: _gap(t["go_at"], t["c_handed"])),
    ("job: read -> _run entered (lease checked, lifeline thread started)", lambda t: _gap(t["c_handed"], t["c_run"])),
    ("job: _run entered -> runner's first line (set_status Building)", lambda t: _gap(t["c_run"], t["r_start"])),
    ("job: the runner itself", lambda t: _gap(t["r_start"], t["r_end"])),
    ("job: _run entered -> _run returned (whole run)", lambda t: _gap(t["c_run"], t["c_ran"])),
    ("job: flush, result sent, main returns", lambda t: _gap(t["c_ran"], t["c_exit"])),
    ("job: _run entered -> _become entered (Building sent, about to exec)", lambda t: _gap(t["c_run"], t["c_become"])),
    ("main returned -> worker notices the exit (os._exit, the fork server's reap and report, select)",
     lambda t: _gap(t["c_exit"], t["exit_seen"])),
    ("_become entered -> worker notices the exit (exec, the program, exit, the fork server's reap and report)",
     lambda t: _gap(t["c_become"], t["exit_seen"])),
    ("  [main returned / _become entered -> the worker's Jobs.start returned; > 0: still in it]",
     lambda t: _gap(t["c_exit"] or t["c_become"], t["start_end"])),
    ("  [the worker had the Building status, after _run entered]", lambda t: _gap(t["c_run"], t["building_seen"])),
    ("  [the worker had the result, after main returned]", lambda t: _gap(t["c_exit"], t["result_seen"])),
    ("  [the worker had the exec, after _become entered]", lambda t: _gap(t["c_become"], t["exec_seen"])),
    ("exit noticed -> output drained", lambda t: _gap(t["exit_seen"], t["drained_at"])),
    ("output drained -> consuming again (whole tail inside the worker)", lambda t: _gap(t["drained_at"], t["idle"])),
    ("  Jobs._end", lambda t: t["_end"]),
    ("    of which JobProcess.close (receive, close the pipes, any wait for the exit's report)",
     lambda t: t["close"]),
    ("    of which guard.forget (Ready.done)", lambda t: t["forget"]),
    ("    of which status reports (logging only, no [pybit])", lambda t: t["report"]),
    ("    [then, off the tail: its log closed (last line, metadata), at the turn's end or in the next hold]",
     lambda t: t["log_closed"]),
    ("  Jobs.finish", lambda t: t["finish"]),
    ("    of which queue.purge of the in-progress copy (sent without waiting)", lambda t: t["purge"]),
    ("  _resume_consuming, up to its consume_ok", lambda t: t["resume"]),
    ("    of which Jobs.warm_up (Ready.fill: the next process already waits)", lambda t: t["tail_warm_up"]),
    ("    of which basic.consume (round trip)", lambda t: t["consume"]),
    ("  broker.drain and heartbeat_check (no round trip)", lambda t: t["tail_broker"]),
    ("  Liveness.tick", lambda t: t["tail_tick"]),
    ("  select (a loop turn's wait, if the tail took more than one)", lambda t: t["tail_select"]),
    ("  the rest (the loop between the steps: _news, logging, hooks)", lambda t: t["tail_rest"]),
    ("worker's _on_message -> consuming again (whole cycle inside the worker)",
     lambda t: _gap(t["on_message"], t["idle"])),
    ("publish -> runner's first line (pickup latency)", lambda t: _gap(t["published"], t["r_start"])),
    ("publish -> _run entered (pickup latency, any runner)", lambda t: _gap(t["published"], t["c_run"])),
]


def _gap(a, b):
    return None if a is None or b is None else b - a


def _less(whole, *parts):
    """*whole* less its *parts* (a part unknown counts as none: it did not happen)."""
    return whole - sum(part for part in parts if part is not None)


def print_steps(groups, timelines):
    labels = list(groups)
    width = max(len(label) for label, _ in STEPS)
    header = f"{'step (ms)':<{width}}" + "".join(f"  {label[:28]:>28}" for label in labels)
    print(header)
    print(f"{'':<{width}}" + "".join(f"  {'median / p90':>28}" for _ in labels))
    for label, step in STEPS:
        cells = []
        for group in labels:
            values = [step(timelines[j]) for j in groups[group] if j in timelines]
            values = [v * 1000 for v in values if v is not None]
            if not values:
                cells.append(f"  {'-':>28}")
            else:
                cells.append(f"  {statistics.median(values):>13.2f} / {percentile(values, 0.9):>10.2f}")
        print(f"{label:<{width}}" + "".join(cells))


def print_gaps(groups, timelines):
    """Between two jobs of a batch: consuming again -> the next _on_message; and whether each
    job found its process waiting."""
    for group, ids in groups.items():
        known = [timelines[j] for j in ids if j in timelines]
        cold = sum(1 for t in known if t["cold_start"] is not None)
        late = sum(1 for t in known if t["own_ready"] is not None and t["own_ready"] > t["begin_at"])
        forked = sum(1 for t in known if t["next_start"] is not None)
        tail = [t["tail_forks"] for t in known if t["tail_forks"] is not None]
        print(f"{group}: {len(known)} jobs timed; {cold} found no waiting process (started in Jobs.offer or _begin), "
              f"{late} found theirs not yet waiting (the job waited in the pipe); {forked} forked the slot's "
              f"next process in Jobs.start; the tail's Jobs.warm_up started {sum(tail)} in {len(tail)} tails "
              f"(it starts one only in place of one that died waiting)")
        if "batch" not in group:
            continue
        pairs = [(timelines[a], timelines[b]) for a, b in itertools.pairwise(ids) if a in timelines and b in timelines]
        gaps = [(b["on_message"] - a["idle"]) * 1000 for a, b in pairs if a["idle"] is not None]
        cycle = [(b["on_message"] - a["on_message"]) * 1000 for a, b in pairs]
        if gaps and cycle:
            print(f"{group}: consuming again -> next _on_message median {statistics.median(gaps):.2f} ms; "
                  f"job-to-job cycle median {statistics.median(cycle):.2f} ms, p90 {percentile(cycle, 0.9):.2f} ms")


def call_counts(spans, label):
    """How often the worker's loop turned and _on_message ran, per job started."""
    counts = {}
    for span in spans:
        counts[span[0]] = counts.get(span[0], 0) + 1
    jobs = counts.get("jobs.start", 0) or 1
    return (f"{label}: per job started ({jobs}): {counts.get('worker._on_message', 0) / jobs:.1f} _on_message calls, "
            f"{counts.get('select', 0) / jobs:.1f} loop turns, "
            f"{counts.get('broker.cancel', 0) / jobs:.2f} cancels, {counts.get('broker.consume', 0) / jobs:.2f} consumes, "
            f"{counts.get('jobprocess.start', 0) / jobs:.2f} job processes started")


def print_cpu(cpu):
    for group, figures in cpu.items():
        parts = ", ".join(f"{who} {value:.2f}" for who, value in figures.items() if who != "wall")
        print(f"{group}: CPU ms per job: {parts}; wall {figures['wall']:.2f} ms per job")


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=int, default=100, help="idle-worker jobs (default 100)")
    parser.add_argument("--batch", type=int, default=300, help="jobs per pre-loaded batch (default 300)")
    args = parser.parse_args(argv)
    log = lambda text: print(text, file=sys.stderr, flush=True)

    groups, timelines, cpu, rates, counts = {}, {}, {}, {}, []
    bench = ProfileBench({}, log=log)
    try:
        log("five served queues, as bench.py runs the worker ...")
        bench.profile(args.latency, args.batch)
        bench.worker.stop()
        spans = load_spans(bench.trace)
    finally:
        bench.cleanup()
    groups.update(bench.groups)
    counts.append(call_counts(spans, "5 queues (whole run)"))
    timelines.update(job_timelines(spans, bench.stamps.events, bench.published))
    cpu.update(bench.cpu)
    for number, kind in enumerate(("noop", "shell"), 1):
        single = SingleQueueProfile(kind, log, first_id=number * 10**6)
        try:
            log(f"one served queue ({kind}) ...")
            rate = single.profile(args.batch)
            single.worker.stop()
            spans = load_spans(single.trace)
        finally:
            single.cleanup()
        groups.update(single.groups)
        counts.append(call_counts(spans, f"1 queue, {kind}"))
        timelines.update(job_timelines(spans, single.stamps.events, {}))
        cpu.update(single.cpu)
        rates.update({label: rate for label in single.groups})
    print_steps(groups, timelines)
    print()
    print_gaps(groups, timelines)
    print_cpu(cpu)
    for line in counts:
        print(line)
    for label, rate in rates.items():
        print(f"{label}: {rate:.1f} jobs/s marker to marker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
