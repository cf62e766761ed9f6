"""Reading the ini file into typed, validated settings, before any connection is made."""

import configparser
import ipaddress
import logging.config
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from . import joblog, runners
from .logdir import default_log_dir
from .errors import ConfigError
from .lease import MIN_RECLAIM_AFTER
from .passwords import PASSWORD_ENV
from .settings import check_known, parse_flag, parse_size

#: Keys of ``[rbit]`` and their defaults; ``None`` means required or unset.
RBIT_DEFAULTS = {
    "name": None,
    "polling_time": "60",
    "distribution": "",
    "architecture": "",
    "format": "",
    "suites": "",
    "blocked_delay": "60",
    "rejected_queue": "rbit.rejected",
    "concurrency": "1",
    "shutdown_grace": "300",
    "state_dir": "",
    "http": "",
    "log_dir": "",
    "log_max": "100M",
    "log_keep": "14",
    "log_echo": "false",
    "reclaim_after": "300",
}

#: Keys of ``[amqp]`` and their defaults.
AMQP_DEFAULTS = {
    "host": "localhost",
    "port": "5672",
    "user": "guest",
    "password": "guest",
    "password_file": "",
    "virtual_host": "/",
    "heartbeat": "60",
    "ssl": "false",
    "ca_file": "",
    "cert_file": "",
    "key_file": "",
    "verify": "true",
    "queue_type": "classic",
}

#: The values of ``[amqp] queue_type``: the type of the queues rbit declares for itself.
QUEUE_TYPES = ("classic", "quorum")

#: A host name rbit can put in a URL: letters, digits, dots, hyphens, underscores.
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?")

#: Keys of ``[pybit]`` and their defaults.
PYBIT_DEFAULTS = {
    "url": "",
    "user": "",
    "password": "",
    "password_file": "",
    "timeout": "10",
}

#: Keys of a ``[runner:QUEUE]`` section that rbit keeps; every other key goes to the runner.
RUNNER_OWN_KEYS = ("runner", "timeout", "routing_key")

#: RabbitMQ's well-known default password: no secret, so a readable file holding it is fine.
PUBLIC_PASSWORD = "guest"

RUNNER_PREFIX = "runner:"
LOGGING_SECTIONS = ("loggers", "handlers", "formatters")


@dataclass(frozen=True)
class WorkerSettings:
    """The ``[rbit]`` section: who this worker is and how it paces itself."""

    name: str
    polling_time: float = 60.0
    distribution: str = ""
    architecture: str = ""
    format: str = ""
    suites: tuple = ()
    blocked_delay: float = 60.0
    rejected_queue: str = "rbit.rejected"
    concurrency: int = 1
    shutdown_grace: float = 300.0
    state_dir: Path | None = None
    http: tuple | None = None
    #: Job logs (rbit.joblog): where (None: the default place), the cap in bytes, days kept,
    #: and whether their output is echoed to the worker's log too.
    log_dir: Path | None = None
    log_max: int = 100 << 20
    log_keep: float = 14.0
    log_echo: bool = False
    #: Seconds of silence after which a live peer puts this worker's jobs back (0: never).
    reclaim_after: float = 300.0


class Address(NamedTuple):
    """One broker node of ``[amqp] host``: its host (an IPv6 address without brackets) and port."""

    host: str
    port: int

    def __str__(self):
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class AmqpSettings:
    """The ``[amqp]`` section: where the broker is."""

    hosts: tuple = ("localhost",)
    port: int = 5672
    #: Every node of ``host`` with its own port (``port`` for those that give none), in order.
    addresses: tuple = (Address("localhost", 5672),)
    user: str = "guest"
    password: str = field(default="guest", repr=False)
    virtual_host: str = "/"
    heartbeat: float = 60.0
    ssl: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    #: ``classic`` or ``quorum``: the type of rbit's own queues (see :mod:`rbit.queues`).
    queue_type: str = "classic"


@dataclass(frozen=True)
class PybitSettings:
    """The ``[pybit]`` section: where statuses go."""

    url: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 10.0


