"""Reading settings written as text: unknown keys with a close-match hint, and true/false flags.

rbit's configuration reads its own sections with these, and a ``python!``
runner's ``check_settings`` can use them for its own settings. Each raises
:class:`~rbit.errors.ConfigError` naming the key; rbit adds the file and the
section.
"""

import difflib

from .errors import ConfigError

#: The words of a true and of a false flag, compared without regard to case.
TRUE_WORDS = ("1", "yes", "true", "on")
FALSE_WORDS = ("0", "no", "false", "off")


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
