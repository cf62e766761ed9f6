"""PyBit's own ``pybit.models`` classes, test-side, to publish requests exactly as PyBit does.

The real ``pybit.models`` is never importable on a worker (rbit reads bodies as plain JSON,
never unpickled), so the
tests carry copies of its classes, shaped like PyBit's (same constructors,
same attribute order, same accessors) and claiming the module name
``pybit.models`` so that jsonpickle tags them as PyBit's controller does.
:func:`request_body` is what PyBit's controller puts on a build queue.
"""

import time

import jsonpickle

PYBIT_MODULE = "pybit.models"


class Model:
    """Base of PyBit's model classes."""


class Arch(Model):
    def __init__(self, arch_id, name):
        self.id = arch_id
        self.name = name


class Dist(Arch):
    pass


class Format(Arch):
    pass


class Suite(Arch):
    pass


class BuildEnv(Arch):
    pass


class Package(Model):
    def __init__(self, package_id, version, name):
        self.id = package_id
        self.version = version
        self.name = name


class Transport(Model):
    def __init__(self, transport_id, method, uri, vcs_id):
        self.id = transport_id
        self.method = method
        self.uri = uri
        self.vcs_id = vcs_id


class PackageInstance(Model):
    def __init__(self, packageinstance_id, package, arch, build_env, suite, distribution, pkg_format, master):
        self.id = packageinstance_id
        self.package = package
        self.arch = arch
        self.build_env = build_env
        self.suite = suite
        self.distribution = distribution
        self.format = pkg_format
        self.master = master


class Job(Model):
    def __init__(self, job_id, packageinstance, buildclient):
        self.id = job_id
        self.packageinstance = packageinstance
        self.buildclient = buildclient


class BuildRequest(Model):
    def __init__(self, job, transport, web_host, commands=None):
        self.job = job
        self.transport = transport
        self.web_host = web_host
        self.commands = commands
        self.timestamp = None

    def stamp_request(self):
        self.timestamp = int(time.time())

    def get_buildstamp(self):
        return self.timestamp

    def get_suite(self):
        return self.job.packageinstance.suite.name

    def get_package(self):
        return self.job.packageinstance.package.name

    def get_version(self):
        return self.job.packageinstance.package.version

    def get_arch(self):
        return self.job.packageinstance.arch.name

    def get_job_id(self):
        return self.job.id

    def get_dist(self):
        return self.job.packageinstance.distribution.name

    def get_format(self):
        return self.job.packageinstance.format.name

    def get_buildenv(self):
        if self.job.packageinstance.build_env is not None:
            return self.job.packageinstance.build_env.name
        return None


class BuildD(Model):
    """A build client; PyBit puts one in ``Job.buildclient`` for a job it is building."""

    def __init__(self, buildd_id, name):
        self.id = buildd_id
        self.name = name


class CancelRequest(Model):
    def __init__(self, job, web_host):
        self.job = job
        self.web_host = web_host

    def get_job_id(self):
        return self.job.id


for _cls in (Model, Arch, Dist, Format, Suite, BuildEnv, Package, Transport,
             PackageInstance, Job, BuildRequest, CancelRequest, BuildD):
    _cls.__module__ = PYBIT_MODULE
del _cls


def build_request(job_id, package="hello", version="1.0-1", dist="cnx", arch="any", suite="latex",
                  fmt="pdf", web_host="pybit.example:8080", buildenv=None, method="git",
                  uri="https://git.example/hello.git", vcs_id="abc123", buildclient=None):
    """A BuildRequest made as PyBit's controller makes it."""
    instance = PackageInstance(
        job_id + 1000, Package(job_id + 2000, version, package), Arch(1, arch),
        BuildEnv(5, buildenv) if buildenv else None, Suite(2, suite), Dist(3, dist),
        Format(4, fmt), True,
    )
    return BuildRequest(Job(job_id, instance, buildclient), Transport(None, method, uri, vcs_id), web_host)


def encode(obj):
    """``jsonpickle.encode(obj)`` as PyBit calls it: jsonpickle's defaults (refs on, keys off)."""
    return jsonpickle.encode(obj, context=jsonpickle.Pickler(make_refs=True, keys=False))


def request_body(job_id, package="hello", version="1.0-1", dist="cnx", arch="any", suite="latex",
                 fmt="pdf", web_host="pybit.example:8080", **more):
    """The text PyBit's controller publishes for a build request: ``jsonpickle.encode(request)``."""
    return encode(build_request(job_id, package, version, dist, arch, suite, fmt, web_host, **more))


def cancel_body(job_id, client, web_host="pybit.example:8080", **more):
    """The text PyBit's web front end publishes to cancel a job that *client* is building: its
    ``job.buildclient`` is always a BuildD (see tests/pybit_wire/cancel_request.json)."""
    request = build_request(job_id, web_host=web_host, buildclient=BuildD(1, client), **more)
    return encode(CancelRequest(request.job, web_host))


def queue_name(dist, arch, suite, fmt):
    """PyBit's build queue name ``dist_arch_suite_format``."""
    return f"{dist}_{arch}_{suite}_{fmt}"


def routing_key(dist, arch, suite, fmt):
    """PyBit's routing key ``dist.arch.suite.format``."""
    return f"{dist}.{arch}.{suite}.{fmt}"
