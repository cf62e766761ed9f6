"""The environment variables that may carry rbit's passwords, and keeping them from job processes."""

from __future__ import annotations

import os
from typing import Mapping, MutableMapping

#: Environment variables that override passwords, by configuration section.
PASSWORD_ENV = {"amqp": "RBIT_AMQP_PASSWORD", "pybit": "RBIT_PYBIT_PASSWORD"}


def without_passwords(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of *environ* without rbit's password variables."""
    return {key: value for key, value in environ.items() if key not in PASSWORD_ENV.values()}


def forget_passwords(environ: MutableMapping[str, str] = os.environ) -> None:
    """Remove rbit's password variables from *environ*, so that no child inherits them."""
    for variable in PASSWORD_ENV.values():
        environ.pop(variable, None)
