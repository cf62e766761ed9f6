"""Test helpers for the Debian runner: a tiny Debian source package in a local git repository."""

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

#: Name of the test package (source and binary).
PACKAGE = "rbit-hello"

#: A package in the build dependencies that no archive has.
MISSING_PACKAGE = "rbit-no-such-package"

#: Who makes the test commits (git refuses to commit without a name).
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "rbit tests", "GIT_AUTHOR_EMAIL": "rbit@example.invalid",
    "GIT_COMMITTER_NAME": "rbit tests", "GIT_COMMITTER_EMAIL": "rbit@example.invalid",
}

#: The programs the Debian runner's tests need; CI installs them (dpkg-dev, debhelper, git, ...).
TOOLS = ("git", "dpkg-buildpackage", "dpkg-checkbuilddeps", "dpkg-source", "dh")

CONTROL = """\
    Source: {name}
    Section: misc
    Priority: optional
    Maintainer: rbit tests <rbit@example.invalid>
    Build-Depends: {build_depends}
    Standards-Version: 4.6.2
    Rules-Requires-Root: no

    Package: {name}
    Architecture: {architecture}
    Description: tiny package built by rbit's tests
     It installs one text file.
    """

CHANGELOG = """\
    {name} ({version}) unstable; urgency=medium

      * Built by rbit's tests.

     -- rbit tests <rbit@example.invalid>  Mon, 01 Jan 2024 00:00:00 +0000
    """

RULES = "#!/usr/bin/make -f\n%:\n\tdh $@\n"


def require_tools(*names):
    """Fail (never skip) when a program the test needs is missing: CI installs them."""
    missing = [name for name in names or TOOLS if shutil.which(name) is None]
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)} "
                    "(apt-get install dpkg-dev debhelper build-essential fakeroot git subversion)")


def git(repo, *args):
    """Run git in *repo*; its stdout, stripped."""
    done = subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_IDENTITY})
    return done.stdout.strip()


def write_package(tree, *, name=PACKAGE, version="1.0", build_depends="debhelper-compat (= 13)",
                  architecture="all"):
    """Write a native Debian source package of one binary package into the directory *tree*."""
    tree = Path(tree)
    (tree / "debian" / "source").mkdir(parents=True, exist_ok=True)
    files = {
        "debian/control": textwrap.dedent(CONTROL).format(
            name=name, build_depends=build_depends, architecture=architecture),
        "debian/changelog": textwrap.dedent(CHANGELOG).format(name=name, version=version),
        "debian/source/format": "3.0 (native)\n",
        "debian/install": "hello.txt usr/share/rbit-hello/\n",
        "debian/rules": RULES,
        "hello.txt": f"Hello from {name} {version}.\n",
    }
    for relative, text in files.items():
        (tree / relative).write_text(text)
    (tree / "debian" / "rules").chmod(0o755)


def make_repo(path, versions=("1.0",), **package):
    """A git repository at *path* with one commit per version; returns the commits' ids."""
    path = Path(path)
    path.mkdir(parents=True)
    git(path, "init", "--quiet", "--initial-branch=main")
    commits = []
    for version in versions:
        write_package(path, version=version, **package)
        git(path, "add", "--all")
        git(path, "commit", "--quiet", "-m", f"Version {version}")
        commits.append(git(path, "rev-parse", "HEAD"))
    return commits


def fake_dput(directory):
    """A ``dput`` program in *directory* that records its arguments, one a line, in ``dput.args``.

    Returns the record file's path; put *directory* first on the worker's PATH.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = directory / "dput.args"
    program = directory / "dput"
    program.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> "{record}"\n')
    program.chmod(0o755)
    return record
