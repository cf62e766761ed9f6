"""The ``deb`` runner: builds a Debian source package as PyBit's Debian build client does.

Configure it on a ``deb`` queue::

    [runner:Debian_amd64_unstable_deb]
    runner = python!rbitext.debian:build
    build-root = /var/cache/rbit/debian
    dput-dest = my-repository

For each request it

1. fetches the source named by the request's transport into a fresh work
   directory under ``build-root``: ``git`` (clone, then check out ``vcs_id``
   when set) or ``svn`` (export at ``vcs_id``, else HEAD);
2. checks the build dependencies with ``dpkg-checkbuilddeps``: unmet ones
   raise :class:`rbit.Blocked`, so the job is offered again later;
3. builds with ``dpkg-buildpackage -us -uc -d`` (unsigned; dependencies are
   checked in step 2), or with the ``builder`` command. As in PyBit, the
   master request of a package builds the source and every binary package;
   the requests for the other architectures build with ``-B``
   (architecture-dependent binaries only), and do nothing when every binary
   package is ``Architecture: all``;
4. copies the results (every file the build left in the work directory) to
   ``output-dir/JOB``; when ``dput-dest`` is set and ``dry-run`` is not,
   uploads each ``.changes`` with ``dput`` and reports ``Uploaded``;
5. removes the work directory, which ``keep-failed = true`` keeps after a
   failure.

Every command and its output go to the runner's standard output, which the
worker keeps as the job's log (one file per attempt: ``rbit logs CONFIG JOB``).
A failure raises :class:`rbit.Failed` with the last lines of that output.

Settings (all strings; flags are ``true`` or ``false``), checked when the
configuration is read (``build.check_settings``), so that a mistake stops
``rbit CONFIG``, ``--check`` and ``rbit try`` before any connection, naming the key:

================  ==========================  =========================================
key               default                     meaning
================  ==========================  =========================================
build-root        ``$TMPDIR/rbit-debian``     absolute path; ``work/`` and (by
                                              default) ``output/`` go there
output-dir        ``BUILD-ROOT/output``       absolute path; results go to ``JOB/`` in it
builder           dpkg-buildpackage (above)   the build command, split like a shell
                                              line; placeholders below
check-build-deps  ``true``                    run ``dpkg-checkbuilddeps`` first (turn it
                                              off for chroot builders such as sbuild)
dput-dest         (none: no upload)           the dput host (a section of dput.cf)
dput-options      (none)                      more dput arguments, e.g. ``-U``
dry-run           ``false``                   build, but do not upload
keep-failed       ``false``                   keep the work directory after a failure
================  ==========================  =========================================

The ``builder`` command runs in the unpacked source tree and must leave its
results in the work directory (dpkg-buildpackage writes to ``..``, which is
it). Each placeholder is replaced inside its own argument, so a value never
adds an argument: ``%DIR`` the source tree, ``%WORK`` the work directory,
``%DSC`` the ``.dsc`` (built first with ``dpkg-source --build`` when the
command names it), the request's ``%ID``, ``%PACKAGE``, ``%VERSION``,
``%DIST``, ``%ARCH``, ``%SUITE``, ``%FORMAT``, ... (as for ``shell!``), and
``%%``. Put request values after an ``=`` (``--dist=%SUITE``) so that none can
be read as an option. For example::

    builder = sbuild --dist=%SUITE --arch-all --source --build-dir=%WORK %DSC
    check-build-deps = false

Nothing from a message reaches a shell: commands are argument lists, and
``--`` separates options from a URI.
"""

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rbit import statuses
from rbit.errors import Blocked, ConfigError, Failed
from rbit.runners.shell import PLACEHOLDERS as REQUEST_PLACEHOLDERS
from rbit.runners.shell import job_environment, placeholder_pattern
from rbit.runners.shell import substitute as shell_substitute
from rbit.settings import check_known, parse_flag

log = logging.getLogger(__name__)

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
SOURCE_DIR = "source"

