"""The Debian runner ``rbitext.debian:build``: fetch, check, build, upload, clean.

The unit tests call the runner in this process; the worker tests run the whole
``python -m rbit`` on the real broker, building a real (tiny) package with
dpkg-buildpackage. Both fail, never skip, when a tool is missing.
"""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from rbit.errors import Blocked, ConfigError, Failed
from rbit.message import Message
from rbit.pybit import encode, make_request
from rbitext import debian

from .debian_fixtures import MISSING_PACKAGE, PACKAGE, fake_dput, make_repo, require_tools
from .harness import WorkerProcess, job_log, offline_config, write_config
from .pybit_models import request_body
from .test_config import check_one_line
from .test_tools import rbit

#: Seconds a worker test waits for a job's final status (a build takes a few seconds).
JOB_TIMEOUT = 90

#: The runner line of the worker tests.
RUNNER = "python!rbitext.debian:build"


@pytest.fixture(autouse=True)
def tools():
    """Every test here needs git and the Debian build tools."""
    require_tools()


def request_for(uri, vcs_id=None, *, method="git", job_id=7, version="1.0", suite="unstable",
                web_host="localhost:8080", master=True):
    """A BuildRequest for the test package, as PyBit's controller makes it."""
    return make_request(job_id, PACKAGE, version, "Debian", "amd64", suite, "deb",
                        method=method, uri=str(uri), vcs_id=vcs_id, web_host=web_host,
                        master=master)


def run_build(request, settings):
    """Call the runner in this process; the statuses it reported."""
    reported = []
    message = Message(encode(request), request, "Debian_amd64_unstable_deb")
    debian.build(message, lambda status, text=None: reported.append(status), settings)
    return reported


def leftover_work(build_root):
    """The work directories the runner left under *build_root*."""
    work = Path(build_root) / "work"
    return sorted(work.iterdir()) if work.exists() else []


# -- unit tests: the runner in this process ------------------------------------------


def test_settings_defaults():
    """No settings: a temp build root, output in it, dpkg-buildpackage, no upload."""
    options = debian.parse_settings({})
    assert options.build_root == debian.DEFAULT_BUILD_ROOT
    assert options.output_dir == debian.DEFAULT_BUILD_ROOT / "output"
    assert options.builder is None
    assert options.check_build_deps is True
    assert options.dput_dest is None
    assert (options.dry_run, options.keep_failed) == (False, False)


@pytest.mark.parametrize("settings, key, words", [
    ({"dry-run": "maybe"}, "dry-run", ["true or false", "'maybe'"]),
    ({"keep-failed": "2"}, "keep-failed", ["true or false"]),
    ({"build-root": "relative/dir"}, "build-root", ["absolute path"]),
    ({"output-dir": "out"}, "output-dir", ["absolute path"]),
    ({"dryrun": "true"}, "dryrun", ["unknown key", "did you mean 'dry-run'"]),
    ({"builder": "sbuild %NOPE"}, "builder", ["unknown placeholder", "'%NOPE'", "%DSC"]),
    ({"builder": "sbuild 'unclosed"}, "builder", ["cannot split"]),
    ({"dput-options": "-c 'unclosed"}, "dput-options", ["cannot split"]),
])
def test_bad_setting_is_refused_by_its_check_naming_the_key(settings, key, words, tmp_path):
    """Checking settings at start: the runner's check_settings raises ConfigError naming the
    setting and the fix, and touches nothing on disk."""
    with pytest.raises(ConfigError) as caught:
        debian.build.check_settings({"build-root": str(tmp_path / "root"), **settings})
    assert caught.value.key == key
    for word in words:
        assert word in caught.value.reason
    assert not (tmp_path / "root").exists()


def offline_deb_config(tmp_path, **settings):
    """A configuration serving one deb queue with the Debian runner; its broker port is closed."""
    return offline_config(tmp_path / "rbit.ini", name="deb-check",
                          runners={"Debian_amd64_unstable_deb": {
                              "runner": RUNNER, "build-root": str(tmp_path / "root"), **settings}})


