"""Benchmark of a job's build log: 20 MB written as fast as a program can, through a real worker.

Usage::

    python bench/joblog_bench.py [--runs 5] [--mb 20] [--json]

One worker, started as an operator starts it (the ``rbit`` console script
beside this Python, ``rbit CONFIG``), in a throw-away vhost of the local
RabbitMQ, serves a ``shell!`` queue whose program writes MB megabytes of
numbered lines to its standard output, twice over: with ``cat`` of a
prepared file (large writes) and with ``seq`` (the lines made as it goes).

For each program it reports, as medians over RUNS jobs:

- the program's own wall time writing into the job's log (measured inside
  the job, around the program) against the same program writing to a file
  on the same disk (measured the same way, outside rbit): the ratio is
  rbit's cost to the build;
- the job's duration as the worker records it (start of the job's process
  to the end of its log) against a bare ``subprocess.run`` of the program
  with its output to a file;
- the worker's CPU time (utime + stime from ``/proc/PID/stat``) for the job,
  in milliseconds and as a share of the job's duration.

Every log is checked to hold all of the program's output.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rbit import logdir
from tests.broker import drop_vhost, make_vhost
from tests.harness import write_config
from tests.pybit_models import request_body

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: Wraps a program so that it stamps its own start and end (ns) into a file: ``sh -c WRAP sh OUT PROG ARGS``.
WRAP = 'out=$1; shift; s=$(date +%s%N); "$@"; e=$(date +%s%N); echo "$s $e" > "$out"'


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def stamped_seconds(path):
    start, end = map(int, Path(path).read_text().split())
    return (end - start) / 1e9


def baseline(argv, out_dir, runs):
    """(program's own time, whole subprocess time) writing to a file, medians."""
    own, whole = [], []
    for run in range(runs):
        target, stamp = out_dir / f"baseline-{run}.out", out_dir / f"baseline-{run}.stamp"
        started = time.perf_counter()
        with open(target, "wb") as handle:
            subprocess.run(["/bin/sh", "-c", WRAP, "sh", str(stamp), *argv], stdout=handle, check=True)
        whole.append(time.perf_counter() - started)
        own.append(stamped_seconds(stamp))
        target.unlink()
    return statistics.median(own), statistics.median(whole)


def make_lines(work, mb):
    """A file of MB megabytes of numbered lines; (its path, its size, a seq count writing about as much)."""
    lines = work / "lines.txt"
    size = mb << 20
    with open(lines, "wb") as handle:
        n = 0
        while handle.tell() < size:
            handle.write(b"".join(b"%d\n" % i for i in range(n + 1, n + 100_001)))
            n += 100_000
        handle.truncate(size)
    return lines, size, n


def start_worker(script, work, vhost, programs):
    """``rbit CONFIG`` serving one ``shell!`` queue per program; returns (process, its log file) once it serves."""
    runners = {f"bench_any_{name}_pdf": {"runner": "shell!/bin/sh -c '" + WRAP.replace("%", "%%") + "' sh "
                                         f"{work}/stamp-%ID {' '.join(argv)}"}
               for name, argv in programs.items()}
    config = write_config(work / "rbit.ini", name=f"bench-{vhost.name[-8:]}", vhost=vhost, runners=runners,
                          rbit={"log_dir": str(work / "logs"), "log_max": "1G"})
    log_file = open(work / "worker.log", "wb")  # noqa: SIM115 - closed by the caller with the worker
    worker = subprocess.Popen([script, str(config)], stdout=log_file, stderr=subprocess.STDOUT, cwd=str(work))
    deadline = time.monotonic() + 60
    while " serving " not in (work / "worker.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    return worker, log_file


def run_job(worker, work, vhost, name, job_id, expected):
    """One job of program *name*; (its own time in the job, the worker's recorded duration, worker CPU s)."""
    before = cpu_seconds(worker.pid)
    vhost.publish_build(request_body(job_id, dist="bench", arch="any", suite=name, fmt="pdf"),
                        f"bench.any.{name}.pdf")
    deadline = time.monotonic() + 120
    while True:
        path = logdir.attempt_path(work / "logs", job_id)
        meta = logdir.read_meta(path) if path else {}
        if "outcome" in meta or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert meta.get("outcome") == "Done", (meta, (work / "worker.log").read_text()[-2000:])
    cpu = cpu_seconds(worker.pid) - before
    text = path.read_bytes()
    output = text.split(b"\n", 1)[1].rsplit(b"rbit: job %d ended" % job_id, 1)[0]
    assert len(output) - expected in (0, 1), "a log is missing output"  # 1: a newline rbit added
    path.unlink()
    return stamped_seconds(work / f"stamp-{job_id}"), meta["duration"], cpu


def measure(mb=20, runs=5):
    """The figures of both programs (cat and seq), as a dict; see the module's docstring."""
    script = shutil.which("rbit", path=str(Path(sys.executable).parent))
    if script is None:
        sys.exit("no rbit console script beside this Python: pip install . first")
    work = Path(tempfile.mkdtemp(prefix="rbit-joblog-bench-"))
    lines, size, seq_count = make_lines(work, mb)
    seq_bytes = sum(len(b"%d\n" % i) for i in range(1, seq_count + 1))
    programs = {"cat": ["cat", str(lines)], "seq": ["seq", "1", str(seq_count)]}
    vhost = make_vhost()
    results = {"mb": mb, "runs": runs, "load_start": os.getloadavg()[0]}
    try:
        worker, log_file = start_worker(script, work, vhost, programs)
        try:
            job_id = 0
            for name, program in programs.items():
                expected = size if name == "cat" else seq_bytes
                own_file, whole_file = baseline(program, work, runs)
                jobs = []
                for _ in range(runs):
                    job_id += 1
                    jobs.append(run_job(worker, work, vhost, name, job_id, expected))
                own, whole, cpu = (statistics.median(column) for column in zip(*jobs))
                results[name] = {
                    "program_to_file_s": round(own_file, 4), "program_in_job_s": round(own, 4),
                    "ratio": round(own / own_file, 2),
                    "subprocess_to_file_s": round(whole_file, 4), "job_s": round(whole, 4),
                    "worker_cpu_ms": round(cpu * 1000, 1),
                    "worker_cpu_share": round(cpu / whole, 3),
                }
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
            log_file.close()
    finally:
        drop_vhost(vhost)
        shutil.rmtree(work, ignore_errors=True)
    results["load_end"] = os.getloadavg()[0]
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = measure(args.mb, args.runs)
    print(f"{args.mb} MB of output, median of {args.runs} jobs; load {results['load_start']:.2f} -> "
          f"{results['load_end']:.2f}")
    print(f"{'program':8} {'to a file':>10} {'in a job':>10} {'ratio':>6}   {'bare run':>9} {'job':>9}   "
          f"{'worker CPU':>10} {'share':>6}")
    for name in ("cat", "seq"):
        r = results[name]
        print(f"{name:8} {r['program_to_file_s'] * 1000:8.1f}ms {r['program_in_job_s'] * 1000:8.1f}ms "
              f"{r['ratio']:6.2f}   {r['subprocess_to_file_s'] * 1000:7.1f}ms {r['job_s'] * 1000:7.1f}ms   "
              f"{r['worker_cpu_ms']:8.1f}ms {r['worker_cpu_share'] * 100:5.1f}%")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
