"""The ``python!package.module:function`` processor: calls a function in the job's process."""

import importlib

from ..errors import ConfigError
from . import Runner


def resolve(spec):
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


class PythonRunner(Runner):
    """Calls ``function(message, set_status, settings)``."""

    def __init__(self, spec, settings):
        super().__init__(spec, settings)
        self.function = resolve(spec)

    def run(self, message, set_status):
        self.function(message, set_status, dict(self.settings))
