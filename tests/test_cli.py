"""The command line: its options, exit statuses ("0 after a clean stop, 2 for a usage or
configuration error, 1 for anything else") and messages.

Checked twice where it matters: in-process with click's CliRunner on
``rbit.cli.main``, and as a real ``python -m rbit`` subprocess (and the ``rbit``
console script when it is installed).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from rbit.cli import load_config, main

from .harness import WorkerProcess, alive, environment, offline_config, write_config
from .pybit_models import request_body

#: The options `rbit --help` must list.
OPTIONS = ("--poll-time", "--daemon", "--pidfile", "--logfile", "--check", "--verbose")

#: A password that must never be shown.
SECRET = "pw-never-shown-4711"


#: The runner sections of the configurations that need no broker.
RUNNERS = {
    "cnx_any_latex_pdf": {"runner": "python!rbitext.hello:hello", "name": "World"},
    "cnx_any_html_pdf": {"runner": "shell!/bin/echo %PACKAGE", "timeout": "60"},
}


def broken_config(tmp_path):
    """A configuration whose [rbit] polling_time is not a number."""
    return offline_config(tmp_path / "rbit.ini", RUNNERS, rbit={"polling_time": "soon"}, amqp={"password": SECRET})


def python_m_rbit(*args, timeout=10, **env):
    """Run ``python -m rbit ARGS``; return the CompletedProcess (output as text)."""
    try:
        return subprocess.run([sys.executable, "-m", "rbit", *map(str, args)], capture_output=True,
                              text=True, timeout=timeout, env=environment(**env))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"python -m rbit {args} did not exit within {timeout} s: {exc.stderr!r}")


def invoke(*args, **env):
    return CliRunner().invoke(main, [str(arg) for arg in args], env=env or None)


# -- --help ------------------------------------------------------------------------


def test_help_lists_the_options_and_no_password():
    """`rbit --help` (CliRunner) exits 0, lists poll-time, daemon, pidfile, logfile,
    check and verbose, and shows no password, not even one set in the environment."""
    result = invoke("--help", RBIT_AMQP_PASSWORD=SECRET, RBIT_PYBIT_PASSWORD=SECRET)
    assert result.exit_code == 0, result.output
    for option in OPTIONS:
        assert option in result.output
    assert "CONFIG" in result.output
    assert SECRET not in result.output
    assert "guest" not in result.output


def test_python_m_rbit_help_lists_the_options_and_no_password():
    """`python -m rbit --help` does the same as the rbit command."""
    done = python_m_rbit("--help", RBIT_AMQP_PASSWORD=SECRET, RBIT_PYBIT_PASSWORD=SECRET)
    assert done.returncode == 0, done.stderr
    for option in OPTIONS:
        assert option in done.stdout
    assert SECRET not in done.stdout + done.stderr


def test_console_script_help():
    """The `rbit` console script installed beside this Python (the README's install) lists
    the same options."""
    script = shutil.which("rbit", path=str(Path(sys.executable).parent))
    assert script is not None, "no rbit console script beside this Python: install rbit with pip first"
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=10, env=environment())
    assert done.returncode == 0
    for option in OPTIONS:
        assert option in done.stdout


# -- --check ---------------------------------------------------------------------


def test_check_exits_0_and_lists_the_queues(tmp_path):
    """`rbit CONFIG --check` (CliRunner) exits 0 and lists each queue served with its routing
    key and runner, without connecting (the broker port is closed)."""
    path = offline_config(tmp_path / "rbit.ini", RUNNERS, amqp={"password": SECRET})
    result = invoke(path, "--check")
    assert result.exit_code == 0, result.output
    for queue, key in (("cnx_any_latex_pdf", "cnx.any.latex.pdf"), ("cnx_any_html_pdf", "cnx.any.html.pdf")):
        line = next(line for line in result.output.splitlines() if queue in line)
        assert key in line
    assert "rbitext.hello:hello" in result.output
    assert SECRET not in result.output


def test_python_m_rbit_check_exits_0_and_lists_the_queues(tmp_path):
    """`python -m rbit CONFIG --check` exits 0 at once and lists the queues."""
    path = offline_config(tmp_path / "rbit.ini", RUNNERS, amqp={"password": SECRET})
    done = python_m_rbit(path, "--check")
    assert done.returncode == 0, done.stderr
    assert "cnx_any_latex_pdf" in done.stdout and "cnx_any_html_pdf" in done.stdout
    assert SECRET not in done.stdout + done.stderr


def test_check_refuses_a_bad_configuration_with_status_2(tmp_path):
    """`--check` on a bad configuration exits 2 with one line and no traceback."""
    path = broken_config(tmp_path)
    result = invoke(path, "--check")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "polling_time" in lines[0] and "[rbit]" in lines[0]
    assert "Traceback" not in result.output


# -- exit statuses -------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    [],
    ["--no-such-option"],
    ["{config}", "--poll-time", "soon"],
    ["{config}", "--poll-time", "0"],
    ["{config}", "{config}"],
    ["{config}", "--umask", "999"],
], ids=["no-config", "unknown-option", "poll-time-not-a-number", "poll-time-zero", "extra-argument", "bad-umask"])
def test_usage_error_exits_2(tmp_path, args):
    """A usage error (CliRunner) exits 2 with click's usage message and no traceback."""
    path = offline_config(tmp_path / "rbit.ini", RUNNERS, amqp={"password": SECRET})
    result = invoke(*[arg.format(config=path) for arg in args])
    assert result.exit_code == 2, result.output
    assert "Usage" in result.output or "Error" in result.output
    assert "Traceback" not in result.output


def test_python_m_rbit_usage_error_exits_2(tmp_path):
    """`python -m rbit CONFIG --poll-time soon` exits 2 with the usage message."""
    done = python_m_rbit(offline_config(tmp_path / "rbit.ini", RUNNERS, amqp={"password": SECRET}),
                         "--poll-time", "soon")
    assert done.returncode == 2
    assert "--poll-time" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_config_error_exits_2_with_one_line(tmp_path):
    """A configuration error (CliRunner) exits 2 with one line naming file, section and key,
    and no traceback."""
    path = broken_config(tmp_path)
    result = invoke(path)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert str(path) in lines[0] and "[rbit]" in lines[0] and "polling_time" in lines[0]
    assert "Traceback" not in result.output
    assert SECRET not in result.output


def test_python_m_rbit_config_error_exits_2_with_one_line(tmp_path):
    """`python -m rbit BAD.ini` exits 2 at once with one line on stderr, no traceback."""
    path = broken_config(tmp_path)
    started = time.monotonic()
    done = python_m_rbit(path)
    assert done.returncode == 2
    assert time.monotonic() - started < 5
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, done.stdout + done.stderr
    assert str(path) in lines[0] and "[rbit]" in lines[0] and "polling_time" in lines[0]
    assert "Traceback" not in done.stderr


def test_poll_time_overrides_the_configuration(tmp_path):
    """--poll-time overrides [rbit] polling_time; without it the file's value holds."""
    path = offline_config(tmp_path / "rbit.ini", RUNNERS, rbit={"polling_time": "42"}, amqp={"password": SECRET})
    assert load_config(str(path)).worker.polling_time == 42
    assert load_config(str(path), 0.5).worker.polling_time == 0.5


# -- running and stopping --------------------------------------------------------------


def worker_config(tmp_path, vhost, unique, name=None):
    tmp_path.mkdir(exist_ok=True)
    return write_config(tmp_path / f"{name or 'w' + unique}.ini", name=name or f"w{unique}", vhost=vhost,
                        runners={f"t{unique}_any_a_pdf": {"runner": "python!rbitext.hello:hello"}})


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_clean_stop_exits_0(tmp_path, vhost, unique, signum):
    """`python -m rbit CONFIG` runs in the foreground until SIGTERM or Ctrl+C (SIGINT),
    then stops cleanly with exit status 0 and no traceback."""
    worker = WorkerProcess(worker_config(tmp_path, vhost, unique))
    try:
        worker.start()
        worker.wait_ready(timeout=20)
        assert worker.process.poll() is None
        worker.signal(signum)
        assert worker.wait(15) == 0, worker.log
    finally:
        worker.stop()
    assert "stopped" in worker.log
    assert "Traceback" not in worker.log


def test_other_failure_exits_1(tmp_path, vhost, unique):
    """A failure that is not a usage or configuration error exits 1 with a message: here a
    second worker with the same name on the same broker."""
    first = WorkerProcess(worker_config(tmp_path, vhost, unique, name=f"w{unique}"))
    second = WorkerProcess(worker_config(tmp_path / "second", vhost, unique, name=f"w{unique}"),
                           log_path=tmp_path / "second.log")
    try:
        first.start()
        first.wait_ready(timeout=20)
        second.start()
        assert second.wait(20) == 1, second.log
    finally:
        second.stop()
        first.stop()
    assert f"w{unique}" in second.log
    assert "Traceback" not in second.log


def test_logfile_option(tmp_path, vhost, unique):
    """--logfile sends the log to that file instead of standard error."""
    log_file = tmp_path / "worker.log"
    worker = WorkerProcess(worker_config(tmp_path, vhost, unique), "--logfile", str(log_file),
                           log_path=tmp_path / "stderr.log")
    try:
        worker.start()
        deadline = time.monotonic() + 20
        while "serving" not in (log_file.read_text() if log_file.exists() else ""):
            assert time.monotonic() < deadline and worker.process.poll() is None, worker.log
            time.sleep(0.05)
        worker.signal(signal.SIGTERM)
        assert worker.wait(15) == 0
    finally:
        worker.stop()
    assert "stopped" in log_file.read_text()
    assert "serving" not in worker.log


def test_verbose_and_quiet_options(tmp_path, vhost, unique):
    """-v logs debugging detail; -q logs warnings and errors only."""
    path = worker_config(tmp_path, vhost, unique)
    for flag, log_name in (("-v", "verbose.log"), ("-q", "quiet.log")):
        worker = WorkerProcess(path, flag, log_path=tmp_path / log_name)
        try:
            worker.start()
            if flag == "-v":
                worker.wait_ready(timeout=20)
            else:
                time.sleep(1.0)  # nothing to wait for: a quiet worker says nothing when ready
            worker.signal(signal.SIGTERM)
            assert worker.wait(15) == 0, worker.log
        finally:
            worker.stop()
        if flag == "-v":
            assert " DEBUG " in worker.log
        else:
            assert " INFO " not in worker.log and " DEBUG " not in worker.log


def test_daemon_with_pidfile(tmp_path, vhost, unique):
    """--daemon detaches (the command returns 0 at once), the pid file names the running
    daemon, which serves until SIGTERM and then removes its pid file."""
    path = worker_config(tmp_path, vhost, unique)
    pidfile = tmp_path / "rbit.pid"
    log_file = tmp_path / "daemon.log"
    done = python_m_rbit(path, "--daemon", "--pidfile", pidfile, "--logfile", log_file, timeout=15)
    assert done.returncode == 0, done.stderr
    pid = None
    try:
        deadline = time.monotonic() + 20
        while "serving" not in (log_file.read_text() if log_file.exists() else ""):
            assert time.monotonic() < deadline, log_file.read_text() if log_file.exists() else "no log"
            time.sleep(0.05)
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, 0)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pidfile.exists() or alive(pid):
            assert time.monotonic() < deadline, "the daemon did not stop"
            time.sleep(0.05)
        pid = None
    finally:
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert "stopped" in log_file.read_text()