#: Lines of the build log quoted in a Failed message.
TAIL_LINES = 20

#: Bytes of the newest output kept for that quote.
TAIL_BYTES = 64 * 1024

#: Seconds to wait, after a command exits, for output still held by a process it left behind.
OUTPUT_DRAIN_TIMEOUT = 5.0

#: What ``dpkg-checkbuilddeps`` says (in the C locale) before the dependencies it misses.
_UNMET = re.compile(r"(Unmet build dependencies|Build conflicts): (.*)")

#: The ``Architecture`` field of a paragraph of ``debian/control``.
_ARCHITECTURE = re.compile(r"^Architecture:[ \t]*(.*)$", re.IGNORECASE | re.MULTILINE)

#: Environment of every command: the C locale (for reading dpkg's words), no prompts.
QUIET_ENV = {"LC_ALL": "C.UTF-8", "GIT_TERMINAL_PROMPT": "0"}


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


def build(message, set_status, settings):
    """Fetch, check, build and upload the package *message* asks for (contract §4)."""
    options = parse_settings(settings)  # checked at start (build.check_settings): only typed here
    job_id = message.job_id
    prepare_build_root(options.build_root)
    with BuildLog() as build_log:
        build_log.note(f"{time.strftime('%Y-%m-%d %H:%M:%S')} job {job_id}: "
                       f"{message.request.get_package()} {message.request.get_version()} "
                       f"from {message.queue}")
        work = make_work_dir(options.build_root, job_id)
        try:
            _build_in(work, message, set_status, options, build_log)
        except Blocked:
            clean(work)
            raise
        except BaseException:
            if options.keep_failed:
                log.info("clean: keeping the work directory %s", work)
            else:
                clean(work)
            raise
        clean(work)


def _build_in(work, message, set_status, options, build_log):
    """The phases of one job, in *work*."""
    request = message.request
    fields = {**request.fields(), "QUEUE": message.queue}
    env = {**job_environment(fields, {}), **QUIET_ENV}
    source = fetch(request.transport, work / SOURCE_DIR, build_log, env)
    builder = choose_builder(options, request.job.packageinstance.master, source)
    if builder is None:
        return
    if options.check_build_deps:
        check_build_deps(source, build_log, env, arch_only=builder == ARCH_BUILDER)
    run_builder(builder, source, fields, build_log, env)
    results = collect(work, options.output_dir / str(request.get_job_id()))
    if upload_wanted(options):
        upload(results, options, build_log, env)
        set_status(statuses.UPLOADED)


def choose_builder(options, master, source):
    """The build command template for the request; None when it has nothing to build."""
    if options.builder:
        return options.builder
    if master:
        return MASTER_BUILDER
    if has_arch_binaries(source):
        return ARCH_BUILDER
    log.info("build: nothing to build: every binary package is Architecture: all, "
             "which the master request builds")
    return None


def upload_wanted(options):
    """True when the results go to ``dput-dest``."""
    if options.dput_dest is None:
        return False
    if options.dry_run:
        log.info("upload: dry run, not uploading to %s", options.dput_dest)
        return False
    return True


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


#: rbit checks the settings with this when it reads the configuration.
build.check_settings = parse_settings


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


# -- the job's files ----------------------------------------------------------------


def prepare_build_root(build_root):
    """Make *build_root* (private to this user) if needed; refuse one another user owns."""
    try:
        build_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = build_root.stat().st_uid
    except OSError as exc:
        raise Failed(f"cannot make the build root {build_root}: {exc.strerror}") from None
    if owner != os.getuid():
        raise Failed(f"the build root {build_root} belongs to another user (uid {owner}); "
                     "set build-root to a directory of this user's")


def make_work_dir(build_root, job_id):
    """A fresh, empty work directory for the job under *build_root*."""
    parent = build_root / "work"
    try:
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{job_id}-", dir=parent))
    except OSError as exc:
        raise Failed(f"cannot make a work directory in {parent}: {exc.strerror}") from None


