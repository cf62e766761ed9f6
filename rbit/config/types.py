"""The settings of each section, typed, with their defaults as written in an ini file."""

import configparser
import logging.config
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..errors import ConfigError

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