@pytest.mark.parametrize("command", [["{config}"], ["{config}", "--check"], ["try", "{config}"]],
                         ids=["run", "check", "try"])
@pytest.mark.parametrize("settings, key, words", [
    ({"dryrun": "true"}, "dryrun", "did you mean 'dry-run'"),
    ({"keep-failed": "maybe"}, "keep-failed", "must be true or false, not 'maybe'"),
], ids=["misspelt-key", "not-a-flag"])
def test_bad_setting_stops_rbit_before_connecting(tmp_path, command, settings, key, words):
    """Checking settings at start: a misspelt Debian setting or a flag that is not one ends
    `rbit CONFIG`, `rbit CONFIG --check` and `rbit try` at once, before any connection (the
    broker port is closed), with exit status 2 and one line naming the file, the
    [runner:QUEUE] section and the key, and no traceback."""
    config = offline_deb_config(tmp_path, **settings)
    result = rbit(*[arg.format(config=config) for arg in command], timeout=10)
    assert result.returncode == 2, (result.stdout, result.stderr)
    check_one_line(result.stdout + result.stderr, config, "runner:Debian_amd64_unstable_deb",
                   f"key '{key}'", words)
    assert "broker" not in result.stderr.lower()
    assert not (tmp_path / "root").exists()


def test_good_settings_pass_the_check(tmp_path):
    """Checking settings at start: `rbit CONFIG --check` accepts the Debian runner with every
    setting written well (flags in any of their spellings) and exits 0."""
    config = offline_deb_config(tmp_path, **{
        "output-dir": str(tmp_path / "out"), "builder": "sbuild --dist=%SUITE %DSC",
        "check-build-deps": "no", "dput-dest": "archive", "dput-options": "-U",
        "dry-run": "Yes", "keep-failed": "off"})
    result = rbit(config, "--check", timeout=10)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "Debian_amd64_unstable_deb" in result.stdout


def test_build_root_of_another_user_is_refused(tmp_path, monkeypatch):
    """A build root that another user owns (say a planted /tmp/rbit-debian) fails the job."""
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(Failed, match="belongs to another user"):
        run_build(request_for(tmp_path / "repo"), {"build-root": str(tmp_path)})


def test_unknown_transport_method_fails(tmp_path):
    """A transport other than git or svn: Failed naming it and the known ones; nothing left."""
    with pytest.raises(Failed) as failed:
        run_build(request_for("cvs.example:/src", method="cvs"), {"build-root": str(tmp_path)})
    assert "unknown transport method 'cvs'" in failed.value.message
    assert "git, svn" in failed.value.message
    assert leftover_work(tmp_path) == []


@pytest.mark.parametrize("method", ["git", "svn"])
def test_uri_starting_with_dash_is_not_an_option(method, tmp_path, capfd):
    """A uri like ``--upload-pack=CMD`` reaches the VCS after ``--``: a repository, never an option."""
    if method == "svn":
        require_tools("svn")
    marker = tmp_path / "injected"
    uri = f"--upload-pack=touch {marker}" if method == "git" else "--version"
    with pytest.raises(Failed) as failed:
        run_build(request_for(uri, method=method), {"build-root": str(tmp_path / "root")})
    assert not marker.exists()
    assert f"{method} " in failed.value.message
    assert f" -- {shlex.quote(uri)} " in capfd.readouterr().out  # the build log


def test_revision_starting_with_dash_is_refused(tmp_path):
    """A git vcs_id beginning with '-' is refused before git sees it."""
    repo = tmp_path / "repo"
    make_repo(repo)
    with pytest.raises(Failed, match="is not a git revision"):
        run_build(request_for(repo, "--orphan=x"), {"build-root": str(tmp_path / "root")})


