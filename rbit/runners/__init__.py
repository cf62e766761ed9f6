"""The runner registry: ``PROCESSOR!SPEC`` lines become runner objects.

A processor is a :class:`Runner` subclass registered under the name written
before the ``!``. rbit's own are listed in :data:`BUILTIN`; a package adds its
own through the ``rbit.processors`` entry-point group::

    [options.entry_points]
    rbit.processors =
        docker = mypackage.runner:DockerRunner

Processors are imported only when a configuration names them.
"""

import abc
import importlib

from ..errors import ConfigError
from ..settings import did_you_mean

#: The entry-point group through which plugins register processors.
ENTRY_POINT_GROUP = "rbit.processors"

#: rbit's own processors, by name, as import strings.
BUILTIN = {
    "python": "rbit.runners.python:PythonRunner",
    "shell": "rbit.runners.shell:ShellRunner",
}


class Runner(abc.ABC):
    """A configured runner, built and checked when the configuration is read.

    The constructor parses *spec* (the text after ``!``) and raises
    :class:`~rbit.errors.ConfigError` for anything wrong with it, so that a bad
    configuration is refused before the worker connects. :meth:`run` is called
    in the job's own process. Runners are pickled to that process by their
    spec and settings, so the constructor must be cheap to call again.
    """

    def __init__(self, spec, settings):
        self.spec = spec
        self.settings = dict(settings)

    @abc.abstractmethod
    def run(self, message, set_status) -> None:
        """Do one job: return when it is done, raise Blocked or Failed otherwise."""

    def program(self, message) -> tuple[list[str], dict[str, str]] | None:
        """``(argv, environment)`` of a program that *is* the job, or None (the default): :meth:`run` is.

        A worker's job process then becomes that program (exec), with nothing
        of Python left between it and the worker: its exit status is read as
        :func:`rbit.runners.shell.exit_outcome` says, and it reports statuses
        by writing lines to the descriptor in ``RBIT_STATUS_FD``. :meth:`run`
        must do the same job, for ``rbit try``.
        """
        return None

    def __reduce__(self):
        return (type(self), (self.spec, self.settings))

    def __repr__(self):
        return f"{type(self).__name__}({self.spec!r})"


def processors() -> dict:
    """All processors available here, by name: ``{name: import string or EntryPoint}``."""
    from importlib.metadata import entry_points  # here: a job's process never needs it

    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    found.update(BUILTIN)
    return found


def get_processor(name: str) -> type:
    """The Runner class registered as *name*, imported now."""
    known = processors()
    if name not in known:
        raise ConfigError(
            f"unknown processor {name!r}{did_you_mean(name, known)} (known: {', '.join(sorted(known))})"
        )
    target = known[name]
    try:
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            cls = getattr(importlib.import_module(module), attr)
        else:
            cls = target.load()
    except Exception as exc:
        raise ConfigError(f"processor {name!r} cannot be loaded: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Runner)):
        raise ConfigError(f"processor {name!r} is not a rbit.runners.Runner subclass")
    return cls


def load(line: str, settings: dict) -> Runner:
    """Build the runner for a ``PROCESSOR!SPEC`` line with the section's *settings*."""
    name, bang, spec = line.partition("!")
    if not bang or not name.strip():
        raise ConfigError(f"expected PROCESSOR!SPEC, like python!module:function, not {line!r}")
    if not spec.strip():
        raise ConfigError(f"nothing after {name}!: say what to run")
    return get_processor(name.strip())(spec.strip(), settings)
