"""The Debian runner's settings: their defaults, and reading them into typed :class:`Options`."""

import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rbit.errors import ConfigError
from rbit.runners.shell import PLACEHOLDERS as REQUEST_PLACEHOLDERS
from rbit.runners.shell import placeholder_pattern
from rbit.settings import check_known, parse_flag

#: Every setting this runner reads, with its default as written in an ini file.
DEFAULTS = {
    "build-root": "",
    "output-dir": "",
    "builder": "",
    "check-build-deps": "true",
    "dput-dest": "",
    "dput-options": "",
    "dry-run": "false",
    "keep-failed": "false",
}

#: The build root when ``build-root`` is not set.
DEFAULT_BUILD_ROOT = Path(tempfile.gettempdir()) / "rbit-debian"

#: The build command for PyBit's master build of a package: source and every binary.
MASTER_BUILDER = ("dpkg-buildpackage", "-us", "-uc", "-d")

#: The build command for the other architectures: architecture-dependent binaries only.
ARCH_BUILDER = MASTER_BUILDER + ("-B",)

#: Placeholders of ``builder`` that name a path of the job; the request's come from ``shell!``.
PATH_PLACEHOLDERS = ("DIR", "WORK", "DSC")

#: Every placeholder of ``builder``.
_PLACEHOLDER = placeholder_pattern(PATH_PLACEHOLDERS + REQUEST_PLACEHOLDERS)

#: Name of the source tree inside a job's work directory.


@dataclass(frozen=True)
class Options:
    """The runner's settings, checked and typed."""

    build_root: Path
    output_dir: Path
    builder: tuple | None
    check_build_deps: bool
    dput_dest: str | None
    dput_options: tuple
    dry_run: bool
    keep_failed: bool


# -- settings -------------------------------------------------------------------


def parse_settings(settings):
    """The :class:`Options` in *settings* (a dict of str); ConfigError names a mistaken key."""
    check_known(settings, DEFAULTS)
    values = {key: (settings.get(key) or default).strip() for key, default in DEFAULTS.items()}
    build_root = _path(values, "build-root") or DEFAULT_BUILD_ROOT
    return Options(
        build_root=build_root,
        output_dir=_path(values, "output-dir") or build_root / "output",
        builder=_builder(values["builder"]),
        check_build_deps=parse_flag(values["check-build-deps"], "check-build-deps"),
        dput_dest=values["dput-dest"] or None,
        dput_options=tuple(_split(values, "dput-options")),
        dry_run=parse_flag(values["dry-run"], "dry-run"),
        keep_failed=parse_flag(values["keep-failed"], "keep-failed"),
    )


def _path(values, key):
    if not values[key]:
        return None
    path = Path(values[key])
    if not path.is_absolute():
        raise ConfigError(f"must be an absolute path, not {values[key]!r}", key=key)
    return path


def _split(values, key):
    try:
        return shlex.split(values[key])
    except ValueError as exc:
        raise ConfigError(f"cannot split like a shell line: {exc}", key=key) from None


def _builder(line):
    """The ``builder`` line as an argument template, or None for the default."""
    if not line:
        return None
    argv = _split({"builder": line}, "builder")
    for arg in argv:
        leftover = _PLACEHOLDER.sub("", arg)
        if "%" in leftover:
            known = ", ".join("%" + name for name in PATH_PLACEHOLDERS + REQUEST_PLACEHOLDERS)
            raise ConfigError(f"unknown placeholder in argument {arg!r}; known: {known}, %%",
                              key="builder")
    return tuple(argv)
