"""Job logs through the real worker: a file per job and attempt with all the
job wrote, nothing lost whatever the speed, logs that do not mix, retries, the cap, retention, a
full disk, and ``rbit logs [--follow]``.

Each test runs ``python -m rbit CONFIG`` on queues of its own; its job logs go to the test's own
directory (tests.harness sets XDG_STATE_HOME, so the default log_dir is there).
"""

import os
import re
import resource
import signal
import subprocess
import sys
import time

import pytest

from rbit import joblog, logdir
from rbit.capture import DRAIN_TIMEOUT

from .harness import WorkerProcess, job_log, wait_until, write_config
from .pybit_models import queue_name, request_body, routing_key
from .test_tools import rbit

#: How the worker imports the python! runners of these tests.
RUNNERS = "tests.joblog_runners"


class Rig:
    """A worker configuration serving one queue of this test's own."""

    def __init__(self, tmp_path, vhost, unique, runner, rbit_keys=None, **settings):
        self.tmp_path, self.vhost, self.unique = tmp_path, vhost, unique
        dist = f"j{unique}"
        self.queue, self.key = queue_name(dist, "any", "a", "pdf"), routing_key(dist, "any", "a", "pdf")
        self.dist = dist
        line = runner if "!" in runner else f"python!{RUNNERS}:{runner}"
        self.config = write_config(tmp_path / "rbit.ini", name=f"jl{unique}", vhost=vhost, rbit=rbit_keys,
                                   runners={self.queue: {"runner": line, "dir": str(tmp_path), **settings}})
        self.log_dir = tmp_path / "state" / "rbit" / "jobs"

    def worker(self, *args, **kwargs):
        return WorkerProcess(self.config, *args, **kwargs)

    def publish(self, job_id, **fields):
        self.vhost.publish_build(request_body(job_id, dist=self.dist, arch="any", suite="a", fmt="pdf", **fields),
                                 self.key)

    def log(self, job_id, attempt=None):
        return job_log(self.config, job_id, attempt)

    def log_so_far(self, job_id):
        """The job's newest log as it stands ("" while there is none)."""
        path = logdir.attempt_path(self.log_dir, job_id)
        return path.read_text(errors="replace") if path else ""

    def meta(self, job_id, attempt=None):
        return logdir.read_meta(logdir.attempt_path(self.log_dir, job_id, attempt))


def body_lines(text):
    """The lines a job wrote: its log without rbit's first and last lines."""
    lines = text.splitlines()
    assert lines[0].startswith("rbit: job ") and lines[-1].startswith("rbit: job "), (lines[:1], lines[-1:])
    return lines[1:-1]


def test_python_runner_output_goes_to_a_log_of_its_own(tmp_path, vhost, unique):
    """A log file per job: a python! runner's stdout, stderr, log records and the output of the
    programs it starts, down to a grandchild, are in LOG_DIR/JOB/1.log; the worker's log keeps
    the job's start and end lines and none of its output."""
    rig = Rig(tmp_path, vhost, unique, "chatty")
    with rig.worker() as worker:
        worker.wait_ready()
        rig.publish(601, package="chat", version="1.0")
        worker.wait_log(r"job 601: chat 1\.0 from \S+ ended Done")
    text = rig.log(601)
    assert re.match(rf"rbit: job 601: chat 1\.0 from {rig.queue}, attempt 1, worker jl{unique}, ", text)
    for line in ("print to stdout", "write to stderr", "a child on stdout", "a child on stderr",
                 "a grandchild", "os.write to fd 1"):
        assert f"job 601: {line}\n" in text, text
    assert re.search(r"^\S+ \S+ INFO tests\.joblog_runners: job 601: a log record$", text, re.M)
    assert text.endswith("rbit: job 601 ended Done in " + text.rsplit(" in ", 1)[1])
    assert "job 601: print" not in worker.log and "a grandchild" not in worker.log
    assert re.search(r"job 601: starting chat 1\.0", worker.log)
    meta = rig.meta(601)
    assert (meta["job"], meta["attempt"], meta["outcome"], meta["worker"]) == (601, 1, "Done", f"jl{unique}")