@dataclass(frozen=True)
class RunnerSection:
    """One ``[runner:QUEUE]`` section: the queue served and the runner that does its jobs."""

    queue: str
    routing_key: str
    runner: object
    timeout: float | None = None
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """Everything the worker needs, parsed once and passed explicitly."""

    path: Path
    worker: WorkerSettings
    amqp: AmqpSettings
    pybit: PybitSettings | None
    runners: tuple
    parser: configparser.RawConfigParser = field(repr=False, compare=False)
    #: Things worth an operator's attention that do not stop the worker.
    warnings: tuple = ()

    @property
    def has_logging(self) -> bool:
        """True when the file carries ``logging.config.fileConfig`` sections."""
        return self.parser.has_section("loggers")

    def runner_for(self, queue: str) -> "RunnerSection":
        """The :class:`RunnerSection` serving *queue*."""
        for section in self.runners:
            if section.queue == queue:
                return section
        raise KeyError(queue)

    def configure_logging(self) -> None:
        """Apply the file's logging sections, when it has them."""
        if not self.has_logging:
            return
        try:
            logging.config.fileConfig(self.parser, disable_existing_loggers=False)
        except Exception as exc:  # fileConfig evaluates handler args: anything can go wrong
            raise ConfigError(
                f"bad logging configuration: {type(exc).__name__}: {exc}", self.path, "loggers"
            ) from exc


class _Section:
    """Typed reads of one section, each error naming file, section and key."""

    def __init__(self, path, parser, name, defaults=None):
        self.path = path
        self.name = name
        self.values = dict(parser.items(name)) if parser.has_section(name) else {}
        self.explicit = frozenset(self.values)
        if defaults is not None:
            self._check_known(defaults)
            self.values = {**defaults, **self.values}

    def _check_known(self, defaults):
        try:
            check_known(self.values, defaults)
        except ConfigError as exc:
            raise self.located(exc) from None

    def error(self, key, message):
        return ConfigError(message, self.path, self.name, key)

    def located(self, exc, key=None):
        """*exc*, a ConfigError naming at most a key, placed in this file and section."""
        return self.error(exc.key or key, exc.reason)

    def text(self, key, required=False):
        value = (self.values.get(key) or "").strip()
        if required and not value:
            raise self.error(key, "is required")
        return value

    def number(self, key, *, minimum=0.0, integer=False, allow_empty=False, unit="seconds"):
        raw = self.text(key)
        if not raw and allow_empty:
            return None
        try:
            value = int(raw) if integer else float(raw)
        except ValueError:
            kind = "a whole number" if integer else f"a number of {unit}"
            raise self.error(key, f"must be {kind}, not {raw!r}") from None
        if not math.isfinite(value) or value < minimum:
            raise self.error(key, f"must be at least {minimum:g}, not {raw!r}")
        return value

    def flag(self, key):
        return self.parsed(parse_flag, key)

    def parsed(self, parse, key, *args):
        """``parse(text, key, *args)``, its ConfigError placed in this file and section."""
        try:
            return parse(self.text(key), key, *args)
        except ConfigError as exc:
            raise self.located(exc) from None

    def secret(self, key, env_name, environ, warnings):
        """A password: from the environment, else a file named by ``KEY_file``, else the key.

        A password kept in a file that other users can read adds a warning.
        """
        if environ.get(env_name):
            return environ[env_name]
        file_key = f"{key}_file"
        path = self.text(file_key)
        if path:
            try:
                secret = Path(path).read_text().strip()
            except OSError as exc:
                raise self.error(file_key, f"cannot read {path}: {exc.strerror}") from None
            _warn_if_readable(Path(path), f"[{self.name}] {file_key}", warnings)
            return secret
        if key in self.explicit and self.values.get(key) != PUBLIC_PASSWORD:
            _warn_if_readable(self.path, f"[{self.name}] {key}", warnings)
        return self.values.get(key)