def test_svn_export_at_revision(tmp_path):
    """svn: the uri is exported at the revision given by vcs_id."""
    require_tools("svn", "svnadmin")
    repo = tmp_path / "svnrepo"
    subprocess.run(["svnadmin", "create", str(repo)], check=True)
    tree = tmp_path / "tree"
    tree.mkdir()
    for revision in ("one", "two"):
        (tree / "file").write_text(revision)
        command = ["svn", "import", "-q", "-m", revision, str(tree), f"file://{repo}/{revision}"]
        subprocess.run(command, check=True)
    with debian.BuildLog() as build_log:
        dest = debian.fetch(request_for(f"file://{repo}", "1", method="svn").transport,
                            tmp_path / "out", build_log)
    assert (dest / "one" / "file").read_text() == "one"
    assert not (dest / "two").exists()


def test_unmet_build_dependency_blocks(tmp_path):
    """dpkg-checkbuilddeps names a missing dependency: Blocked with that name; work dir removed."""
    repo = tmp_path / "repo"
    make_repo(repo, build_depends=f"debhelper-compat (= 13), {MISSING_PACKAGE}")
    with pytest.raises(Blocked) as blocked:
        run_build(request_for(repo), {"build-root": str(tmp_path / "root"), "keep-failed": "true"})
    assert blocked.value.message == f"Unmet build dependencies: {MISSING_PACKAGE}"
    assert leftover_work(tmp_path / "root") == []


@pytest.mark.parametrize("keep", [True, False])
def test_failure_quotes_the_log_tail(keep, tmp_path):
    """A failing build: Failed quoting the last 20 lines of the job's log (its output).

    keep-failed = true keeps the work directory; false removes it.
    """
    repo = tmp_path / "repo"
    make_repo(repo)
    settings = {
        "build-root": str(tmp_path / "root"),
        "builder": "sh -c 'for i in $(seq 1 30); do echo line$i; done; exit 3'",
        "check-build-deps": "false",
        "keep-failed": str(keep).lower(),
    }
    with pytest.raises(Failed) as failed:
        run_build(request_for(repo), settings)
    message = failed.value.message
    assert "exit status 3" in message
    assert "exit status 3); the job's log ends:\n" in message
    assert message.splitlines()[-debian.TAIL_LINES:] == [f"line{i}" for i in range(11, 31)]
    kept = leftover_work(tmp_path / "root")
    assert len(kept) == (1 if keep else 0)
    if keep:
        assert (kept[0] / debian.SOURCE_DIR / "debian" / "control").exists()


def test_builder_placeholders(tmp_path):
    """A custom builder gets %DSC (built first), %DIR, %WORK, request fields and %%.

    Each placeholder is replaced inside its own argument: a value with a space stays one argument.
    """
    repo = tmp_path / "repo"
    make_repo(repo)
    record = tmp_path / "args"
    program = tmp_path / "builder"
    program.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}"\n')
    program.chmod(0o755)
    settings = {"build-root": str(tmp_path / "root"), "check-build-deps": "false",
                "builder": f"{program} %DSC %DIR --work=%WORK '%PACKAGE %VERSION' 100%%"}
    assert run_build(request_for(repo), settings) == []
    dsc, source, work, fields, percent = record.read_text().splitlines()
    assert dsc == f"{Path(source).parent}/{PACKAGE}_1.0.dsc"
    assert work == f"--work={Path(source).parent}"
    assert (fields, percent) == (f"{PACKAGE} 1.0", "100%")
    output = tmp_path / "root" / "output" / "7"
    assert (output / f"{PACKAGE}_1.0.dsc").exists()


