"""rbit.pybit: PyBit's wire format, read safely ("Code in messages") and written as PyBit does."""

import copy
import json
import os
import pickle
import posix
import subprocess
import sys
import time
import types

import jsonpickle
import pytest

from rbit import pybit
from rbit.errors import BadMessage


# -- PyBit's own pybit.models, as its controller has them (tests/pybit_models.py) --

from .pybit_models import (  # noqa: E402
    Arch, BuildD, BuildEnv, BuildRequest, CancelRequest, Dist, Format, Job, Model, Package,
    PackageInstance, Suite, Transport,
)

PYBIT_CLASSES = [Model, Arch, Dist, Format, Suite, BuildEnv, Package, Transport,
                 PackageInstance, Job, BuildRequest, CancelRequest, BuildD]

ACCESSORS = ["get_job_id", "get_package", "get_version", "get_arch", "get_dist",
             "get_suite", "get_format", "get_buildenv", "get_buildstamp"]

#: Every jsonpickle tag other than py/object: each could import or call something.
FORBIDDEN_TAGS = ["py/reduce", "py/function", "py/type", "py/repr", "py/mod", "py/newobj",
                  "py/newargs", "py/newargsex", "py/id", "py/ref", "py/tuple", "py/set",
                  "py/state", "py/initargs", "py/b64", "py/b85", "py/bytes", "py/seq",
                  "py/iterator", "py/module", "py/property", "py/complex", "PY/REDUCE"]


def pybit_job(job_id=42, build_env="squeeze", vcs_id="abc123", buildclient=None):
    package = Package(7, "1.0-1", "hello")
    instance = PackageInstance(
        9, package, Arch(1, "any"), BuildEnv(5, build_env) if build_env else None,
        Suite(2, "latex"), Dist(3, "cnx"), Format(4, "pdf"), True,
    )
    return Job(job_id, instance, buildclient)


def pybit_request(**kwargs):
    """A BuildRequest made as PyBit's controller makes it."""
    vcs_id = kwargs.pop("vcs_id", "abc123")
    transport = Transport(None, "git", "https://git.example/hello.git", vcs_id)
    return BuildRequest(pybit_job(**kwargs), transport, "pybit.example:8080")


def pickled(obj, make_refs=True):
    """``jsonpickle.encode(obj)`` with PyBit's settings (jsonpickle's defaults, keys=False)."""
    return jsonpickle.encode(obj, context=jsonpickle.Pickler(make_refs=make_refs, keys=False))


def unpickled(text):
    """``jsonpickle.decode(text)``, as PyBit's client reads a request (tests only: it runs code)."""
    return jsonpickle.decode(text, context=jsonpickle.Unpickler(keys=False))


def controller_body(request):
    """*request* as PyBit's controller puts it on the queue: ``jsonpickle.encode(request)``."""
    return pickled(request)


def request_data():
    """A valid BuildRequest body as plain JSON data, for tests to spoil."""
    return json.loads(controller_body(pybit_request()))


def body(data):
    return json.dumps(data).encode("utf-8")


def rejected(data_or_body, decode=pybit.decode_build_request):
    """The reason *data_or_body* is rejected for."""
    raw = data_or_body if isinstance(data_or_body, (bytes, str)) else body(data_or_body)
    with pytest.raises(BadMessage) as caught:
        decode(raw)
    return caught.value.reason


@pytest.fixture
def pybit_installed(monkeypatch):
    """Make the classes above importable as ``pybit.models``, as on a PyBit host."""
    package = types.ModuleType("pybit")
    models = types.ModuleType("pybit.models")
    for cls in PYBIT_CLASSES:
        setattr(models, cls.__name__, cls)
    package.models = models
    monkeypatch.setitem(sys.modules, "pybit", package)
    monkeypatch.setitem(sys.modules, "pybit.models", models)
    return models


@pytest.fixture
def no_calls(monkeypatch, tmp_path):
    """Record anything that would run a command; check nothing did, and nothing got imported."""
    calls = []

    def record(name):
        return lambda *args, **kwargs: calls.append((name, args))

    for module, name in [(os, "system"), (posix, "system"), (os, "popen"), (subprocess, "Popen")]:
        monkeypatch.setattr(module, name, record(f"{module.__name__}.{name}"))
    modules = set(sys.modules)
    sentinel = tmp_path / "sentinel"
    yield types.SimpleNamespace(calls=calls, sentinel=sentinel)
    assert calls == []
    assert not sentinel.exists()
    assert set(sys.modules) == modules