def clean(work):
    """Remove the work directory."""
    log.info("clean: removing %s", work)
    shutil.rmtree(work, ignore_errors=True)


class BuildLog:
    """Each command, and its output, on standard output (the job's log); the newest kept for quotes."""

    def __init__(self):
        self.kept = b""
        self.lock = threading.Lock()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        sys.stdout.flush()

    def note(self, text):
        """Write a line of rbit's own."""
        self._emit(f"== {text}\n".encode("utf-8", "replace"))

    def run(self, argv, cwd=None, env=None, capture=False):
        """Run *argv* (a list, never a shell line), its output going to the log.

        Returns the exit status, or ``(status, output)`` with *capture*.
        """
        self.note("$ " + shlex.join(argv))
        try:
            process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        except FileNotFoundError:
            self.note(f"{argv[0]}: not found")
            raise Failed(f"{argv[0]} is not installed on this build client") from None
        except OSError as exc:
            self.note(f"{argv[0]}: {exc.strerror}")
            raise Failed(f"cannot run {argv[0]}: {exc.strerror}") from None
        captured = [] if capture else None
        copier = threading.Thread(target=self._copy, args=(process.stdout, captured), daemon=True)
        copier.start()
        code = process.wait()
        # A process the command left behind may hold its output open: do not wait for it long.
        copier.join(OUTPUT_DRAIN_TIMEOUT)
        if not capture:
            return code
        return code, b"".join(captured).decode("utf-8", "replace")

    def _copy(self, output, captured):
        with output:
            while chunk := output.read1(1 << 16):
                self._emit(chunk)
                if captured is not None:
                    captured.append(chunk)

    def _emit(self, data):
        with self.lock:
            self.kept = (self.kept + data)[-TAIL_BYTES:]
            sys.stdout.flush()
            try:
                sys.stdout.buffer.write(data)
            except AttributeError:  # a text-only stdout
                sys.stdout.write(data.decode("utf-8", "replace"))
            sys.stdout.flush()

    def tail(self, lines=TAIL_LINES):
        """The last *lines* lines written by this attempt."""
        with self.lock:
            last = self.kept.decode("utf-8", "replace").splitlines()[-lines:]
        return "\n".join(last)

    def failed(self, what, code=None):
        """The :class:`rbit.Failed` for *what*, a command that exited with status *code*."""
        status = "" if code is None else f" (exit status {code})"
        return Failed(f"{what} failed{status}; the job's log ends:\n{self.tail()}")


# -- fetch ----------------------------------------------------------------------------


def fetch(transport, dest, build_log, env=None):
    """Put the source named by *transport* in *dest* (new, in an existing directory); return *dest*."""
    method = transport.method
    fetcher = FETCHERS.get(method)
    if fetcher is None:
        raise Failed(f"cannot fetch the source: unknown transport method {method!r} "
                     f"(this build client knows {', '.join(sorted(FETCHERS))})")
    log.info("fetch: %s %s at %s", method, transport.uri, transport.vcs_id or "its head")
    fetcher(transport.uri, transport.vcs_id, dest, build_log, env)
    return dest


def fetch_git(uri, vcs_id, dest, build_log, env=None):
    """Clone *uri* into *dest* and check out *vcs_id* when it is set."""
    if vcs_id and vcs_id.startswith("-"):
        raise Failed(f"cannot fetch the source: {vcs_id!r} is not a git revision")
    code = build_log.run(["git", "-c", "protocol.ext.allow=never", "clone", "--quiet",
                          "--", uri, str(dest)], cwd=dest.parent, env=env)
    if code:
        raise build_log.failed(f"git clone of {uri}", code)
    if vcs_id:
        code = build_log.run(["git", "-c", "advice.detachedHead=false", "checkout",
                              "--quiet", "--detach", vcs_id], cwd=dest, env=env)
        if code:
            raise build_log.failed(f"git checkout of {vcs_id}", code)


