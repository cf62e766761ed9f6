"""Test helpers: writing configurations, running the real ``rbit`` command, and waiting."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .broker import AMQP_HOST, AMQP_PORT

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout=10.0, interval=0.05, message=None):
    """Poll *predicate* until it is true; False if it never was within *timeout*.

    With *message*, a timeout raises ``AssertionError(message)`` instead of returning False.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            if message is not None:
                raise AssertionError(message)
            return False
        time.sleep(interval)


def free_port(host="127.0.0.1"):
    """A TCP port at *host* that nothing listens on right now: connecting to it is refused at
    once (a broker that is down), and a server of the test's own can bind it."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def environment(**extra):
    """The environment for an rbit subprocess: this one's, with the repository and ``tests/``
    on PYTHONPATH (so that runners defined in the tests import), then *extra*."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **extra}


def alive(pid):
    """True while process *pid* exists and is not a zombie (nothing here may reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def cmdline(pid):
    """The command line of process *pid*, its arguments joined by spaces; "" once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def write_config(path, *, name, vhost, runners, rbit=None, pybit=None, amqp=None, extra=""):
    """Write an rbit ini file; *runners* maps queue -> dict of the section's keys."""
    rbit = {"name": name, "polling_time": "60", "blocked_delay": "2",
            "rejected_queue": f"rbit.rejected.{name}", "shutdown_grace": "10", **(rbit or {})}
    amqp = {"host": AMQP_HOST, "port": str(AMQP_PORT), "user": "guest", "password": "guest",
            "virtual_host": vhost.name if vhost is not None else "/", **(amqp or {})}
    lines = ["[rbit]", *(f"{k} = {v}" for k, v in rbit.items()), "", "[amqp]",
             *(f"{k} = {v}" for k, v in amqp.items()), ""]
    if pybit is not None:
        lines += ["[pybit]", *(f"{k} = {v}" for k, v in pybit.items()), ""]
    for queue, keys in runners.items():
        lines += [f"[runner:{queue}]", *(f"{k} = {v}" for k, v in keys.items()), ""]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def offline_config(path, runners, *, name="offline", rbit=None, amqp=None, pybit=None, mode=0o600, extra=""):
    """A good configuration whose broker port nothing listens on: only what needs no broker works.

    The arguments are :func:`write_config`'s; *amqp* adds to (or overrides) the closed port, and
    the file gets *mode* (by default readable by its owner only, as a file holding a password is).
    """
    path = write_config(path, name=name, vhost=None, runners=runners, rbit=rbit, pybit=pybit, extra=extra,
                        amqp={"port": str(free_port()), **(amqp or {})})
    path.chmod(mode)
    return path


def job_log(config_path, job_id, attempt=None):
    """The text of a job's log (the newest attempt) as a WorkerProcess on *config_path* keeps it."""
    from rbit.logdir import attempt_path

    path = attempt_path(Path(config_path).parent / "state" / "rbit" / "jobs", job_id, attempt)
    assert path is not None, f"job {job_id} has no log"
    return path.read_text(errors="replace")


#: The ``rbit`` console script installed beside this Python, as the systemd unit runs it.
CONSOLE_SCRIPT = Path(sys.executable).parent / "rbit"


class WorkerProcess:
    """``python -m rbit CONFIG`` (or, with *console*, the ``rbit`` console script) in a
    subprocess, its output in a file the test can read."""

    def __init__(self, config_path, *args, env=None, log_path=None, console=False):
        self.config_path = Path(config_path)
        self.args = args
        self.command = [str(CONSOLE_SCRIPT)] if console else [sys.executable, "-m", "rbit"]
        self.log_path = Path(log_path or self.config_path.with_suffix(".log"))
        # Job logs go to this test's own directory (the default log_dir is under XDG_STATE_HOME).
        # A LOGS_DIRECTORY of the environment the tests run in is not the test's: only *env* sets it.
        self.env = environment(XDG_STATE_HOME=str(self.config_path.parent / "state"))
        self.env.pop("LOGS_DIRECTORY", None)
        self.env.update(env or {})
        self.process = None
        self._offset = 0

    def start(self):
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [*self.command, str(self.config_path), *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=str(self.config_path.parent),
        )
        return self

    @property
    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, pattern, timeout=30, count=1):
        """Wait until *pattern* (a regex) appears *count* times in the log; return the last match."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            matches = list(re.finditer(pattern, self.log))
            if len(matches) >= count:
                return matches[-1]
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not seen {count} time(s) in the worker's log:\n{self.log[-4000:]}")

    def wait_ready(self, timeout=30, count=1):
        return self.wait_log(r"serving .* as ", timeout, count)

    def signal(self, signum=signal.SIGTERM):
        self.process.send_signal(signum)

    def wait(self, timeout=60):
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process:
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