def test_shell_runner_output_and_its_grandchilds_go_to_its_log(tmp_path, vhost, unique):
    """A log file per job for a shell! runner: the program's stdout and stderr and a grandchild's."""
    line = ("shell!/bin/sh -c 'echo \"out of $RBIT_ID\"; echo \"err of $RBIT_ID\" >&2; "
            "/bin/sh -c \"/bin/sh -c '\\''echo grandchild of $RBIT_ID'\\''\"'")
    rig = Rig(tmp_path, vhost, unique, line)
    with rig.worker() as worker:
        worker.wait_ready()
        rig.publish(611)
        worker.wait_log(r"job 611: .* ended Done")
    assert body_lines(rig.log(611)) == ["out of 611", "err of 611", "grandchild of 611"]
    assert "out of 611" not in worker.log


def test_numbered_lines_at_full_speed_none_missing(tmp_path, vhost, unique):
    """Nothing lost: jobs that write 200,000 numbered lines as fast as they can, from Python and
    from a child program, and end at once, have every number in their logs, in order."""
    rig = Rig(tmp_path, vhost, unique, "numbers")
    jobs = range(621, 627)
    with rig.worker() as worker:
        worker.wait_ready()
        for job_id in jobs:
            rig.publish(job_id)
        worker.wait_log(r"job \d+: .* ended Done", count=len(jobs), timeout=120)
    expected = [f"py {n}" for n in range(1, 200001)] + [str(n) for n in range(1, 200001)]
    for job_id in jobs:
        assert body_lines(rig.log(job_id)) == expected, job_id


def test_lines_written_before_the_group_ends_are_kept_though_a_process_holds_the_pipe(tmp_path, vhost, unique):
    """Nothing lost: a background process that wrote 300,000 lines and still holds the output pipe
    when the program exits is killed with the job's group; every line it wrote is in the log."""
    done = tmp_path / "written"
    line = (f"shell!/bin/sh -c '(seq 1 300000; touch {done}; sleep 60) & "
            f"while [ ! -e {done} ]; do sleep 0.02; done; exit 0'")
    rig = Rig(tmp_path, vhost, unique, line)
    with rig.worker() as worker:
        worker.wait_ready()
        rig.publish(631)
        worker.wait_log(r"job 631: .* ended Done", timeout=60)
    assert body_lines(rig.log(631)) == [str(n) for n in range(1, 300001)]


def test_a_process_that_left_the_group_does_not_hold_the_job(tmp_path, vhost, unique):
    """A program that starts a process in a session of its own (a daemon) holding the output pipe:
    the job ends when its own group is gone, with all the group wrote."""
    sleep = f"sleep 50.{int(unique, 16) % 99991}"  # a command line no other process has
    line = f"shell!/bin/sh -c 'setsid {sleep} & seq 1 1000; exit 0'"
    rig = Rig(tmp_path, vhost, unique, line)
    try:
        with rig.worker() as worker:
            worker.wait_ready()
            rig.publish(641)
            match = worker.wait_log(r"job 641: .* ended Done in ([0-9.]+) s", timeout=30)
        assert float(match.group(1)) < DRAIN_TIMEOUT
        assert body_lines(rig.log(641)) == [str(n) for n in range(1, 1001)]
    finally:
        for pid in pids_running(sleep):
            os.kill(pid, signal.SIGKILL)


def pids_running(command):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if handle.read().replace(b"\0", b" ").decode(errors="replace").startswith(command):
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_two_concurrent_jobs_logs_do_not_mix(tmp_path, vhost, unique):
    """Two jobs writing at once (concurrency 2): each log holds its own job's lines, all of them,
    and none of the other's."""
    rig = Rig(tmp_path, vhost, unique, "tagged", rbit_keys={"concurrency": "2"}, count="30000")
    with rig.worker() as worker:
        worker.wait_ready()
        rig.publish(651)
        rig.publish(652)
        assert wait_until(lambda: all((tmp_path / f"started-{j}").exists() for j in (651, 652)), 30), worker.log
        (tmp_path / "go").touch()
        worker.wait_log(r"job \d+: .* ended Done", count=2, timeout=60)
    for job_id in (651, 652):
        assert body_lines(rig.log(job_id)) == [f"job {job_id} line {n}" for n in range(30000)]