# -- reading what PyBit writes ------------------------------------------------


@pytest.mark.parametrize("build_env", ["squeeze", None])
@pytest.mark.parametrize("stamped", [False, True])
@pytest.mark.parametrize("as_text", [False, True])
def test_reads_what_pybit_controller_writes(build_env, stamped, as_text):
    """A BuildRequest jsonpickled by PyBit decodes with every accessor as PyBit's own gives."""
    original = pybit_request(build_env=build_env, buildclient=BuildD(3, "bob-villa"))
    if stamped:
        original.stamp_request()
    text = controller_body(original)
    request = pybit.decode_build_request(text if as_text else text.encode("utf-8"))
    assert isinstance(request, pybit.BuildRequest)
    for accessor in ACCESSORS:
        assert getattr(request, accessor)() == getattr(original, accessor)(), accessor
    assert request.web_host == "pybit.example:8080"
    assert request.job.buildclient == pybit.BuildD(3, "bob-villa")
    assert request.job.client_name == "bob-villa"
    assert request.job.packageinstance.master is True
    assert request.transport == pybit.Transport(None, "git", "https://git.example/hello.git", "abc123")


def test_reads_pybit_request_with_default_make_refs():
    """PyBit encodes with jsonpickle's defaults; a request with no shared objects has no py/id."""
    text = pickled(pybit_request())
    assert "py/id" not in text
    assert pybit.decode_build_request(text).get_package() == "hello"


def test_reads_cancel_request():
    """A CancelRequest from PyBit web decodes, with its job id and the BuildD building it."""
    text = controller_body(CancelRequest(pybit_job(job_id=77, buildclient=BuildD(2, "bob")), "pybit.example:8080"))
    request = pybit.decode_cancel_request(text)
    assert isinstance(request, pybit.CancelRequest)
    assert request.get_job_id() == 77
    assert request.job.client_name == "bob"
    assert request.web_host == "pybit.example:8080"
    assert pybit.decode(text) == request


def test_buildclient_is_read_as_strictly_as_every_other_class():
    """A BuildD in a job is checked like every other class: its fields' types, its tag, and
    no jsonpickle tag inside it."""
    data = request_data()
    data["job"]["buildclient"] = {"py/object": "pybit.models.BuildD", "id": "1", "name": "b"}
    assert rejected(data) == "$.job.buildclient.id must be an integer, not a string"
    data["job"]["buildclient"] = {"py/object": "pybit.models.BuildD", "id": 1}
    assert rejected(data) == "missing field 'name' at $.job.buildclient"
    data["job"]["buildclient"] = {"py/object": "pybit.models.Arch", "id": 1, "name": "b"}
    assert rejected(data) == "$.job.buildclient must be a pybit.models.BuildD, not pybit.models.Arch"
    data["job"]["buildclient"] = {"py/object": "pybit.models.BuildD", "id": 1,
                                  "name": {"py/reduce": [{"py/function": "os.system"}, ["true"]]}}
    assert rejected(data).startswith("forbidden jsonpickle tag 'py/reduce'")


def test_decode_tells_the_two_requests_apart():
    """decode() returns whichever of BuildRequest and CancelRequest the body holds."""
    assert isinstance(pybit.decode(controller_body(pybit_request())), pybit.BuildRequest)
    cancel = controller_body(CancelRequest(pybit_job(), "h:1"))
    assert isinstance(pybit.decode(cancel), pybit.CancelRequest)


def test_build_request_is_not_a_cancel_request():
    """Each reader accepts only its own kind of request, and says what it got."""
    build = controller_body(pybit_request())
    cancel = controller_body(CancelRequest(pybit_job(), "h:1"))
    assert rejected(cancel) == "expected a BuildRequest, got CancelRequest"
    assert rejected(build, pybit.decode_cancel_request) == "expected a CancelRequest, got BuildRequest"


def test_other_pybit_class_at_top_is_not_a_request():
    """A known PyBit object that is not a request (a Job) is rejected."""
    reason = rejected(controller_body(pybit_job()), pybit.decode)
    assert reason == "expected a BuildRequest or CancelRequest, got Job"


