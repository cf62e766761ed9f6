"""The ``python!package.module:function`` processor: calls a function in the job's process.

A function may carry a settings check, called with its settings when the
configuration is read, so that a bad setting is refused before any connection::

    def check_settings(settings):
        if "output" not in settings:
            raise rbit.errors.ConfigError("is required", key="output")

    def build(message, set_status, settings):
        ...

    build.check_settings = check_settings
"""

import importlib

from ..errors import ConfigError
from . import Runner

#: The attribute of a runner function that holds its settings check.
CHECK_ATTRIBUTE = "check_settings"


def resolve(spec: str):
    """Import ``package.module:function`` (the function may be dotted) and return it."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise ConfigError(f"expected python!package.module:function, not python!{spec}")
    try:
        target = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"cannot import module {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no {attr!r}") from None
    if not callable(target):
        raise ConfigError(f"{spec} is not callable")
    return target


def check_settings(function, spec, settings):
    """Call *function*'s settings check, if it has one, on a copy of *settings*.

    The check raises ConfigError naming the key (``key=``); its return value is
    ignored. Any other exception it raises is a ConfigError too, naming the check.
    """
    check = getattr(function, CHECK_ATTRIBUTE, None)
    if check is None:
        return
    try:
        check(dict(settings))
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{spec}.{CHECK_ATTRIBUTE} raised {type(exc).__name__}: {exc}") from exc


class PythonRunner(Runner):
    """Calls ``function(message, set_status, settings)``, after checking the settings once."""

    def __init__(self, spec, settings, check=True):
        super().__init__(spec, settings)
        self.function = resolve(spec)
        if check:
            check_settings(self.function, spec, self.settings)

    def __reduce__(self):
        # Checked when the configuration was read: the job's process, which unpickles
        # the runner for each job, does not check again.
        return (type(self), (self.spec, self.settings, False))

    def run(self, message, set_status) -> None:
        self.function(message, set_status, dict(self.settings))
