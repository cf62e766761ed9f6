"""Reading settings written as text: unknown keys with a close-match hint, true/false flags, sizes.

rbit's configuration reads its own sections with these, and a ``python!``
runner's ``check_settings`` can use them for its own settings. Each raises
:class:`~rbit.errors.ConfigError` naming the key; rbit adds the file and the
section.
"""

import difflib
import re

from .errors import ConfigError

#: The words of a true and of a false flag, compared without regard to case.
TRUE_WORDS = ("1", "yes", "true", "on")
FALSE_WORDS = ("0", "no", "false", "off")

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def did_you_mean(name, known):
    """``"; did you mean 'x'?"`` for the name in *known* closest to *name*, else ``""``."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_known(settings, known):
    """Refuse the first key of *settings* that is not in *known*, suggesting the closest one."""
    for key in settings:
        if key not in known:
            hint = did_you_mean(key, known) or f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown key{hint}", key=key)


def parse_flag(value, key):
    """*value* (``true``/``false``, ``yes``/``no``, ``on``/``off``, ``1``/``0``) as a bool."""
    written = (value or "").strip()
    if written.lower() in TRUE_WORDS:
        return True
    if written.lower() in FALSE_WORDS:
        return False
    raise ConfigError(f"must be true or false, not {written!r}", key=key)


def parse_size(value, key, minimum=0):
    """*value*, bytes with an optional ``K``, ``M`` or ``G`` (powers of 1024), as an int."""
    written = (value or "").strip()
    match = _SIZE.match(written)
    if not match:
        raise ConfigError(f"must be a size in bytes, like 100M (K, M or G), not {written!r}", key=key)
    size = int(match.group(1)) * _UNITS[match.group(2).lower()]
    if size < minimum:
        raise ConfigError(f"must be at least {minimum}, not {written!r}", key=key)
    return size
