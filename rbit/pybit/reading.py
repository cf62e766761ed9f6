"""Reading PyBit's requests safely: plain JSON checked against each class's shape; nothing is imported or run."""

import json
import math

from ..errors import BadMessage
from .models import BuildRequest, CancelRequest
from .schema import (
    _BY_TAG, _QUOTE_LENGTH, MAX_BODY_BYTES, MAX_DEPTH, OBJECT_TAG, _json_type, _quote, _read_object,
)


def _reject_duplicates(pairs):
    keys = set()
    for key, _ in pairs:
        if key in keys:
            raise BadMessage(f"duplicate key {_quote(key)} in a JSON object")
        keys.add(key)
    return dict(pairs)


def _reject_constant(name):
    raise BadMessage(f"body contains {name}, which is not JSON")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise BadMessage(f"number out of range: {_quote(text)}")
    return value


def _parse(body):
    """The JSON value in *body*, parsed within the limits above."""
    if isinstance(body, str):
        if len(body) > MAX_BODY_BYTES:
            raise BadMessage(f"body is larger than {MAX_BODY_BYTES} bytes")
        try:
            body = body.encode("utf-8")
        except UnicodeEncodeError as error:
            raise BadMessage(f"body is not UTF-8: {error.reason}") from None
    if not isinstance(body, (bytes, bytearray)):
        raise TypeError(f"a message body is bytes or str, not {type(body).__name__}")
    if len(body) > MAX_BODY_BYTES:
        raise BadMessage(f"body is larger than {MAX_BODY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadMessage(f"body is not UTF-8: {error.reason} at byte {error.start}") from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except json.JSONDecodeError as error:
        raise BadMessage(f"body is not JSON: {error}") from None
    except RecursionError:
        raise BadMessage("body is nested too deeply") from None
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        raise BadMessage(f"body has an unreadable value: {error}") from None


def _child_path(path, key):
    if key.isidentifier() and len(key) <= _QUOTE_LENGTH:
        return f"{path}.{key}"
    return f"{path}[{_quote(key)}]"


def _scan(value, path="$", depth=1):
    """Refuse, anywhere in *value*, deep nesting, jsonpickle tags, and unknown classes."""
    if not isinstance(value, (dict, list)):
        return
    if depth > MAX_DEPTH:
        raise BadMessage(f"nesting deeper than {MAX_DEPTH} levels at {path}")
    if isinstance(value, list):
        for index, item in enumerate(value):
            _scan(item, f"{path}[{index}]", depth + 1)
        return
    for key, item in value.items():
        if key == OBJECT_TAG:
            if not isinstance(item, str):
                kind = _json_type(item)
                raise BadMessage(f"py/object at {path} must be a class name, not {kind}")
            if item not in _BY_TAG:
                raise BadMessage(f"unknown class {_quote(item)} at {path}")
        elif key[:3].lower() == "py/":
            raise BadMessage(f"forbidden jsonpickle tag {_quote(key)} at {path}")
        _scan(item, _child_path(path, key), depth + 1)


def decode(body: bytes | str) -> BuildRequest | CancelRequest:
    """The BuildRequest or CancelRequest in *body* (bytes or str), read without running anything.

    Raises :class:`~rbit.errors.BadMessage`, with the reason, for anything else.
    """
    data = _parse(body)
    if not isinstance(data, dict):
        raise BadMessage(f"body is {_json_type(data)}, not a PyBit request")
    _scan(data)
    tag = data.get(OBJECT_TAG)
    if tag is None:
        raise BadMessage("body is a plain JSON object, not a PyBit request")
    cls = _BY_TAG[tag]
    if cls not in (BuildRequest, CancelRequest):
        raise BadMessage(f"expected a BuildRequest or CancelRequest, got {cls.__name__}")
    return _read_object(data, "$", cls)


def _decode_as(body, cls):
    request = decode(body)
    if not isinstance(request, cls):
        raise BadMessage(f"expected a {cls.__name__}, got {type(request).__name__}")
    return request


def decode_build_request(body: bytes | str) -> BuildRequest:
    """The BuildRequest in *body*; :class:`~rbit.errors.BadMessage` for anything else."""
    return _decode_as(body, BuildRequest)


def decode_cancel_request(body: bytes | str) -> CancelRequest:
    """The CancelRequest in *body*; :class:`~rbit.errors.BadMessage` for anything else."""
    return _decode_as(body, CancelRequest)
