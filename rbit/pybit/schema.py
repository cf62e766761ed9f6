"""The shape of each PyBit class on the wire: its fields, in PyBit's order, and how to read each strictly."""

import re
from typing import Callable, NamedTuple

from ..errors import BadMessage
from .models import (
    Arch, BuildD, BuildEnv, BuildRequest, CancelRequest, Dist, Format, Job, Package, PackageInstance,
    Suite, Transport,
)

#: Largest message body read, in bytes; a bigger one is rejected before parsing.
MAX_BODY_BYTES = 1024 * 1024

#: Deepest nesting of JSON objects and lists accepted (a PyBit request is 4 deep).
MAX_DEPTH = 20

#: Longest string accepted in a field of a request, in characters.
MAX_STRING_LENGTH = 4096

#: Control characters (line breaks, escapes, ...) are refused in every string field.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: The module PyBit's model classes live in, as named in ``py/object`` tags.
PYBIT_MODULE = "pybit.models"

#: The one jsonpickle tag a request may carry; every other ``py/...`` key is refused.
OBJECT_TAG = "py/object"

#: Longest piece of message text quoted in a rejection reason.
_QUOTE_LENGTH = 40


def _json_type(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _quote(text):
    """*text* quoted for a rejection reason, shortened: it comes from the message."""
    if len(text) > _QUOTE_LENGTH:
        return repr(text[:_QUOTE_LENGTH]) + "..."
    return repr(text)


def _expect(ok, path, what, value):
    if not ok:
        raise BadMessage(f"{path} must be {what}, not {_json_type(value)}")
    return value


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(value, path):
    return _expect(_is_int(value), path, "an integer", value)


def _boolean(value, path):
    return _expect(isinstance(value, bool), path, "a boolean", value)


def _number(value, path):
    return _expect(_is_int(value) or isinstance(value, float), path, "a number", value)


def _string(value, path):
    _expect(isinstance(value, str), path, "a string", value)
    if len(value) > MAX_STRING_LENGTH:
        raise BadMessage(f"{path} is longer than {MAX_STRING_LENGTH} characters")
    if "\0" in value:
        raise BadMessage(f"{path} contains a NUL character")
    if _CONTROL.search(value):
        # No PyBit name holds one; in a log line a newline would forge a line.
        raise BadMessage(f"{path} contains a control character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadMessage(f"{path} contains a lone surrogate") from None
    return value


def _vcs_id(value, path):
    if _is_int(value):
        return str(value)
    _expect(isinstance(value, str), path, "a string or an integer", value)
    return _string(value, path)


class _Field(NamedTuple):
    """One attribute of a PyBit class: its name, how to read it, whether it may be null.

    A nullable field may also be missing (older PyBit versions lack some).
    """

    name: str
    read: Callable
    nullable: bool = False


def _object(cls):
    return lambda value, path: _read_object(value, path, cls)


_ID = _Field("id", _integer, nullable=True)
_NAME = _Field("name", _string)

#: The attributes of each PyBit class, in the order PyBit sets them, and how to read each.
_FIELDS = {
    Package: (_ID, _Field("version", _string), _NAME),
    Arch: (_ID, _NAME),
    Suite: (_ID, _NAME),
    Dist: (_ID, _NAME),
    Format: (_ID, _NAME),
    BuildEnv: (_ID, _NAME),
    BuildD: (_ID, _NAME),
    PackageInstance: (
        _ID,
        _Field("package", _object(Package)),
        _Field("arch", _object(Arch)),
        _Field("build_env", _object(BuildEnv), nullable=True),
        _Field("suite", _object(Suite)),
        _Field("distribution", _object(Dist)),
        _Field("format", _object(Format)),
        _Field("master", _boolean),
    ),
    Job: (
        _Field("id", _integer),
        _Field("packageinstance", _object(PackageInstance)),
        # PyBit puts the BuildD building the job here: always in a CancelRequest.
        _Field("buildclient", _object(BuildD), nullable=True),
    ),
    Transport: (
        _ID,
        _Field("method", _string),
        _Field("uri", _string),
        _Field("vcs_id", _vcs_id, nullable=True),
    ),
    BuildRequest: (
        _Field("job", _object(Job)),
        _Field("transport", _object(Transport)),
        _Field("web_host", _string),
        _Field("timestamp", _number, nullable=True),
    ),
    CancelRequest: (_Field("job", _object(Job)), _Field("web_host", _string)),
}

#: rbit's class for each ``py/object`` tag, e.g. ``pybit.models.Job``.
_BY_TAG = {f"{PYBIT_MODULE}.{cls.__name__}": cls for cls in _FIELDS}

#: Stand-ins named ``pybit.models.<Class>``, only for jsonpickle to write: rbit's
#: own classes keep their importable module so that they can be pickled.
_WIRE_CLASSES = {cls: type(cls.__name__, (), {"__module__": PYBIT_MODULE}) for cls in _FIELDS}


def _read_object(value, path, cls):
    """The *cls* object that *value*, found at *path*, stands for."""
    expected = f"{PYBIT_MODULE}.{cls.__name__}"
    if not isinstance(value, dict):
        raise BadMessage(f"{path} must be a {expected}, not {_json_type(value)}")
    tag = value.get(OBJECT_TAG)
    if tag is None:
        raise BadMessage(f"{path} must be a {expected}, not a plain object")
    if tag != expected:
        raise BadMessage(f"{path} must be a {expected}, not {tag}")
    values = {}
    for field in _FIELDS[cls]:
        if field.name not in value and not field.nullable:
            raise BadMessage(f"missing field {field.name!r} at {path}")
        item = value.get(field.name)
        if item is None and field.nullable:
            values[field.name] = None
        else:
            values[field.name] = field.read(item, f"{path}.{field.name}")
    return cls(**values)
