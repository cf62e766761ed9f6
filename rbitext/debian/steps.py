"""The Debian runner's steps: the work directory, fetching, checking, building, collecting, uploading."""

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from rbit.errors import Blocked, Failed
from rbit.runners.shell import substitute as shell_substitute

from .settings import _PLACEHOLDER

log = logging.getLogger(__package__)  # one logger for the runner, whichever module speaks

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