def test_master_request_builds_source_and_all_binaries(tmp_path, capfd):
    """PyBit's master request: a full dpkg-buildpackage -us -uc; the .dsc and _all.deb in output/JOB."""
    repo = tmp_path / "repo"
    make_repo(repo)
    assert run_build(request_for(repo), {"build-root": str(tmp_path / "root")}) == []
    names = sorted(path.name for path in (tmp_path / "root" / "output" / "7").iterdir())
    assert f"{PACKAGE}_1.0.dsc" in names and f"{PACKAGE}_1.0_all.deb" in names
    assert "== $ dpkg-buildpackage -us -uc -d\n" in capfd.readouterr().out


def test_other_architecture_builds_arch_binaries_only(tmp_path, capfd):
    """A request that is not the master: dpkg-checkbuilddeps -B and dpkg-buildpackage -B, no source."""
    repo = tmp_path / "repo"
    make_repo(repo, architecture="any")
    assert run_build(request_for(repo, master=False), {"build-root": str(tmp_path / "root")}) == []
    build_log = capfd.readouterr().out
    assert "$ dpkg-checkbuilddeps -B\n" in build_log
    assert "$ dpkg-buildpackage -us -uc -d -B\n" in build_log
    output = tmp_path / "root" / "output" / "7"
    assert len(list(output.glob(f"{PACKAGE}_1.0_*.deb"))) == 1
    assert not list(output.glob("*.dsc"))


def test_other_architecture_of_arch_all_package_builds_nothing(tmp_path, capfd):
    """Not the master, every binary package Architecture: all: nothing to build, and no failure."""
    repo = tmp_path / "repo"
    make_repo(repo)
    assert run_build(request_for(repo, master=False), {"build-root": str(tmp_path / "root")}) == []
    assert "dpkg-buildpackage" not in capfd.readouterr().out
    assert leftover_work(tmp_path / "root") == []


# -- through the whole worker ---------------------------------------------------------


class DebWorker:
    """A worker serving one ``deb`` queue of its own with the Debian runner."""

    def __init__(self, tmp_path, vhost, unique, pybit_web, settings, rbit=None):
        self.suite = f"unstable{unique}"
        self.queue = f"Debian_amd64_{self.suite}_deb"
        self.routing_key = f"Debian.amd64.{self.suite}.deb"
        self.build_root = tmp_path / "root"
        self.bin = tmp_path / "bin"
        self.dput_record = fake_dput(self.bin)
        self.vhost = vhost
        self.pybit_web = pybit_web
        config = write_config(
            tmp_path / "rbit.ini", name=f"deb-{unique}", vhost=vhost, rbit=rbit,
            pybit={"url": pybit_web.url, "user": "admin", "password": "secret"},
            runners={self.queue: {"runner": RUNNER, "build-root": str(self.build_root),
                                  **settings}},
        )
        path = f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"
        self.process = WorkerProcess(config, env={"PATH": path})

    def __enter__(self):
        self.process.start()
        self.process.wait_ready()
        return self

    def __exit__(self, *exc_info):
        self.process.stop()

    def publish(self, job_id, uri, vcs_id=None):
        """Publish, as PyBit's controller does, the master request to build the test package."""
        self.pybit_web.add_job(job_id)  # PyBit records the job, Waiting, before publishing it
        body = request_body(job_id, package=PACKAGE, version="1.0", dist="Debian", arch="amd64",
                            suite=self.suite, fmt="deb", web_host=self.pybit_web.web_host,
                            method="git", uri=str(uri), vcs_id=vcs_id)
        self.vhost.publish_build(body, self.routing_key)

    def wait_status(self, job_id, status):
        """Wait until PyBit has heard *status* for the job; fail with the worker's log if not."""
        if not self.pybit_web.wait_for((job_id, status), timeout=JOB_TIMEOUT):
            raise AssertionError(f"job {job_id} never reported {status}; statuses "
                                 f"{self.pybit_web.statuses(job_id)}; log:\n{self.process.log[-4000:]}")

    def dput_calls(self):
        """The arguments the fake dput got, one per line, over all its calls."""
        return self.dput_record.read_text().splitlines() if self.dput_record.exists() else []


