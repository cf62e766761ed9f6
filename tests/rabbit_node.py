"""A private RabbitMQ node for tests that stop, restart or reconfigure a broker.

The shared broker on port 5672 serves every engineer's tests at once, so no
test may stop it or change its settings. A :class:`RabbitNode` is a broker of
the test's own: its own Erlang node name, AMQP and distribution ports, data,
log and pid files and Erlang cookie, all under one temporary directory that
:meth:`RabbitNode.stop` removes. Nothing is read from ``/etc/rabbitmq``.

Typical use, in a module-scoped fixture::

    with RabbitNode() as node:
        vhost = node.vhost()                  # a tests.broker.Vhost-like helper
        write_config(..., vhost=vhost, amqp=node.amqp_settings())
        node.stop_app(); node.start_app()
        node.eval("application:get_env(rabbit, consumer_timeout).")

More ``rabbitmq.conf`` lines (a TLS listener, say) go in *extra_conf*; the
``listeners`` argument replaces the default plain listener on 127.0.0.1.
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from .broker import Vhost
from .harness import free_port

#: Where rabbitmq-server and rabbitmqctl are looked for, first match wins. Debian's
#: /usr/sbin ones are wrappers that switch to the rabbitmq user (who cannot read a
#: root-owned temporary directory), so the real scripts beside them come first.
SCRIPT_DIRS = (
    os.environ.get("RBIT_TEST_RABBITMQ_BIN", ""),
    "/usr/lib/rabbitmq/bin",
    "/usr/local/lib/rabbitmq/bin",
    "/opt/rabbitmq/sbin",
)

#: Seconds a node gets to boot (a cold Erlang VM takes 3 to 10 s).
START_TIMEOUT = 90.0

#: Seconds one rabbitmqctl call may take.
CTL_TIMEOUT = 60.0


def find_scripts():
    """(rabbitmq-server, rabbitmqctl) paths; the test FAILS (never skips) when they are missing."""
    candidates = [d for d in SCRIPT_DIRS if d]
    which = shutil.which("rabbitmq-server")
    if which:
        candidates.append(os.path.dirname(os.path.realpath(which)))
        candidates.append(os.path.dirname(which))
    for directory in candidates:
        server = Path(directory) / "rabbitmq-server"
        ctl = Path(directory) / "rabbitmqctl"
        if server.exists() and ctl.exists() and "wrapper" not in os.path.realpath(server):
            return str(server), str(ctl)
    pytest.fail(
        "RabbitMQ is not installed (no rabbitmq-server and rabbitmqctl found in "
        f"{', '.join(candidates) or 'PATH'}): the broker tests need it"
    )


class NodeVhost(Vhost):
    """tests.broker.Vhost for a virtual host of a private node."""

    def __init__(self, name, host, port):
        super().__init__(name)
        self.host = host
        self.port = port

    def url(self):
        return f"amqp://guest:guest@{self.host}:{self.port}/{quote(self.name, safe='')}"


class RabbitNode:
    """One private RabbitMQ node, started by :meth:`start` and removed by :meth:`stop`.

    *listeners* are ``HOST:PORT`` strings for ``listeners.tcp.N`` (default: the
    node's port on 127.0.0.1 only); *extra_conf* are more ``rabbitmq.conf``
    lines, written after rbit's own.
    """

    def __init__(self, *, port=None, host="127.0.0.1", listeners=None, extra_conf=(), name=None,
                 cookie=None, extra_env=None):
        self.server_script, self.ctl_script = find_scripts()
        #: The Erlang cookie (nodes of one cluster share theirs); a random one by default.
        self.cookie = cookie or secrets.token_hex(16).upper()
        self.extra_env = dict(extra_env or {})
        self.host = host
        self.port = port or free_port(host)
        self.dist_port = free_port()
        self.listeners = list(listeners) if listeners is not None else [f"{host}:{self.port}"]
        self.extra_conf = list(extra_conf)
        self.name = name or f"rbit-test-{uuid.uuid4().hex[:8]}@localhost"
        self.dir = Path(tempfile.mkdtemp(prefix="rbit-rabbit-"))
        self.process = None
        self._output = None

    # -- files -----------------------------------------------------------------

    def conf_lines(self):
        """The lines of this node's rabbitmq.conf; subclasses or *extra_conf* add more."""
        lines = [f"listeners.tcp.{n} = {listener}" for n, listener in enumerate(self.listeners, 1)]
        if not self.listeners:
            lines.append("listeners.tcp = none")
        lines += [
            "log.console = false",
            "log.file.level = info",
            # A test machine's disk may be nearly full: never block publishers for it.
            "disk_free_limit.absolute = 1MB",
        ]
        return lines + self.extra_conf

    def write_files(self):
        (self.dir / "rabbitmq.conf").write_text("\n".join(self.conf_lines()) + "\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("# this node reads no system-wide env file\n")
        cookie = self.dir / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)

    @property
    def env(self):
        """The environment of rabbitmq-server and of rabbitmqctl for this node."""
        env = {
            key: value for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_"))
        }
        env.update({
            # HOME holds the Erlang cookie that the server and the CLI share.
            "HOME": str(self.dir),
            "LC_ALL": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name,
            # The AMQP listeners are those of rabbitmq.conf (RABBITMQ_NODE_PORT would
            # override them); the distribution port must still be a free one.
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbit.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
        })
        env.update(self.extra_env)
        return env

    # -- running -----------------------------------------------------------------

    def start(self, timeout=START_TIMEOUT):
        """Boot the node and wait until it serves AMQP; fail the test with its log if it cannot."""
        self.write_files()
        self._output = open(self.dir / "server.out", "ab")
        self.process = subprocess.Popen(
            [self.server_script], env=self.env, cwd=str(self.dir),
            stdout=self._output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.await_startup(timeout)
        return self

    def await_startup(self, timeout=START_TIMEOUT):
        """Wait for ``rabbitmqctl await_startup`` (it fails at once while the node is not registered)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                pytest.fail(f"private RabbitMQ node {self.name} exited while starting:\n{self.log_tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"private RabbitMQ node {self.name} did not start in {timeout:g} s:\n{self.log_tail()}")
            result = self.ctl("await_startup", "--timeout", str(max(1, int(left))), check=False)
            if result.returncode == 0:
                return
            time.sleep(0.3)

    def ctl(self, *args, check=True, timeout=CTL_TIMEOUT):
        """Run ``rabbitmqctl -n NODE ARGS``; a failure fails the test when *check*."""
        result = subprocess.run(
            [self.ctl_script, "-q", "-n", self.name, *args], env=self.env, cwd=str(self.dir),
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            pytest.fail(f"rabbitmqctl -n {self.name} {' '.join(args)} failed ({result.returncode}):\n"
                        f"{result.stdout}{result.stderr}")
        return result

    def eval(self, expression):
        """Evaluate an Erlang expression on the node; its printed result."""
        return self.ctl("eval", expression).stdout.strip()

    def stop_app(self):
        """Stop RabbitMQ in the node (connections are closed, the port refuses); the VM stays."""
        self.ctl("stop_app")

    def start_app(self):
        self.ctl("start_app")
        self.ctl("await_startup", "--timeout", str(int(START_TIMEOUT)))

    def set_env(self, key, value):
        """``application:set_env(rabbit, KEY, VALUE)`` (VALUE in Erlang syntax); the old value."""
        old = self.eval(f"application:get_env(rabbit, {key}).")
        self.eval(f"application:set_env(rabbit, {key}, {value}).")
        return old

    def kill(self):
        """Kill the node at once, as a power cut would (SIGKILL), keeping its data for :meth:`start`."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)
        self._kill_leftover_vm()
        if self._output is not None:
            self._output.close()
            self._output = None

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def shutdown(self, timeout=60):
        """Stop the node cleanly (``rabbitmqctl stop``), keeping its data for :meth:`start`."""
        if self.running:
            self.ctl("stop", check=False, timeout=timeout)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._output is not None:
            self._output.close()
            self._output = None

    def stop(self):
        """Stop the node (kill it if it does not stop) and remove its directory."""
        try:
            if self.process is not None and self.process.poll() is None:
                self.ctl("stop", check=False, timeout=30)
                try:
                    self.process.wait(30)
                except subprocess.TimeoutExpired:
                    pass
            if self.process is not None and self.process.poll() is None:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(10)
            self._kill_leftover_vm()
        finally:
            if self._output is not None:
                self._output.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_leftover_vm(self):
        """The Erlang VM whose pid file is ours, if it outlived its script."""
        try:
            pid = int((self.dir / "rabbit.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                ours = f"RABBITMQ_NODENAME={self.name}".encode() in handle.read()
        except OSError:
            return
        if ours:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- what tests use ----------------------------------------------------------

    def amqp_settings(self, host=None):
        """``[amqp]`` overrides for tests.harness.write_config."""
        return {"host": host or self.host, "port": str(self.port)}

    def vhost(self, name="/"):
        """A Vhost helper on this node; a name other than ``/`` is created, with guest's permissions."""
        if name != "/":
            self.ctl("add_vhost", name)
            self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return NodeVhost(name, self.host, self.port)

    def reachable(self):
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def log_tail(self, chars=4000):
        text = ""
        for path in [self.dir / "server.out", *sorted((self.dir / "log").glob("*.log"))]:
            try:
                text += f"--- {path.name}\n" + path.read_text(errors="replace")[-chars:]
            except OSError:
                pass
        return text[-2 * chars:]

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()