def test_vcs_id_may_be_an_integer():
    """A Subversion revision may come as an integer; it is kept as a string."""
    request = pybit.decode_build_request(controller_body(pybit_request(vcs_id=1234)))
    assert request.transport.vcs_id == "1234"
    assert pybit.decode_build_request(controller_body(pybit_request(vcs_id=None))).transport.vcs_id is None


def test_older_pybit_without_build_env():
    """A PackageInstance without build_env (older PyBit) reads as having none."""
    data = request_data()
    del data["job"]["packageinstance"]["build_env"]
    assert pybit.decode_build_request(body(data)).get_buildenv() is None


def test_unknown_plain_fields_are_ignored():
    """Attributes PyBit may add (``commands``, anything new) are ignored, not refused."""
    data = request_data()
    data["commands"] = "fakeroot debian/rules binary"
    data["job"]["priority"] = [1, {"deep": None}]
    data["job"]["packageinstance"]["arch"]["py/object"] = "pybit.models.Arch"
    request = pybit.decode_build_request(body(data))
    assert request.get_job_id() == 42
    assert not hasattr(request, "commands")


def test_timestamp_number_or_null():
    """The timestamp is an int, a float or null."""
    for stamp in (1700000000, 1700000000.5, None):
        data = request_data()
        data["timestamp"] = stamp
        assert pybit.decode_build_request(body(data)).get_buildstamp() == stamp


# -- the model classes ------------------------------------------------------


def sample():
    return pybit.make_request(
        42, "hello", "1.0-1", "cnx", "any", "latex", "pdf",
        uri="https://git.example/hello.git", vcs_id="abc123",
        web_host="pybit.example:8080", buildenv="squeeze",
        package_id=7, packageinstance_id=9, arch_id=1, suite_id=2, dist_id=3,
        format_id=4, buildenv_id=5,
    )


def test_accessors_of_a_made_request():
    """rbit's BuildRequest has PyBit's accessors."""
    request = sample()
    assert [getattr(request, accessor)() for accessor in ACCESSORS] == [
        42, "hello", "1.0-1", "any", "cnx", "latex", "pdf", "squeeze", None,
    ]
    assert pybit.make_request(1, "p", "v", "d", "a", "s", "f").get_buildenv() is None


def test_stamp_request(monkeypatch):
    """stamp_request() sets the timestamp to the current time in whole seconds."""
    monkeypatch.setattr(time, "time", lambda: 1700000000.75)
    request = sample()
    request.stamp_request()
    assert request.get_buildstamp() == 1700000000


def test_fields_for_the_shell_runner():
    """fields() gives every placeholder's value as a string, "" for none."""
    assert sample().fields() == {
        "ID": "42", "PACKAGE": "hello", "VERSION": "1.0-1", "DIST": "cnx", "ARCH": "any",
        "SUITE": "latex", "FORMAT": "pdf", "BUILDENV": "squeeze", "METHOD": "git",
        "URI": "https://git.example/hello.git", "VCS_ID": "abc123",
        "WEB_HOST": "pybit.example:8080",
    }
    fields = pybit.make_request(1, "p", "v", "d", "a", "s", "f").fields()
    assert fields["BUILDENV"] == "" and fields["VCS_ID"] == ""


def test_requests_pickle_compare_and_repr():
    """The decoded request goes to the job's process: it pickles, compares and shows itself."""
    request = sample()
    assert pickle.loads(pickle.dumps(request)) == request
    other = sample()
    other.job.id = 43
    assert other != request
    assert "hello" in repr(request) and "BuildRequest" in repr(request)


def test_make_request_refuses_what_a_worker_would():
    """make_request() never makes a request that a worker would reject."""
    with pytest.raises(BadMessage, match=r"\$\.job\.id must be an integer"):
        pybit.make_request("42", "hello", "1.0", "cnx", "any", "latex", "pdf")
    with pytest.raises(BadMessage, match="NUL"):
        pybit.make_request(42, "hel\0lo", "1.0", "cnx", "any", "latex", "pdf")


# -- writing as PyBit does ----------------------------------------------------


def test_encode_writes_exactly_what_pybit_writes():
    """encode() gives, byte for byte, what jsonpickle gives for PyBit's own objects."""
    original = pybit_request()
    del original.commands  # rbit's BuildRequest has only the fields rbit reads
    assert pybit.encode(sample()) == pickled(original, make_refs=False)
    cancel = CancelRequest(pybit_job(), "pybit.example:8080")
    ours = pybit.CancelRequest(sample().job, "pybit.example:8080")
    assert pybit.encode(ours) == pickled(cancel, make_refs=False)