def test_a_retry_keeps_both_attempts(tmp_path, vhost, unique):
    """Each attempt of a job is kept: a Blocked first attempt is 1.log, its retry 2.log, which is
    the job's log (`rbit logs CONFIG JOB`); `--attempt 1` shows the first."""
    rig = Rig(tmp_path, vhost, unique, "blocked_once", rbit_keys={"blocked_delay": "1"})
    with rig.worker() as worker:
        worker.wait_ready()
        rig.publish(661)
        worker.wait_log(r"job 661: .* ended Blocked")
        worker.wait_log(r"job 661: .* ended Done", timeout=30)
    first, second = rig.log(661, 1), rig.log(661)
    assert "first attempt: the build dependencies are missing" in first
    assert "ended Blocked in" in first and ", attempt 1, " in first
    assert "second attempt: building" in second and ", attempt 2, " in second
    assert rig.meta(661, 1)["outcome"] == "Blocked" and rig.meta(661)["outcome"] == "Done"
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    assert rbit("logs", rig.config, 661, env=env).stdout == second
    assert rbit("logs", rig.config, 661, "--attempt", 1, env=env).stdout == first
    missing = rbit("logs", rig.config, 662, env=env)
    assert missing.returncode == 1 and "no log of job 662 in " in missing.stderr


def test_the_cap_keeps_head_and_tail(tmp_path, vhost, unique):
    """log_max: a job that writes past it keeps the beginning and the end of its output, with a
    line saying how much was left out; the file stays within the cap."""
    rig = Rig(tmp_path, vhost, unique, "shell!seq 1 200000", rbit_keys={"log_max": "64K"})
    with rig.worker() as worker:
        worker.wait_ready()
        rig.publish(671)
        worker.wait_log(r"job 671: .* ended Done")
    path = logdir.attempt_path(rig.log_dir, 671)
    text = path.read_text()
    assert path.stat().st_size <= 64 * 1024 + joblog.MARKER_RESERVE
    head, marker, tail = re.split(r"\n(\[rbit: \d+ bytes left out here: [^\]]*\])\n", text)
    assert head.splitlines()[1:6] == ["1", "2", "3", "4", "5"]
    assert tail.splitlines()[-2] == "200000" and tail.splitlines()[-1].startswith("rbit: job 671 ended Done")
    left_out = int(re.search(r"\d+", marker).group())
    # (a newline before the marker is the head's own when it ended a line)
    assert rig.meta(671)["bytes"] - len(head) - len(tail) - left_out in (0, 1)


def test_old_logs_are_removed_at_start(tmp_path, vhost, unique):
    """log_keep: at start (and then hourly) the worker removes job logs older than log_keep days."""
    rig = Rig(tmp_path, vhost, unique, "shell!true", rbit_keys={"log_keep": "7"})
    old, recent = rig.log_dir / "5" / "1.log", rig.log_dir / "6" / "1.log"
    for path, age in ((old, 8), (recent, 6)):
        path.parent.mkdir(parents=True)
        path.write_text("an old build\n")
        when = time.time() - age * 86400
        os.utime(path, (when, when))
    with rig.worker() as worker:
        worker.wait_ready()
        worker.wait_log(r"removed 1 job log file\(s\) older than 7 days")
    assert not old.exists() and not old.parent.exists()
    assert recent.exists()


class LimitedWorker(WorkerProcess):
    """A worker whose files cannot grow past *limit* bytes (RLIMIT_FSIZE): a full disk, for its logs."""

    def __init__(self, config, limit, **kwargs):
        super().__init__(config, **kwargs)
        self.limit = limit

    def start(self):
        self._log = open(self.log_path, "ab")
        limit = self.limit
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rbit", str(self.config_path)], stdout=self._log, stderr=subprocess.STDOUT,
            env=self.env, cwd=str(self.config_path.parent),
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
        return self


def test_a_full_disk_never_fails_a_job_or_stops_the_worker(tmp_path, vhost, unique):
    """A log that cannot be written (its file cannot grow: EFBIG, as ENOSPC) loses output, not the
    job: the job ends Done, the log says how much was lost, the worker warns once and goes on."""
    rig = Rig(tmp_path, vhost, unique, "shell!seq 1 100000")  # 588,895 bytes
    worker = LimitedWorker(rig.config, 256 * 1024)
    with worker:
        worker.wait_ready()
        rig.publish(681)
        worker.wait_log(r"job 681: .* ended Done")
        rig.publish(682)
        worker.wait_log(r"job 682: .* ended Done")
        assert worker.process.poll() is None
    assert worker.log.count("cannot write its log") == 2  # once a job
    for job_id in (681, 682):
        text = rig.log(job_id)
        assert text.startswith(f"rbit: job {job_id}: ") and "\n1\n2\n3\n" in text
        lost = rig.meta(job_id)["lost"]
        assert lost > 588_895 - 256 * 1024
        assert re.search(r"\[rbit: \d+ bytes of output lost here: File too large\]\n$", text), text[-300:]


