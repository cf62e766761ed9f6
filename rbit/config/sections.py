"""Reading an ini file and its sections: typed values whose errors name the file, the section and the key."""

import configparser
import math
from pathlib import Path

from ..errors import ConfigError
from ..settings import check_known, parse_flag
from .types import PUBLIC_PASSWORD


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