def test_encode_tags_and_no_references():
    """Every object is tagged pybit.models.<Class>; no py/id appears, even for shared objects."""
    request = sample()
    request.job.packageinstance.build_env = pybit.BuildEnv(5, "squeeze")
    shared = pybit.CancelRequest(request.job, "h:1")
    pair = [pybit.encode(request), pybit.encode(shared)]
    for text in pair:
        assert "py/id" not in text
    data = json.loads(pair[0])
    assert data["py/object"] == "pybit.models.BuildRequest"
    assert data["job"]["py/object"] == "pybit.models.Job"
    assert data["job"]["packageinstance"]["distribution"]["py/object"] == "pybit.models.Dist"
    assert data["transport"]["py/object"] == "pybit.models.Transport"


def test_round_trip():
    """What rbit writes, rbit reads back equal."""
    request = sample()
    request.stamp_request()
    assert pybit.decode_build_request(pybit.encode(request)) == request
    cancel = pybit.CancelRequest(request.job, "h:1")
    assert pybit.decode_cancel_request(pybit.encode(cancel)) == cancel


def test_pybit_reads_what_rbit_writes(pybit_installed):
    """PyBit's client, unpickling rbit's request, gets its own classes with the same values."""
    request = sample()
    request.stamp_request()
    theirs = unpickled(pybit.encode(request))
    assert isinstance(theirs, pybit_installed.BuildRequest)
    assert isinstance(theirs.job.packageinstance.build_env, pybit_installed.BuildEnv)
    for accessor in ACCESSORS:
        assert getattr(theirs, accessor)() == getattr(request, accessor)(), accessor
    assert theirs.transport.uri == "https://git.example/hello.git"


# -- hostile bodies: code in messages -----------------------------------------


@pytest.mark.parametrize("tag", FORBIDDEN_TAGS)
def test_forbidden_tag_at_top(tag):
    """A jsonpickle tag other than py/object is rejected, naming the tag."""
    data = request_data()
    data[tag] = ["os.system", "true"]
    assert rejected(data) == f"forbidden jsonpickle tag {tag!r} at $"


@pytest.mark.parametrize("tag", FORBIDDEN_TAGS)
def test_forbidden_tag_deep(tag):
    """A forbidden tag is found at any depth, in known and in ignored fields."""
    data = request_data()
    data["job"]["packageinstance"]["arch"]["name"] = {tag: "os.system"}
    assert rejected(data) == f"forbidden jsonpickle tag {tag!r} at $.job.packageinstance.arch.name"
    data = request_data()
    data["job"]["extra"] = [{"x": [[{tag: 1}]]}]
    assert rejected(data) == f"forbidden jsonpickle tag {tag!r} at $.job.extra[0].x[0][0]"


REDUCE = {"py/reduce": [{"py/function": "os.system"}, {"py/tuple": ["touch SENTINEL"]}]}


def test_reduce_payload_is_live(no_calls, tmp_path):
    """The py/reduce payload below really runs a command when jsonpickle decodes it.

    (Checked with os.system replaced by a recorder; this is what rbit must never do.)
    """
    payload = json.dumps(REDUCE).replace("SENTINEL", str(no_calls.sentinel))
    unpickled(payload)
    assert [name for name, _ in no_calls.calls] == ["os.system"]
    no_calls.calls.clear()


@pytest.mark.parametrize("where", ["body", "job", "arch", "extra", "web_host"])
def test_reduce_payload_never_runs(no_calls, where):
    """A body that would call os.system is rejected; nothing is called or imported."""
    payload = json.loads(json.dumps(REDUCE).replace("SENTINEL", str(no_calls.sentinel)))
    data = request_data()
    if where == "body":
        data = payload
    elif where == "job":
        data["job"] = payload
    elif where == "arch":
        data["job"]["packageinstance"]["arch"] = payload
    elif where == "extra":
        data["job"]["packageinstance"]["extra"] = payload
    else:
        data["web_host"] = payload
    for decode in (pybit.decode, pybit.decode_build_request, pybit.decode_cancel_request):
        assert "forbidden jsonpickle tag 'py/reduce'" in rejected(data, decode)


