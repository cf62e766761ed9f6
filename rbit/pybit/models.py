"""rbit's own view of PyBit's ``pybit.models``: the request classes, with PyBit's accessors."""

import time
from dataclasses import dataclass


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
