"""Where does an rbit job's time go? A step-by-step timeline of real jobs, in milliseconds.

Usage::

    python bench/profile_worker.py [--latency N] [--batch N]

Runs the same set-up as bench/bench.py (own vhost, concurrency 1, a real
worker subprocess), but the worker is started through ``serve`` below, which
wraps its steps with bench/profile_hooks.py before serving; the fork server and
the job processes send their own timestamps. All clocks are ``time.time()`` on
this machine. Then it prints, for idle-worker jobs (published one at a time)
and for pre-loaded no-op python and ``shell!/bin/true`` batches, the median and
90th percentile of each step of a job's life, plus the CPU that the worker, the
fork server and the broker (beam.smp) spent per job.
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

from bench import Bench, WorkerUnderTest, cpu_ticks, helper_pids, percentile


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

    fixes = ""

    QUEUES: ClassVar[dict] = {kind: (key, line.replace("python!runners:", "python!profile_hooks:"))
              for kind, (key, line) in Bench.QUEUES.items()}

    def make_worker(self, config):
        self.trace = self.tmp / "spans.jsonl"
        return WorkerUnderTest(
            config, self.tmp / "worker.log",
            # -c, not this script's path: job processes must not import this
            # script again (rbit.jobs now keeps any main from being re-run too).
            command=[sys.executable, "-c", "import sys, profile_worker; sys.exit(profile_worker.serve(*sys.argv[1:]))",
                     str(config), str(self.trace)],
            env={"RBIT_BENCH_REPORT_TO": self.stamps.address, "RBIT_BENCH_FIX": self.fixes},
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
            # The job processes are the fork server's children, reaped by it: their CPU is its children's.
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
        self.forkserver, _ = helper_pids(self.worker.pid)
        before, t0 = self.cpu_snapshot(), time.monotonic()
        t_end = self.broker.wait_marker(end, 180)
        after, wall = self.cpu_snapshot(), time.monotonic() - t0
        hz = os.sysconf("SC_CLK_TCK")
        label = f"1 queue, batch, {self.QUEUES[self.kind][1].replace('profile_hooks:', '')}"
        self.cpu = {label: {who: (after[who] - before[who]) / hz * 1000 / count for who in after}}
        self.cpu[label]["wall"] = wall * 1000 / count
        self.groups = {label: ids}
        self.published = {}
        return count / (t_end - t_begin)


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
    """{job id: {point or step name: value}} from the worker's spans and the jobs' stamps."""
    begins = [span[1] for span in spans]

    def window(t0, t1):
        """The spans that start and end within [t0, t1]."""
        low, high = bisect.bisect_left(begins, t0), bisect.bisect_right(begins, t1)
        return [s for s in spans[low:high] if s[2] <= t1]

    def first_after(t0, name, limit=2000):
        low = bisect.bisect_left(begins, t0)
        return next((s for s in spans[low:low + limit] if s[0] == name), None)

    by_name = {}
    for span in spans:
        if span[0] in ("worker._start", "worker._end"):
            by_name[(span[0], span[3])] = span
        elif span[0] == "worker._on_job_event":
            by_name[(span[0], span[3].rsplit(":", 1)[0] if ":result" in span[3] else span[3])] = span
    on_messages = [span for span in spans if span[0] == "worker._on_message"]
    on_message_begins = [span[1] for span in on_messages]
    timelines = {}
    for (name, job_id), start_span in list(by_name.items()):
        if name != "worker._start" or ("worker._end", job_id) not in by_name:
            continue
        on_message = on_messages[bisect.bisect_right(on_message_begins, start_span[1]) - 1]
        end_span = by_name[("worker._end", job_id)]
        inside = window(on_message[1], on_message[2])
        within_end = window(end_span[1], end_span[2])
        finish = first_after(end_span[2], "worker._finish_jobs")
        purge = first_after(end_span[2], "broker.purge")
        consume = first_after(end_span[2], "broker.consume")
        if consume is not None and consume[1] > finish[2] + 0.5:
            consume = None
        process_start = next(s for s in inside if s[0] == "jobprocess.start")
        building = by_name.get(("worker._on_job_event", f"{job_id}:status:Building"))
        result = by_name.get(("worker._on_job_event", f"{job_id}:result"))
        t = {
            "on_message": on_message[1],
            "decode": _duration(inside, "decode"),
            "cancel": _duration(inside, "broker.cancel"),
            "publish": _duration(inside, "broker.publish+confirm"),
            "ack": _duration(inside, "broker.ack"),
            "process.start": process_start[2] - process_start[1],
            "end_at": end_span[1],
            "_end": end_span[2] - end_span[1],
            "close": _duration(within_end, "jobprocess.close"),
            "report": _duration(within_end, "reporter.report"),
            "purge": purge[2] - purge[1],
            "consume": (consume[2] - consume[1]) if consume else 0.0,
            "idle": consume[2] if consume else finish[2],
            "process_start_at": process_start[1],
            "building_seen": building[1] if building else None,
            "result_seen": result[1] if result else None,
            "published": published.get(job_id),
        }
        for kind in ("c_enter", "c_captured", "c_run", "c_ran", "c_exit"):
            t[kind] = stamps.get((kind, job_id))
        t["r_start"], t["r_end"] = stamps.get(("start", job_id)), stamps.get(("end", job_id))
        timelines[job_id] = t
    return timelines


def _duration(spans, name):
    return sum(s[2] - s[1] for s in spans if s[0] == name)


#: Steps of a job's life: (label, function of a timeline giving seconds, or None if unknown).
STEPS = [
    ("publish -> worker's _on_message (broker delivery, select wake-up)",
     lambda t: _gap(t["published"], t["on_message"])),
    ("  decode the request", lambda t: t["decode"]),
    ("  basic.cancel of the consumers (round trip)", lambda t: t["cancel"]),
    ("  in-progress copy: basic.publish + confirm (round trip, disk)", lambda t: t["publish"]),
    ("  basic.ack of the original", lambda t: t["ack"]),
    ("  JobProcess.start in the worker (pipe, fork-server request, pickling)", lambda t: t["process.start"]),
    ("process start called -> child_main entered (fork + unpickle in the child)",
     lambda t: _gap(t["process_start_at"], t["c_enter"])),
    ("child: setsid, output onto the log pipe", lambda t: _gap(t["c_enter"], t["c_captured"])),
    ("child: lifeline thread, log handler, then _run entered", lambda t: _gap(t["c_captured"], t["c_run"])),
    ("child: is_cancelled + set_status(Building) -> runner starts", lambda t: _gap(t["c_run"], t["r_start"])),
    ("child: the runner itself", lambda t: _gap(t["r_start"], t["r_end"])),
    ("child: _run entered -> _run returned (whole run)", lambda t: _gap(t["c_run"], t["c_ran"])),
    ("child: flush, result sent, child_main returns", lambda t: _gap(t["c_ran"], t["c_exit"])),
    ("child_main returned -> worker notices the exit (teardown, fork-server SIGCHLD, sentinel)",
     lambda t: _gap(t["c_exit"], t["end_at"])),
    ("  (the worker had the Building status after child_main entered)", lambda t: _gap(t["c_enter"], t["building_seen"])),
    ("  (the worker had the result after child_main returned)", lambda t: _gap(t["c_exit"], t["result_seen"])),
    ("  worker._end (close: receive+join; report; log)", lambda t: t["_end"]),
    ("    of which JobProcess.close", lambda t: t["close"]),
    ("    of which status reports (logging only, no [pybit])", lambda t: t["report"]),
    ("  queue.purge of the in-progress copy (round trip)", lambda t: t["purge"]),
    ("  basic.consume again (round trip)", lambda t: t["consume"]),
    ("worker's _on_message -> consuming again (whole cycle inside the worker)",
     lambda t: t["idle"] - t["on_message"]),
    ("publish -> runner start (pickup latency)", lambda t: _gap(t["published"], t["r_start"])),
]


def _gap(a, b):
    return None if a is None or b is None else b - a


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
    """Between-job gap in batches: consume again -> next _on_message."""
    for group, ids in groups.items():
        if "batch" not in group:
            continue
        gaps = []
        for a, b in itertools.pairwise(ids):
            if a in timelines and b in timelines:
                gaps.append((timelines[b]["on_message"] - timelines[a]["idle"]) * 1000)
        cycle = [(timelines[b]["on_message"] - timelines[a]["on_message"]) * 1000
                 for a, b in itertools.pairwise(ids) if a in timelines and b in timelines]
        print(f"{group}: consume again -> next delivery median {statistics.median(gaps):.2f} ms; "
              f"job-to-job cycle median {statistics.median(cycle):.2f} ms, p90 {percentile(cycle, 0.9):.2f} ms")


def call_counts(spans, label):
    """How often the worker's loop turned and _on_message ran, per job started."""
    counts = {}
    for span in spans:
        counts[span[0]] = counts.get(span[0], 0) + 1
    jobs = counts.get("worker._start", 0) or 1
    return (f"{label}: per job started ({jobs}): {counts.get('worker._on_message', 0) / jobs:.1f} _on_message calls, "
            f"{counts.get('select', 0) / jobs:.1f} loop turns, "
            f"{counts.get('broker.cancel', 0) / jobs:.2f} cancels, {counts.get('broker.consume', 0) / jobs:.2f} consumes")


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
    parser.add_argument("--fix", default="", help="experimental fixes to emulate: purge-nowait "
                                                  "(see bench/profile_hooks.py)")
    args = parser.parse_args(argv)
    ProfileBench.fixes = args.fix
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