@pytest.mark.parametrize("payload", [
    {"py/object": "this.X"},
    {"py/type": "this.X"},
    {"py/mod": "this"},
    {"py/function": "this.f"},
    {"py/object": "pybit.models.Arch", "id": 1, "name": {"py/object": "this.X"}},
])
def test_nothing_named_is_imported(no_calls, payload):
    """A class or module named in a body is never imported (``this`` stays unimported)."""
    assert "this" not in sys.modules
    data = request_data()
    data["job"]["packageinstance"]["arch"] = payload
    rejected(data, pybit.decode)


@pytest.mark.parametrize("name", ["os.system", "subprocess.Popen", "builtins.eval",
                                  "pybit.models.Evil", "pybit.models", "pybit.models.Model",
                                  "pybit.models.BuildRequest.__init__", "Pybit.models.Job", ""])
def test_unknown_class(name):
    """A py/object naming anything but a known pybit.models class is rejected."""
    data = request_data()
    data["py/object"] = name
    assert rejected(data) == f"unknown class {name!r} at $"
    data = request_data()
    data["job"]["extra"] = {"py/object": name}
    assert rejected(data) == f"unknown class {name!r} at $.job.extra"


@pytest.mark.parametrize("value", [None, 1, ["pybit.models.Job"], {"a": 1}, True])
def test_class_name_must_be_a_string(value):
    """A py/object that is not a string is rejected."""
    data = request_data()
    data["job"]["py/object"] = value
    assert rejected(data).startswith("py/object at $.job must be a class name, not ")


def test_known_class_in_the_wrong_place():
    """Each position must hold the expected class ($.job must be a Job)."""
    data = request_data()
    data["job"]["py/object"] = "pybit.models.Arch"
    assert rejected(data) == "$.job must be a pybit.models.Job, not pybit.models.Arch"
    data = request_data()
    del data["transport"]["py/object"]
    assert rejected(data) == "$.transport must be a pybit.models.Transport, not a plain object"
    data = request_data()
    del data["py/object"]
    assert rejected(data, pybit.decode) == "body is a plain JSON object, not a PyBit request"


def _set(data, path, value):
    *parents, last = path.split(".")
    for key in parents:
        data = data[key]
    data[last] = value


@pytest.mark.parametrize("path, value, reason", [
    ("job.id", "42", "$.job.id must be an integer, not a string"),
    ("job.id", True, "$.job.id must be an integer, not a boolean"),
    ("job.id", 42.0, "$.job.id must be an integer, not a number"),
    ("job.id", None, "$.job.id must be an integer, not null"),
    ("job.packageinstance.id", "9", "$.job.packageinstance.id must be an integer, not a string"),
    ("job.packageinstance.package.id", False, "$.job.packageinstance.package.id must be an integer, not a boolean"),
    ("transport.id", [], "$.transport.id must be an integer, not a list"),
    ("job.packageinstance.package.name", 5, "$.job.packageinstance.package.name must be a string, not an integer"),
    ("job.packageinstance.package.version", None, "$.job.packageinstance.package.version must be a string, not null"),
    ("job.packageinstance.suite.name", {"a": 1}, "$.job.packageinstance.suite.name must be a string, not an object"),
    ("job.packageinstance.master", "yes", "$.job.packageinstance.master must be a boolean, not a string"),
    ("job.packageinstance.master", 1, "$.job.packageinstance.master must be a boolean, not an integer"),
    ("job.packageinstance.master", None, "$.job.packageinstance.master must be a boolean, not null"),
    ("job.buildclient", 5, "$.job.buildclient must be a pybit.models.BuildD, not an integer"),
    ("job.buildclient", "bob", "$.job.buildclient must be a pybit.models.BuildD, not a string"),
    ("web_host", 8080, "$.web_host must be a string, not an integer"),
    ("transport.method", None, "$.transport.method must be a string, not null"),
    ("transport.uri", ["u"], "$.transport.uri must be a string, not a list"),
    ("transport.vcs_id", 1.5, "$.transport.vcs_id must be a string or an integer, not a number"),
    ("transport.vcs_id", True, "$.transport.vcs_id must be a string or an integer, not a boolean"),
    ("timestamp", "now", "$.timestamp must be a number, not a string"),
    ("timestamp", True, "$.timestamp must be a number, not a boolean"),
    ("job.packageinstance.build_env", "squeeze", "$.job.packageinstance.build_env must be a pybit.models.BuildEnv, not a string"),
    ("job.packageinstance.arch", None, "$.job.packageinstance.arch must be a pybit.models.Arch, not null"),
    ("job.packageinstance", [], "$.job.packageinstance must be a pybit.models.PackageInstance, not a list"),
    ("transport", "git", "$.transport must be a pybit.models.Transport, not a string"),
])
def test_wrong_types(path, value, reason):
    """A field of the wrong type is rejected, naming the field and the types."""
    data = request_data()
    _set(data, path, value)
    assert rejected(data) == reason