def test_log_echo_copies_the_output_to_the_workers_log(tmp_path, vhost, unique):
    """[rbit] log_echo = true: the job's output also goes to the worker's log, line by line, with
    the job's id and queue."""
    rig = Rig(tmp_path, vhost, unique, "shell!/bin/echo hello from the build", rbit_keys={"log_echo": "true"})
    with rig.worker() as worker:
        worker.wait_ready()
        rig.publish(691)
        worker.wait_log(r"job 691: .* ended Done")
    assert re.search(rf"INFO rbit\.output: job 691 \({rig.queue}\): hello from the build$", worker.log, re.M)
    assert "hello from the build" in rig.log(691)


def read_until(stream, needle, timeout=20):
    """What *stream* (a binary pipe) gives until *needle* appears in it."""
    os.set_blocking(stream.fileno(), False)
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        assert time.monotonic() < deadline, f"{needle!r} not in {seen[-2000:]!r}"
        chunk = stream.read()
        if chunk:
            seen += chunk
        else:
            time.sleep(0.02)
    return seen


@pytest.mark.parametrize("source", ["file", "worker"])
def test_rbit_logs_follow_prints_each_new_line_until_the_job_ends(tmp_path, vhost, unique, source):
    """`rbit logs CONFIG JOB --follow` prints what is there, then each new line as the job writes
    it, and exits 0 when the job ends: from the log file, or, when the file is not there
    (another log_dir), from the running worker's [rbit] http."""
    from .test_metrics import free_port

    port = free_port()
    rig = Rig(tmp_path, vhost, unique, "gated", rbit_keys={"http": f"127.0.0.1:{port}"})
    config = rig.config
    if source == "worker":
        config = tmp_path / "elsewhere.ini"
        config.write_text(rig.config.read_text().replace("[rbit]\n", f"[rbit]\nlog_dir = {tmp_path / 'none'}\n"))
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    with rig.worker() as worker:
        worker.wait_ready()
        rig.publish(701)
        worker.wait_log(r"job 701: starting")
        assert wait_until(lambda: logdir.attempt_path(rig.log_dir, 701) is not None)
        follow = subprocess.Popen([sys.executable, "-m", "rbit", "logs", str(config), "701", "--follow"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            seen = read_until(follow.stdout, b"job 701 is waiting\n")
            assert seen.startswith(b"rbit: job 701: ")
            for n in (1, 2, 3):
                (tmp_path / f"go-{n}").touch()
                seen += read_until(follow.stdout, f"line {n} of job 701\n".encode())
            assert follow.poll() is None
            (tmp_path / "end").touch()
            assert follow.wait(30) == 0, follow.stderr.read()
            seen += follow.stdout.read() or b""
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait()
    assert seen.decode() == rig.log(701)
    assert re.search(r"rbit: job 701 ended Done in [0-9.]+ s\n$", seen.decode())


def test_under_systemd_the_logs_go_to_the_logs_directory(tmp_path, vhost, unique):
    """The default log_dir under systemd (LogsDirectory=rbit sets $LOGS_DIRECTORY): $LOGS_DIRECTORY/jobs."""
    rig = Rig(tmp_path, vhost, unique, "shell!/bin/echo hello")
    logs = tmp_path / "var-log-rbit"
    with rig.worker(env={"LOGS_DIRECTORY": str(logs)}) as worker:
        worker.wait_ready()
        rig.publish(711)
        worker.wait_log(r"job 711: .* ended Done")
    assert body_lines((logs / "jobs" / "711" / "1.log").read_text()) == ["hello"]


def test_a_run_after_a_crash_is_a_new_attempt_and_the_first_is_kept(tmp_path, vhost, unique):
    """Each attempt is kept: a worker killed with SIGKILL mid-job leaves attempt 1 (its .json has no
    outcome); the worker started again runs the job as attempt 2, the job's log."""
    rig = Rig(tmp_path, vhost, unique, "gated")
    worker = rig.worker().start()
    try:
        worker.wait_ready()
        rig.publish(721)
        assert wait_until(lambda: "job 721 is waiting" in rig.log_so_far(721), 30), worker.log
        worker.process.kill()
        worker.wait(10)
    finally:
        worker.stop()
    (tmp_path / "end").touch()
    with rig.worker(log_path=tmp_path / "again.log") as again:
        again.wait_log(r"job 721: .* ended Done", timeout=60)
    first, second = rig.log(721, 1), rig.log(721)
    assert ", attempt 1, " in first and "job 721 is waiting" in first and "ended" not in first
    assert "outcome" not in rig.meta(721, 1)
    assert ", attempt 2, " in second and rig.meta(721)["outcome"] == "Done"
