"""Running rbit as a service: --daemon with a pid file, systemd's notify protocol, the unit
file in contrib/, and what SIGTERM does to each (the README's "As a systemd service" and "Signals").

The worker runs for real on the shared broker (this session's vhost) with a fake
PyBit; the broker itself is never stopped or reconfigured here.
"""

import configparser
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from rbit import statuses
from rbit.config import RBIT_DEFAULTS

from .harness import ROOT, alive, cmdline, environment, wait_until
from .test_reliability import rig  # noqa: F401  (a fixture)

UNIT_FILE = ROOT / "contrib" / "rbit.service"


# -- --daemon and --pidfile ------------------------------------------------------


class Daemon:
    """``python -m rbit CONFIG --daemon --pidfile P --logfile L``, and the pid it leaves."""

    def __init__(self, config, directory):
        self.config = config
        self.pidfile = directory / "rbit.pid"
        self.logfile = directory / "rbit-daemon.log"
        self.pids = set()

    def launch(self, timeout=20):
        """Run the command; (completed process, seconds it took)."""
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "rbit", str(self.config), "--daemon",
             "--pidfile", str(self.pidfile), "--logfile", str(self.logfile)],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
            env=environment(),
        )
        return result, time.monotonic() - started

    def pid(self, timeout=10):
        """The pid in the pid file, once it is there and names a running rbit of this config."""
        found = []

        def ready():
            try:
                pid = int(self.pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return False
            if alive(pid) and str(self.config) in cmdline(pid):
                found.append(pid)
                self.pids.add(pid)
                return True
            return False

        assert wait_until(ready, timeout), f"no running daemon in {self.pidfile}:\n{self.log}"
        return found[-1]

    @property
    def log(self):
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def wait_log(self, pattern, timeout=30):
        assert wait_until(lambda: re.search(pattern, self.log), timeout), (
            f"{pattern!r} not in the daemon's log:\n{self.log[-3000:]}")

    def kill_leftovers(self):
        """Stop every daemon this test started that is still running (only those)."""
        for pid in self.pids:
            if alive(pid) and str(self.config) in cmdline(pid):
                os.kill(pid, signal.SIGTERM)
                time.sleep(0.2)
                if alive(pid):
                    os.kill(pid, signal.SIGTERM)
                if not wait_until(lambda: not alive(pid), 15):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def daemon(rig):
    """A Daemon on a configuration serving one queue of this test's own with the ``ok`` runner."""
    queue = rig.queue()
    config = rig.config({queue: ("ok", {})})
    made = Daemon(config, rig.dir)
    made.queue = queue
    try:
        yield made
    finally:
        made.kill_leftovers()


def dead_pid():
    """The pid of a process that has just ended (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_daemon_detaches_holds_its_pid_file_serves_and_stops_on_sigterm(rig, daemon):
    """Without systemd, ``--daemon --pidfile P --logfile L`` detaches: it returns 0 at once; P
    holds the pid of the detached worker, which serves a job; SIGTERM stops it and the pid file
    goes away."""
    result, took = daemon.launch()
    assert result.returncode == 0, result
    assert took < 10, f"the command took {took:.1f} s to return"
    pid = daemon.pid()
    assert pid != os.getpid()
    assert os.getsid(pid) != os.getsid(0), "the daemon did not leave the caller's session"
    daemon.wait_log(r"serving .* as ")
    rig.publish(1, daemon.queue)
    rig.wait_status(1, statuses.DONE, timeout=20)
    assert rig.runs(n=1)
    os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not alive(pid), 15), f"the daemon did not stop:\n{daemon.log[-3000:]}"
    assert wait_until(lambda: not daemon.pidfile.exists(), 5), "the pid file is left behind"


def test_stale_pid_file_does_not_block_a_start(rig, daemon):
    """A pid file left by a dead process is removed: a pid file naming a process that is gone
    (left by a crash) does not stop the daemon from starting; the file then holds the new pid,
    and the daemon serves."""
    stale = dead_pid()
    daemon.pidfile.write_text(f"{stale}\n")
    result, _ = daemon.launch()
    assert result.returncode == 0, result
    pid = daemon.pid()
    assert pid != stale
    daemon.wait_log(r"serving .* as ")
    assert rig.vhost.queue_info(daemon.queue)[1] == 1, "the daemon does not consume its queue"
    os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not alive(pid), 15)
    assert wait_until(lambda: not daemon.pidfile.exists(), 5)


def test_pid_file_of_a_running_daemon_blocks_a_second_start(rig, daemon):
    """A pid file naming a live process stops the start, with exit status 1 (a failure that is
    not a usage or configuration error): a second ``--daemon`` with the pid file of a running
    daemon is refused with one message and status 1, and the first daemon keeps its pid file."""
    result, _ = daemon.launch()
    assert result.returncode == 0, result
    pid = daemon.pid()
    again, _ = daemon.launch()
    assert again.returncode == 1, again
    assert str(pid) in again.stderr and "Traceback" not in again.stderr, again.stderr
    assert daemon.pidfile.read_text().split()[0] == str(pid)
    assert alive(pid)


# -- systemd's notify protocol -------------------------------------------------------


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request):
    """An AF_UNIX datagram socket playing systemd; yields (socket, NOTIFY_SOCKET value)."""
    directory = tempfile.mkdtemp(prefix="rbit-notify-")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if request.param == "path":
            address = os.path.join(directory, "notify")
            sock.bind(address)
            value = address
        else:
            name = f"rbit-test-{os.getpid()}-{time.monotonic_ns()}"
            sock.bind("\0" + name)
            value = "@" + name
        yield sock, value
    finally:
        sock.close()
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


def receive(sock, timeout=30):
    sock.settimeout(timeout)
    try:
        return sock.recv(4096).decode()
    except socket.timeout:
        return None


def test_notify_socket_gets_ready_once_queues_are_served_and_stopping_on_sigterm(rig, notify_socket):
    """SIGTERM, contrib/rbit.service ``Type=notify``: with NOTIFY_SOCKET set (a path or an
    abstract ``@name``) the worker sends READY=1 once its queue has its consumer, and STOPPING=1
    when SIGTERM arrives; it then exits 0."""
    sock, address = notify_socket
    queue = rig.queue()
    rig.vhost.declare_build_queue(queue, rig.routing_key(queue))
    worker = rig.start(rig.config({queue: ("ok", {})}), env={"NOTIFY_SOCKET": address}, ready=False)
    ready = receive(sock)
    assert ready is not None, f"no READY=1 in 30 s:\n{worker.log[-3000:]}"
    assert "READY=1" in ready.splitlines(), ready
    info = rig.vhost.queue_info(queue)
    assert info is not None and info[1] == 1, f"READY=1 before the queue was served: {info}"
    worker.signal(signal.SIGTERM)
    stopping = receive(sock, timeout=10)
    assert stopping is not None and "STOPPING=1" in stopping.splitlines(), stopping
    assert worker.wait(20) == 0, worker.log[-3000:]


def test_notify_socket_gets_stopping_on_sigterm_during_a_job(rig, tmp_path):
    """SIGTERM with a grace period, contrib/rbit.service ``Type=notify``: STOPPING=1 is sent as
    soon as SIGTERM arrives, while the running job is still given its grace; the job then ends
    Done and the worker exits 0."""
    directory = tempfile.mkdtemp(prefix="rbit-notify-")
    address = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(address)
        queue = rig.queue()
        config = rig.config({queue: ("slow", {"seconds": "4"})}, rbit={"shutdown_grace": "30"})
        worker = rig.start(config, env={"NOTIFY_SOCKET": address})
        assert "READY=1" in (receive(sock) or "").splitlines()
        rig.publish(1, queue)
        rig.wait_runs(1, n=1)
        worker.signal(signal.SIGTERM)
        stopping = receive(sock, timeout=5)
        assert stopping is not None and "STOPPING=1" in stopping.splitlines(), stopping
        assert not rig.runs("end", 1), "STOPPING=1 came only after the job"
        assert worker.wait(30) == 0, worker.log[-3000:]
        rig.wait_status(1, statuses.DONE, timeout=10)
    finally:
        sock.close()
        if os.path.exists(address):
            os.unlink(address)
        os.rmdir(directory)


# -- contrib/rbit.service ----------------------------------------------------------------


def timespan_seconds(value):
    """A systemd time span (``330``, ``5min 30s``, ``infinity``) in seconds."""
    value = value.strip()
    if value == "infinity":
        return float("inf")
    units = {"": 1, "s": 1, "sec": 1, "second": 1, "seconds": 1, "ms": 0.001, "m": 60, "min": 60,
             "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        assert unit in units, f"unknown time unit {unit!r} in {value!r}"
        total += float(number) * units[unit]
    return total


def test_unit_file_suits_a_graceful_notify_service():
    """SIGTERM with a grace period, under systemd: contrib/rbit.service is Type=notify (rbit
    says READY=1), runs rbit in the foreground (no --daemon), KillMode=mixed (SIGTERM to rbit
    alone, so the build can finish), a TimeoutStopSec longer than the default shutdown_grace,
    and Restart=on-failure."""
    parser = configparser.RawConfigParser(strict=False, interpolation=None,
                                          comment_prefixes=("#", ";"), inline_comment_prefixes=None)
    parser.optionxform = str
    parser.read_string(UNIT_FILE.read_text())
    service = parser["Service"]
    assert service.get("Type") == "notify"
    assert service.get("KillMode") == "mixed"
    assert service.get("Restart") == "on-failure"
    assert service.get("KillSignal", "SIGTERM") == "SIGTERM"
    assert "TimeoutStopSec" in service, "no TimeoutStopSec: systemd's 90 s default cuts the grace short"
    assert timespan_seconds(service["TimeoutStopSec"]) > float(RBIT_DEFAULTS["shutdown_grace"])
    exec_start = service.get("ExecStart", "")
    assert "rbit" in exec_start
    assert not re.search(r"\s(--daemon|-d)(\s|$)", exec_start), "a Type=notify service must not fork"
    assert service.get("NotifyAccess", "main") in ("main", "exec", "all")
