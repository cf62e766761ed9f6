"""Reading the ini file into typed, validated settings, before any connection is made."""

import ipaddress
import os
from pathlib import Path

from .. import joblog, runners
from ..logdir import default_log_dir
from ..errors import ConfigError
from ..lease import MIN_RECLAIM_AFTER
from ..passwords import PASSWORD_ENV
from ..settings import parse_size
from .sections import _Section, read_parser
from .types import (
    _HOST_NAME, AMQP_DEFAULTS, LOGGING_SECTIONS, PYBIT_DEFAULTS, QUEUE_TYPES, RBIT_DEFAULTS, RUNNER_OWN_KEYS,
    RUNNER_PREFIX, Address, AmqpSettings, Config, PybitSettings, RunnerSection, WorkerSettings,
)

__all__ = [
    "AMQP_DEFAULTS", "PYBIT_DEFAULTS", "QUEUE_TYPES", "RBIT_DEFAULTS", "Address", "AmqpSettings", "Config",
    "PybitSettings", "RunnerSection", "WorkerSettings", "load", "read_parser",
]


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
