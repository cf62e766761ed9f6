"""PyBit's wire format: reading build requests safely and writing them as PyBit does."""

import json
import re
import math
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import jsonpickle

from .errors import BadMessage

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


# -- rbit's own view of PyBit's pybit.models ----------------------------------


@dataclass
class Package:
    """A source package at one version."""

    id: int | None
    name: str
    version: str


@dataclass
class Arch:
    """An architecture (``any``, ``i386``, ...)."""

    id: int | None
    name: str


@dataclass
class Suite:
    """A suite (``latex``, ``unstable``, ...)."""

    id: int | None
    name: str


@dataclass
class Dist:
    """A distribution (``cnx``, ``Debian``, ...)."""

    id: int | None
    name: str


@dataclass
class Format:
    """A package format (``pdf``, ``deb``, ...)."""

    id: int | None
    name: str


@dataclass
class BuildEnv:
    """A build environment."""

    id: int | None
    name: str


@dataclass
class PackageInstance:
    """A package to build for one distribution, architecture, suite and format."""

    id: int | None
    package: Package
    arch: Arch
    build_env: BuildEnv | None
    suite: Suite
    distribution: Dist
    format: Format
    master: bool


@dataclass
class BuildD:
    """A build client as PyBit knows it (``buildclient`` of a job that one is building)."""

    id: int | None
    name: str


@dataclass
class Job:
    """One build job; ``buildclient`` is the client building it, if any."""

    id: int
    packageinstance: PackageInstance
    buildclient: BuildD | None

    @property
    def client_name(self) -> str | None:
        """The name of the build client PyBit gave the job to, or None."""
        return None if self.buildclient is None else self.buildclient.name


@dataclass
class Transport:
    """Where the source comes from: a VCS ``method``, its ``uri`` and revision."""

    id: int | None
    method: str
    uri: str
    vcs_id: str | None


@dataclass
class BuildRequest:
    """A request to build one job, with PyBit's accessors."""

    job: Job
    transport: Transport
    web_host: str
    timestamp: int | float | None = None

    def get_job_id(self):
        return self.job.id

    def get_package(self):
        return self.job.packageinstance.package.name

    def get_version(self):
        return self.job.packageinstance.package.version

    def get_arch(self):
        return self.job.packageinstance.arch.name

    def get_dist(self):
        return self.job.packageinstance.distribution.name

    def get_suite(self):
        return self.job.packageinstance.suite.name

    def get_format(self):
        return self.job.packageinstance.format.name

    def get_buildenv(self):
        build_env = self.job.packageinstance.build_env
        return None if build_env is None else build_env.name

    def stamp_request(self):
        self.timestamp = int(time.time())

    def get_buildstamp(self):
        return self.timestamp

    def fields(self):
        """The request's fields by placeholder name, as strings (``""`` for none)."""
        values = {
            "ID": self.get_job_id(),
            "PACKAGE": self.get_package(),
            "VERSION": self.get_version(),
            "DIST": self.get_dist(),
            "ARCH": self.get_arch(),
            "SUITE": self.get_suite(),
            "FORMAT": self.get_format(),
            "BUILDENV": self.get_buildenv(),
            "METHOD": self.transport.method,
            "URI": self.transport.uri,
            "VCS_ID": self.transport.vcs_id,
            "WEB_HOST": self.web_host,
        }
        return {key: "" if value is None else str(value) for key, value in values.items()}


@dataclass
class CancelRequest:
    """PyBit's request to stop a job, sent to the building client's own queue."""

    job: Job
    web_host: str

    def get_job_id(self):
        return self.job.id


# -- the shape of each class on the wire --------------------------------------


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


# -- reading ------------------------------------------------------------------


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


# -- writing ------------------------------------------------------------------


def _to_wire(obj):
    """*obj* with rbit's model objects in it replaced by their ``pybit.models`` stand-ins."""
    fields = _FIELDS.get(type(obj))
    if fields is None:
        return obj
    wire = _WIRE_CLASSES[type(obj)]()
    for field in fields:
        setattr(wire, field.name, _to_wire(getattr(obj, field.name)))
    return wire


def encode(obj) -> str:
    """*obj* (a BuildRequest, CancelRequest or a part of one) as PyBit's jsonpickle JSON."""
    pickler = jsonpickle.Pickler(unpicklable=True, make_refs=False)
    return jsonpickle.encode(_to_wire(obj), context=pickler)


def make_request(
    job_id,
    package,
    version,
    distribution,
    architecture,
    suite,
    format,
    method="git",
    uri="",
    vcs_id=None,
    web_host="localhost:8080",
    buildenv=None,
    master=True,
    buildclient=None,
    *,
    package_id=None,
    packageinstance_id=None,
    arch_id=None,
    suite_id=None,
    dist_id=None,
    format_id=None,
    buildenv_id=None,
    transport_id=None,
) -> BuildRequest:
    """A BuildRequest made from plain fields, as PyBit's controller would make it.

    Raises :class:`~rbit.errors.BadMessage` if a worker would refuse it.
    """
    instance = PackageInstance(
        id=packageinstance_id,
        package=Package(package_id, package, version),
        arch=Arch(arch_id, architecture),
        build_env=None if buildenv is None else BuildEnv(buildenv_id, buildenv),
        suite=Suite(suite_id, suite),
        distribution=Dist(dist_id, distribution),
        format=Format(format_id, format),
        master=master,
    )
    request = BuildRequest(
        job=Job(job_id, instance, None if buildclient is None else BuildD(None, buildclient)),
        transport=Transport(transport_id, method, uri, vcs_id),
        web_host=web_host,
    )
    return decode_build_request(encode(request))
