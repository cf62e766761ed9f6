"""Writing PyBit's requests as PyBit does: jsonpickle with ``pybit.models`` tags, no references."""

import jsonpickle

from .models import (
    Arch, BuildD, BuildEnv, BuildRequest, Dist, Format, Job, Package, PackageInstance, Suite, Transport,
)
from .reading import decode_build_request
from .schema import _FIELDS, _WIRE_CLASSES


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