@pytest.mark.parametrize("path", [
    "job", "transport", "web_host", "job.id", "job.packageinstance",
    "job.packageinstance.package", "job.packageinstance.arch", "job.packageinstance.suite",
    "job.packageinstance.distribution", "job.packageinstance.format", "job.packageinstance.master",
    "job.packageinstance.package.name", "job.packageinstance.package.version",
    "job.packageinstance.arch.name", "transport.method", "transport.uri",
])
def test_missing_required_field(path):
    """A missing required field is rejected, naming it and where it was expected."""
    data = request_data()
    *parents, last = path.split(".")
    holder = data
    for key in parents:
        holder = holder[key]
    del holder[last]
    where = ".".join(["$", *parents])
    assert rejected(data) == f"missing field {last!r} at {where}"


@pytest.mark.parametrize("path", [
    "timestamp", "job.buildclient", "job.packageinstance.id", "job.packageinstance.build_env",
    "job.packageinstance.package.id", "transport.id", "transport.vcs_id",
])
def test_missing_nullable_field_reads_as_none(path):
    """A field that may be null may also be missing; it reads as None."""
    data = request_data()
    *parents, last = path.split(".")
    holder = data
    for key in parents:
        holder = holder[key]
    del holder[last]
    request = pybit.decode_build_request(body(data))
    holder = request
    for key in path.split("."):
        holder = getattr(holder, key)
    assert holder is None


def test_strings_without_nul_and_bounded():
    """Strings holding NUL, lone surrogates or more than MAX_STRING_LENGTH characters are rejected."""
    data = request_data()
    data["job"]["packageinstance"]["package"]["name"] = "hello\0world"
    assert rejected(data) == "$.job.packageinstance.package.name contains a NUL character"
    data = request_data()
    data["transport"]["uri"] = "u" * (pybit.MAX_STRING_LENGTH + 1)
    assert rejected(data) == f"$.transport.uri is longer than {pybit.MAX_STRING_LENGTH} characters"
    data = request_data()
    data["transport"]["uri"] = "u" * pybit.MAX_STRING_LENGTH
    assert pybit.decode_build_request(body(data)).transport.uri == data["transport"]["uri"]
    text = controller_body(pybit_request()).replace('"hello"', '"\\ud800"')
    assert rejected(text) == "$.job.packageinstance.package.name contains a lone surrogate"


def test_body_too_big_is_rejected_before_parsing(monkeypatch):
    """A body over MAX_BODY_BYTES is rejected without being parsed."""
    text = controller_body(pybit_request())
    exact = (text + " " * (pybit.MAX_BODY_BYTES - len(text))).encode()
    assert pybit.decode_build_request(exact).get_job_id() == 42

    def never(*args, **kwargs):
        raise AssertionError("parsed a body that is too big")

    monkeypatch.setattr(json, "loads", never)
    for big in (exact + b" ", exact.decode() + " ", b"[" * (50 * pybit.MAX_BODY_BYTES)):
        assert rejected(big, pybit.decode) == f"body is larger than {pybit.MAX_BODY_BYTES} bytes"