def test_worker_builds_the_commit_asked_for(tmp_path, vhost, unique, pybit_web):
    """Through the worker: git checked out at vcs_id, built by dpkg-buildpackage.

    Statuses Building then Done; the .deb of that commit in output/JOB; the
    work directory removed; dry-run: dput is not called; each command, its output and
    each phase in the job's log.
    """
    repo = tmp_path / "repo"
    first, _ = make_repo(repo, versions=("1.0", "1.1"))
    settings = {"dput-dest": "test-archive", "dry-run": "true"}
    with DebWorker(tmp_path, vhost, unique, pybit_web, settings) as worker:
        worker.publish(11, repo, first)
        worker.wait_status(11, "Done")
        log = worker.process.log
    assert pybit_web.statuses(11) == ["Waiting", "Building", "Done"]
    output = worker.build_root / "output" / "11"
    assert (output / f"{PACKAGE}_1.0_all.deb").is_file()
    assert not list(output.glob("*1.1*"))
    assert worker.dput_calls() == []
    assert leftover_work(worker.build_root) == []
    build_log = job_log(worker.process.config_path, 11)
    assert "== $ dpkg-buildpackage -us -uc -d\n" in build_log and "dpkg-deb: building package" in build_log
    for phase in ("fetch", "checkbuilddeps", "build", "upload", "clean"):
        assert f" INFO rbitext.debian: {phase}: " in build_log
    assert "upload: dry run, not uploading to test-archive" in build_log
    assert "dpkg-buildpackage" not in log  # the worker's own log: the job's start and end


def test_worker_uploads_with_dput(tmp_path, vhost, unique, pybit_web):
    """dput-dest set, no dry run: dput gets the options, the target and the .changes.

    Statuses Building, Uploaded, Done.
    """
    repo = tmp_path / "repo"
    (commit,) = make_repo(repo)
    settings = {"dput-dest": "test-archive", "dput-options": "-U", "dry-run": "false"}
    with DebWorker(tmp_path, vhost, unique, pybit_web, settings) as worker:
        worker.publish(12, repo, commit)
        worker.wait_status(12, "Done")
    assert pybit_web.statuses(12) == ["Waiting", "Building", "Uploaded", "Done"]
    (changes,) = (worker.build_root / "output" / "12").glob("*.changes")
    assert worker.dput_calls() == ["-U", "test-archive", str(changes)]


def test_worker_blocks_on_unmet_build_depends(tmp_path, vhost, unique, pybit_web):
    """An unmet Build-Depends: Blocked, and the message waits in rbit.delay.<queue>.<ms>ms."""
    repo = tmp_path / "repo"
    (commit,) = make_repo(repo, build_depends=f"debhelper-compat (= 13), {MISSING_PACKAGE}")
    with DebWorker(tmp_path, vhost, unique, pybit_web, {}, rbit={"blocked_delay": "60"}) as worker:
        worker.publish(13, repo, commit)
        worker.wait_status(13, "Blocked")
        delay_queue = f"rbit.delay.{worker.queue}.60000ms"
        assert vhost.wait_depth(delay_queue, 1), worker.process.log[-4000:]
        assert vhost.depth(worker.queue) == 0
        assert MISSING_PACKAGE in worker.process.log
    assert pybit_web.statuses(13) == ["Waiting", "Building", "Blocked"]
    assert leftover_work(worker.build_root) == []


def test_worker_fails_on_bad_uri(tmp_path, vhost, unique, pybit_web):
    """A uri that is no repository: Failed, with git's complaint in the worker's log."""
    with DebWorker(tmp_path, vhost, unique, pybit_web, {}) as worker:
        worker.publish(14, tmp_path / "no-such-repo")
        worker.wait_status(14, "Failed")
        worker.process.wait_log(r"git clone of \S*no-such-repo failed")
    assert pybit_web.statuses(14) == ["Waiting", "Building", "Failed"]
    assert leftover_work(worker.build_root) == []