def test_sigterm_lets_the_running_job_finish_then_exits_0(tmp_path, vhost, unique):
    """SIGTERM during a job: the worker takes no new job, lets the running one end (Done,
    its message acknowledged), then exits 0; the job published after the signal stays queued."""
    queue, key = f"t{unique}_any_a_pdf", f"t{unique}.any.a.pdf"
    release = tmp_path / "release"
    path = write_config(tmp_path / "rbit.ini", name=f"w{unique}", vhost=vhost, runners={queue: {
        "runner": "python!tests.test_worker:behave", "record": str(tmp_path / "record.jsonl"),
        "release": str(release)}})
    worker = WorkerProcess(path)
    try:
        worker.start()
        worker.wait_ready(timeout=20)
        vhost.publish_build(request_body(501, package="wait-x", dist=f"t{unique}", arch="any", suite="a",
                                         fmt="pdf"), key)
        worker.wait_log(r"job 501: starting", timeout=10)
        worker.signal(signal.SIGTERM)
        worker.wait_log(r"SIGTERM received", timeout=5)
        vhost.publish_build(request_body(502, dist=f"t{unique}", arch="any", suite="a", fmt="pdf"), key)
        release.touch()
        assert worker.wait(15) == 0, worker.log
    finally:
        release.touch()
        worker.stop()
    assert re.search(r"job 501: .* ended Done", worker.log)
    assert "job 502: starting" not in worker.log
    assert vhost.depth(queue) == 1