def fetch_svn(uri, vcs_id, dest, build_log, env=None):
    """Export *uri* at revision *vcs_id* (HEAD when not set) into *dest*."""
    revision = vcs_id or "HEAD"
    code = build_log.run(["svn", "export", "--non-interactive", "--quiet",
                          f"--revision={revision}", "--", uri, str(dest)], cwd=dest.parent, env=env)
    if code:
        raise build_log.failed(f"svn export of {uri}@{revision}", code)


#: The fetcher of each transport method.
FETCHERS = {"git": fetch_git, "svn": fetch_svn}


# -- check, build, collect, upload -----------------------------------------------------------


def check_build_deps(source, build_log, env=None, arch_only=False):
    """Raise :class:`rbit.Blocked` naming the build dependencies this host lacks.

    *arch_only* leaves out ``Build-Depends-Indep``, as for a ``-B`` build.
    """
    log.info("checkbuilddeps: %s", source)
    argv = ["dpkg-checkbuilddeps", *(["-B"] if arch_only else [])]
    code, output = build_log.run(argv, cwd=source, env=env, capture=True)
    if not code:
        return
    unmet = "; ".join(f"{kind}: {deps.strip()}" for kind, deps in _UNMET.findall(output))
    if unmet:
        log.info("checkbuilddeps: %s", unmet)
        raise Blocked(unmet)
    raise build_log.failed("dpkg-checkbuilddeps", code)


def has_arch_binaries(source):
    """True when ``debian/control`` in *source* has a binary package not ``Architecture: all``."""
    try:
        text = (source / "debian" / "control").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True  # let the build say what is wrong
    paragraphs = re.split(r"\n\s*\n", text.strip())
    for paragraph in paragraphs[1:]:
        match = _ARCHITECTURE.search(paragraph)
        if match is None or match.group(1).split() != ["all"]:
            return True
    return False


def substitute(template, values):
    """*template*'s arguments with each placeholder replaced inside its own argument."""
    return shell_substitute(template, values, _PLACEHOLDER)


def run_builder(template, source, fields, build_log, env=None):
    """Build the package in *source* with the command *template*."""
    work = source.parent
    values = {**fields, "DIR": str(source), "WORK": str(work)}
    if any("%DSC" in arg for arg in template):
        values["DSC"] = str(build_source_package(source, build_log, env))
    argv = substitute(template, values)
    log.info("build: %s", shlex.join(argv))
    code = build_log.run(argv, cwd=source, env=env)
    if code:
        raise build_log.failed(f"the build ({argv[0]})", code)


def build_source_package(source, build_log, env=None):
    """Build the ``.dsc`` of *source* next to it, and return its path."""
    log.info("build: dpkg-source --build %s", source)
    code = build_log.run(["dpkg-source", "--build", str(source)], cwd=source.parent, env=env)
    if code:
        raise build_log.failed("dpkg-source --build", code)
    dscs = sorted(source.parent.glob("*.dsc"))
    if len(dscs) != 1:
        raise build_log.failed(f"dpkg-source --build (made {len(dscs)} .dsc files, not one)")
    return dscs[0]


def collect(work, output):
    """Copy the files the build left in *work* to *output*; return their new paths."""
    output.mkdir(parents=True, exist_ok=True)
    results = []
    for path in sorted(work.iterdir()):
        if path.is_file() and not path.is_symlink():
            results.append(Path(shutil.copy2(path, output / path.name)))
    log.info("build: %d files copied to %s", len(results), output)
    return results


def upload(results, options, build_log, env=None):
    """Upload each ``.changes`` in *results* to ``dput-dest``."""
    changes = [path for path in results if path.suffix == ".changes"]
    if not changes:
        raise build_log.failed("the upload (the build made no .changes file)")
    for path in changes:
        log.info("upload: %s to %s", path.name, options.dput_dest)
        code = build_log.run(["dput", *options.dput_options, options.dput_dest, str(path)],
                             cwd=path.parent, env=env)
        if code:
            raise build_log.failed(f"dput of {path.name} to {options.dput_dest}", code)
