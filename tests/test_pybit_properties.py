"""rbit.pybit under arbitrary input ("Code in messages"): a request or BadMessage, never anything run."""

import builtins
import importlib
import json
import os
import posix
import subprocess
import sys
from contextlib import ExitStack
from unittest import mock

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rbit import pybit
from rbit.errors import BadMessage

CLASS_NAMES = [f"pybit.models.{name}" for name in (
    "BuildRequest", "CancelRequest", "Job", "PackageInstance", "Package", "Arch", "Suite",
    "Dist", "Format", "BuildEnv", "Transport", "Evil", "Model",
)] + ["os.system", "subprocess.Popen", "builtins.eval", "this", "this.X", "pybit.models", ""]

TAGS = ["py/object", "py/reduce", "py/function", "py/type", "py/repr", "py/mod", "py/newobj",
        "py/newargs", "py/id", "py/ref", "py/tuple", "py/set", "py/state", "py/initargs",
        "py/b64", "py/b85", "py/bytes", "py/seq", "py/iterator", "py/module", "PY/REDUCE"]

FIELD_NAMES = ["job", "transport", "web_host", "timestamp", "commands", "id", "packageinstance",
               "buildclient", "package", "arch", "build_env", "suite", "distribution", "format",
               "master", "name", "version", "method", "uri", "vcs_id"]

keys = st.sampled_from(TAGS + FIELD_NAMES) | st.text(max_size=6)
leaves = (
    st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
    | st.sampled_from(CLASS_NAMES + ["\0", "\ud800"])
    | st.integers(pybit.MAX_STRING_LENGTH - 1, pybit.MAX_STRING_LENGTH + 1).map(lambda n: "x" * n)
)
json_values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=25,
)

#: A valid BuildRequest and CancelRequest as JSON data, for the strategies to spoil.
VALID = [
    json.loads(pybit.encode(pybit.make_request(42, "hello", "1.0", "cnx", "any", "latex", "pdf",
                                               vcs_id="r1", buildenv="squeeze"))),
]
VALID.append({"py/object": "pybit.models.CancelRequest", "job": VALID[0]["job"], "web_host": "h:1"})


def _holders(data):
    """Every dict and list inside *data*, *data* included."""
    found = [data]
    for item in (data.values() if isinstance(data, dict) else data):
        if isinstance(item, (dict, list)):
            found.extend(_holders(item))
    return found


@st.composite
def spoiled_requests(draw):
    """A valid request with one place in it changed to, or given, an arbitrary value."""
    data = json.loads(json.dumps(draw(st.sampled_from(VALID))))
    holder = draw(st.sampled_from(_holders(data)))
    value = draw(json_values)
    if isinstance(holder, dict):
        key = draw(st.sampled_from(sorted(holder)) | keys)
        if draw(st.booleans()) and key in holder:
            del holder[key]
        else:
            holder[key] = value
    elif holder:
        holder[draw(st.integers(0, len(holder) - 1))] = value
    return data


def bodies(data):
    return st.sampled_from([json.dumps(data), json.dumps(data).encode("utf-8")])


def decode_guarded(body):
    """decode(*body*) with everything that could run a command or import a module watched.

    Returns the result (or the BadMessage) and the calls and imports seen.
    """
    seen = []

    def record(name, real=None):
        def recorder(*args, **kwargs):
            seen.append((name, args[:1]))
            if real is not None:
                return real(*args, **kwargs)
        return recorder

    modules = set(sys.modules)
    with ExitStack() as stack:
        for target in (os, posix):
            stack.enter_context(mock.patch.object(target, "system", record("system")))
        stack.enter_context(mock.patch.object(os, "popen", record("popen")))
        stack.enter_context(mock.patch.object(subprocess, "Popen", record("Popen")))
        stack.enter_context(mock.patch.object(importlib, "import_module", record("import_module")))
        stack.enter_context(mock.patch.object(builtins, "eval", record("eval")))
        stack.enter_context(mock.patch.object(builtins, "exec", record("exec")))
        stack.enter_context(mock.patch.object(builtins, "__import__", record("import", builtins.__import__)))
        try:
            result = pybit.decode(body)
        except BadMessage as error:
            result = error
    return result, seen, set(sys.modules) - modules


def check(body):
    result, seen, imported = decode_guarded(body)
    assert isinstance(result, (pybit.BuildRequest, pybit.CancelRequest, BadMessage)), result
    assert seen == []
    assert imported == set()
    if isinstance(result, BadMessage):
        assert result.reason and isinstance(result.reason, str)
    return result


PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.data())
def test_any_json_is_a_request_or_bad_message(data):
    """Any JSON value decodes to a request or raises BadMessage; nothing is called or imported."""
    check(data.draw(json_values.flatmap(bodies)))


@PROPERTY
@given(st.data())
def test_spoiled_request_is_a_request_or_bad_message(data):
    """A request with one part spoilt decodes (and writes back the same) or is rejected."""
    result = check(data.draw(spoiled_requests().flatmap(bodies)))
    event(type(result).__name__)
    if not isinstance(result, BadMessage):
        assert pybit.decode(pybit.encode(result)) == result


@PROPERTY
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_any_bytes_are_a_request_or_bad_message(body):
    """Arbitrary bytes or text decode to a request or raise BadMessage; nothing is run."""
    check(body)


def test_valid_requests_decode():
    """The strategies start from requests that decode (so spoiling them tests something)."""
    assert isinstance(check(json.dumps(VALID[0])), pybit.BuildRequest)
    assert isinstance(check(json.dumps(VALID[1])), pybit.CancelRequest)