def read_parser(path) -> configparser.RawConfigParser:
    """Read *path* without ``%`` interpolation; a missing or broken file is a ConfigError."""
    parser = configparser.RawConfigParser(
        interpolation=None, inline_comment_prefixes=("#", ";"), strict=True
    )
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except FileNotFoundError:
        raise ConfigError("no such file", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", path) from None
    except configparser.Error as exc:
        raise ConfigError(f"not a valid ini file: {exc.message.splitlines()[0]}", path) from None
    return parser


def load(path, environ=None) -> Config:
    """Parse and check the file at *path*, importing every runner; raise ConfigError on a mistake."""
    environ = os.environ if environ is None else environ
    path = Path(path)
    parser = read_parser(path)
    for required in ("rbit", "amqp"):
        if not parser.has_section(required):
            raise ConfigError("required section is missing", path, required)
    known = {"rbit", "amqp", "pybit", *LOGGING_SECTIONS}
    for name in parser.sections():
        if name not in known and not name.startswith(RUNNER_PREFIX) and not _is_logging_part(name):
            raise ConfigError(
                f"unknown section; runner sections are named [{RUNNER_PREFIX}QUEUE]", path, name
            )
    warnings = []
    worker = _worker(_Section(path, parser, "rbit", RBIT_DEFAULTS), environ)
    amqp = _amqp(_Section(path, parser, "amqp", AMQP_DEFAULTS), environ, warnings)
    pybit = None
    if parser.has_section("pybit"):
        pybit = _pybit(_Section(path, parser, "pybit", PYBIT_DEFAULTS), environ, warnings)
    sections = tuple(
        _runner(_Section(path, parser, name), worker)
        for name in parser.sections()
        if name.startswith(RUNNER_PREFIX)
    )
    if not sections:
        raise ConfigError(
            f"no [{RUNNER_PREFIX}QUEUE] section: the worker would serve no queue", path
        )
    return Config(path, worker, amqp, pybit, sections, parser, tuple(warnings))


def _is_logging_part(name):
    return name.startswith(("logger_", "handler_", "formatter_"))


def _worker(section, environ):
    name = section.text("name", required=True)
    suites = tuple(s.strip() for s in section.text("suites").split(",") if s.strip())
    http = None
    if section.text("http"):
        host, sep, port = section.text("http").rpartition(":")
        if not sep or not port.isdigit():
            raise section.error("http", "must be HOST:PORT, like 127.0.0.1:9090")
        http = (host or "127.0.0.1", int(port))
    return WorkerSettings(
        name=name,
        polling_time=section.number("polling_time", minimum=0.1),
        distribution=section.text("distribution"),
        architecture=section.text("architecture"),
        format=section.text("format"),
        suites=suites,
        blocked_delay=section.number("blocked_delay", minimum=0.001),
        rejected_queue=section.text("rejected_queue", required=True),
        concurrency=section.number("concurrency", minimum=1, integer=True),
        shutdown_grace=section.number("shutdown_grace"),
        state_dir=Path(section.text("state_dir")) if section.text("state_dir") else None,
        http=http,
        # A relative log_dir is the configuration file's neighbour, whatever the working directory.
        log_dir=section.path.parent.absolute() / Path(section.text("log_dir")).expanduser() if section.text("log_dir")
        else default_log_dir(environ),
        log_max=section.parsed(parse_size, "log_max", joblog.MIN_LOG_MAX),
        log_keep=section.number("log_keep", unit="days"),
        log_echo=section.flag("log_echo"),
        reclaim_after=_reclaim_after(section),
    )


def _reclaim_after(section):
    """``0`` turns reclaiming off; otherwise long enough for several announcements (rbit.lease)."""
    value = section.number("reclaim_after")
    if 0 < value < MIN_RECLAIM_AFTER:
        raise section.error("reclaim_after", f"must be 0 (off) or at least {MIN_RECLAIM_AFTER:g}, "
                                             f"not {section.text('reclaim_after')!r}")
    return value


def _warn_if_readable(path, what, warnings):
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o004:
        warnings.append(
            f"{path} holds a password ({what}) and every user can read it: "
            f"chmod o-r {path}, or give the password through the environment"
        )


def _amqp(section, environ, warnings):
    port = section.number("port", minimum=1, integer=True)
    if port > 65535:
        raise section.error("port", f"must be a TCP port, 1 to 65535, not {port}")
    addresses = tuple(_address(section, entry, port) for entry in section.text("host", required=True).split(","))
    queue_type = section.text("queue_type").lower()
    if queue_type not in QUEUE_TYPES:
        raise section.error("queue_type", f"must be {' or '.join(QUEUE_TYPES)}, not {queue_type!r}")
    return AmqpSettings(
        hosts=tuple(address.host for address in addresses),
        port=port,
        addresses=addresses,
        queue_type=queue_type,
        user=section.text("user"),
        password=section.secret("password", PASSWORD_ENV["amqp"], environ, warnings) or "",
        virtual_host=section.text("virtual_host") or "/",
        heartbeat=section.number("heartbeat"),
        ssl=section.flag("ssl"),
        ca_file=section.text("ca_file") or None,
        cert_file=section.text("cert_file") or None,
        key_file=section.text("key_file") or None,
        verify=section.flag("verify"),
    )


def _address(section, entry, default_port):
    """One entry of ``[amqp] host``: ``HOST``, ``HOST:PORT``, ``[IPv6]``, ``[IPv6]:PORT`` or a bare IPv6 address."""
    entry = entry.strip()
    if not entry:
        raise section.error("host", "has an empty entry: separate hosts with one comma, like a.example, b.example:5673")
    if "://" in entry:
        raise section.error("host", f"{entry!r}: give host names (HOST or HOST:PORT), not URLs")
    if "%" in entry:
        raise section.error("host", f"{entry!r}: IPv6 addresses with a zone (%) are not supported")
    host, port = entry, None
    if entry.startswith("["):
        inside, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise section.error("host", f"{entry!r}: write an IPv6 address in brackets, like [::1]:5672")
        host, port = inside, (rest[1:] if rest else None)
        if not _is_ipv6(host):
            raise section.error("host", f"{entry!r}: {host!r} in brackets is not an IPv6 address")
    elif entry.count(":") > 1:
        if not _is_ipv6(entry):
            raise section.error("host", f"{entry!r}: write an IPv6 address in brackets, like [::1]:5672")
    elif ":" in entry:
        host, port = entry.split(":")
    if port is not None:
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise section.error("host", f"{entry!r}: the port must be a number from 1 to 65535")
        port = int(port)
    if not _is_ipv6(host) and (len(host) > 253 or not _HOST_NAME.fullmatch(host)):
        raise section.error("host", f"{entry!r} is not a host name, an IP address or HOST:PORT")
    return Address(host, default_port if port is None else port)


def _is_ipv6(text):
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _pybit(section, environ, warnings):
    url = section.text("url").rstrip("/") or None
    if url and not url.startswith(("http://", "https://")):
        # The url may hold credentials: do not repeat it.
        raise section.error("url", "must start with http:// or https://")
    user = section.text("user") or None
    password = section.secret("password", PASSWORD_ENV["pybit"], environ, warnings) or None
    if (user or password) and not url:
        # Without a url, statuses follow each request's web_host: a message would
        # choose where the password goes, over plain HTTP.
        raise section.error(
            "url", "is required with a user or password: credentials go only to the configured PyBit"
        )
    return PybitSettings(
        url=url,
        user=user,
        password=password,
        timeout=section.number("timeout", minimum=0.1),
    )


def _runner(section, worker):
    queue = section.name[len(RUNNER_PREFIX):].strip()
    if not queue:
        raise section.error(None, f"names no queue: write [{RUNNER_PREFIX}QUEUE]")
    line = section.text("runner", required=True)
    settings = {k: v for k, v in section.values.items() if k not in RUNNER_OWN_KEYS}
    try:
        runner = runners.load(line, settings)
    except ConfigError as exc:
        # A runner's check of its settings names the setting; anything else is the runner line's.
        raise section.located(exc, "runner") from exc
    return RunnerSection(
        queue=queue,
        routing_key=section.text("routing_key") or _routing_key(section, queue, worker),
        runner=runner,
        timeout=section.number("timeout", minimum=0.001, allow_empty=True),
        settings=settings,
    )


def _routing_key(section, queue, worker):
    """PyBit binds ``dist_arch_suite_format`` with the key ``dist.arch.suite.format``."""
    for suite in worker.suites:
        parts = (worker.distribution, worker.architecture, suite, worker.format)
        if all(parts) and "_".join(parts) == queue:
            return ".".join(parts)
    parts = queue.split("_")
    if len(parts) != 4 or not all(parts):
        raise section.error(
            "routing_key",
            f"cannot tell PyBit's routing key from the queue name {queue!r} "
            "(expected DIST_ARCH_SUITE_FORMAT); set routing_key = DIST.ARCH.SUITE.FORMAT",
        )
    return ".".join(parts)