def test_multibyte_text_counted_in_bytes():
    """The size limit is in bytes of UTF-8, also for a body handed over as text."""
    text = "é" * (pybit.MAX_BODY_BYTES // 2 + 1)
    assert rejected(text, pybit.decode) == f"body is larger than {pybit.MAX_BODY_BYTES} bytes"


@pytest.mark.parametrize("bomb", [
    "[" * 100_000 + "]" * 100_000,
    '{"a":' * 100_000 + "1" + "}" * 100_000,
    "[" * 100_000,
    '{"py/object": "pybit.models.BuildRequest", "job": ' + "[" * 100_000 + "]" * 100_000 + "}",
])
def test_depth_bombs(bomb):
    """Deeply nested JSON is rejected cleanly (never a RecursionError)."""
    reason = rejected(bomb, pybit.decode)
    assert "nest" in reason or "not JSON" in reason


def test_depth_limit():
    """Nesting up to MAX_DEPTH levels is read; one more is rejected."""
    def nested(depth):
        """A request whose deepest list is at *depth* (the body itself is at depth 1)."""
        data = request_data()
        value = 1
        for _ in range(depth - 1):
            value = [value]
        data["extra"] = value
        return data

    assert pybit.decode_build_request(body(nested(pybit.MAX_DEPTH))).get_job_id() == 42
    reason = rejected(nested(pybit.MAX_DEPTH + 1))
    assert reason.startswith(f"nesting deeper than {pybit.MAX_DEPTH} levels at $.extra")


@pytest.mark.parametrize("raw", [
    b"\xff\xfe{}",
    controller_body(pybit_request()).replace("hello", "h\xe9llo").encode("latin-1"),
    controller_body(pybit_request()).encode("utf-16"),
    b'{"py/object": "\xc3"}',
])
def test_invalid_utf8(raw):
    """A body that is not UTF-8 is rejected."""
    assert rejected(raw, pybit.decode).startswith("body is not UTF-8: ")


@pytest.mark.parametrize("raw", [
    b"", b"   ", b"not json", b"{", b"{'job': 1}", b'{"a": 1} trailing', b"\xef\xbb\xbf{}",
    controller_body(pybit_request()).encode()[:-1],
])
def test_not_json(raw):
    """A body that is not JSON is rejected, with the parser's reason."""
    assert rejected(raw, pybit.decode).startswith("body is not JSON: ")


@pytest.mark.parametrize("raw, kind", [
    (b"[]", "a list"), (b"[1, 2]", "a list"), (b"42", "an integer"), (b"4.5", "a number"),
    (b'"pybit.models.BuildRequest"', "a string"), (b"null", "null"), (b"true", "a boolean"),
])
def test_json_that_is_not_an_object(raw, kind):
    """JSON other than an object is not a PyBit request."""
    assert rejected(raw, pybit.decode) == f"body is {kind}, not a PyBit request"


@pytest.mark.parametrize("raw", [
    b'{"py/object": "pybit.models.BuildRequest", "py/object": "os.system"}',
    b'{"py/object": "os.system", "py/object": "pybit.models.BuildRequest"}',
    b'{"a": {"id": 1, "id": 2}}',
])
def test_duplicate_keys(raw):
    """Duplicate keys (which parsers resolve differently) are rejected."""
    assert rejected(raw, pybit.decode).startswith("duplicate key ")
    text = controller_body(pybit_request()).replace('"id": 42', '"id": 42, "id": 43')
    assert rejected(text) == "duplicate key 'id' in a JSON object"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity(constant):
    """NaN and Infinity are not JSON and are rejected."""
    text = controller_body(pybit_request()).replace('"timestamp": null', f'"timestamp": {constant}')
    assert rejected(text) == f"body contains {constant}, which is not JSON"


def test_numbers_out_of_range():
    """A float that overflows, or an integer too long to convert, is rejected."""
    text = controller_body(pybit_request())
    assert rejected(text.replace('"timestamp": null', '"timestamp": 1e400')) == "number out of range: '1e400'"
    huge = text.replace('"id": 42', '"id": ' + "9" * 5000)
    assert rejected(huge).startswith("body has an unreadable value: ")


def test_reason_stays_short():
    """The reason goes in a header: text quoted from the message is shortened."""
    data = request_data()
    data["job"]["py/" + "x" * 100_000] = 1
    assert len(rejected(data)) < 200
    data = request_data()
    data["x" * 100_000] = {"py/object": "y" * 100_000}
    assert len(rejected(data)) < 200


def test_decoded_request_shares_nothing_with_the_body():
    """The runner's request is built from scratch; extra fields are not carried along."""
    data = request_data()
    data["job"]["packageinstance"]["arch"]["evil"] = "x"
    request = pybit.decode_build_request(body(data))
    assert vars(request.job.packageinstance.arch) == {"id": 1, "name": "any"}
    assert copy.deepcopy(request) == request
