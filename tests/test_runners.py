"""Runners (the README's "Writing a runner"): ``python!`` and ``shell!``, in-process and under the
real worker.

``shell!`` is the one place where text from a message meets a program: these
tests publish package names written to run commands if any shell ever saw
them, and check that the program got exactly the expected arguments and that
no command ran.
"""

import os
import pickle
import re
import time
from pathlib import Path

import pytest

from rbit import config as config_module
from rbit import statuses
from rbit.errors import Blocked, ConfigError, Failed
from rbit.message import Message
from rbit.pybit import decode_build_request
from rbit.runners import load as load_runner
from rbit.runners.python import PythonRunner
from rbit.runners.shell import ShellRunner

from .harness import WorkerProcess, alive, cmdline, job_log, wait_until, write_config
from .pybit_models import queue_name, request_body, routing_key

#: ``printf '%s\0'`` each argument the program got into OUT_DIR/<job id>.argv (``%%`` is a ``%``).
PRINT_ARGV = "/bin/sh -c 'printf \"%%s\\0\" \"$@\" > \"$RBIT_SETTING_OUT_DIR/$RBIT_ID.argv\"' sh"


def message_for(job_id=7, queue="cnx_any_latex_pdf", **fields):
    """The Message a runner is handed for a request published as PyBit does."""
    body = request_body(job_id, **fields)
    return Message(body=body, request=decode_build_request(body), queue=queue)


def read_argv(path):
    return path.read_bytes().decode("utf-8").split("\0")[:-1]


# -- python! ---------------------------------------------------------------------

CALLS = []


def capture_call(*args, **kwargs):
    """A python! runner that keeps what it was called with (in-process tests only)."""
    CALLS.append((args, kwargs))


def test_python_runner_is_called_with_message_set_status_and_settings():
    """python!package.module:function calls function(message, set_status, settings), with the
    section's settings as a dict."""
    CALLS.clear()
    runner = load_runner("python!tests.test_runners:capture_call", {"name": "World", "colour": "blue"})
    assert isinstance(runner, PythonRunner)
    message = message_for(7)

    def set_status(status, text=None):
        pass

    runner.run(message, set_status)
    [(args, kwargs)] = CALLS
    assert kwargs == {}
    assert args[0] is message
    assert args[1] is set_status
    assert args[2] == {"name": "World", "colour": "blue"} and type(args[2]) is dict


CHECKS = []


def checked_call(*args, **kwargs):
    """A python! runner with a settings check: ``jobs`` must be a whole number."""
    CALLS.append((args, kwargs))


def check_jobs(settings):
    CHECKS.append(settings)
    jobs = settings.get("jobs", "1")
    if not jobs.isdigit():
        raise ConfigError(f"must be a whole number, not {jobs!r}", key="jobs")
    settings["jobs"] = "changed by the check"
    return {"jobs": int(jobs)}  # ignored: the function gets the settings as written


checked_call.check_settings = check_jobs


def broken_check_call(message, set_status, settings):
    """A python! runner whose settings check has a bug."""


broken_check_call.check_settings = lambda settings: settings["missing"]


def test_settings_check_is_called_once_and_its_return_value_ignored():
    """Checking settings at start: a function's check_settings gets a copy of the settings when
    the runner is built; what it returns or changes is ignored, the function still gets the
    settings as written, and the job's process (which unpickles the runner) does not check
    again."""
    CALLS.clear()
    CHECKS.clear()
    runner = load_runner("python!tests.test_runners:checked_call", {"jobs": "4"})
    assert CHECKS == [{"jobs": "changed by the check"}]
    in_job_process = pickle.loads(pickle.dumps(runner))
    assert len(CHECKS) == 1
    in_job_process.run(message_for(7), lambda status, text=None: None)
    [(args, _)] = CALLS
    assert args[2] == {"jobs": "4"}


def test_settings_check_error_names_file_section_and_key(tmp_path):
    """Checking settings at start: a ConfigError raised by check_settings becomes a
    configuration error naming the file, the [runner:QUEUE] section and the setting."""
    path = write_config(tmp_path / "rbit.ini", name="checked", vhost=None, runners={
        "cnx_any_latex_pdf": {"runner": "python!tests.test_runners:checked_call", "jobs": "many"}})
    with pytest.raises(ConfigError) as caught:
        config_module.load(path, environ={})
    error = caught.value
    assert (error.path, error.section, error.key) == (path, "runner:cnx_any_latex_pdf", "jobs")
    assert str(error) == (f"{path}, section [runner:cnx_any_latex_pdf], key 'jobs': "
                          "must be a whole number, not 'many'")


def test_settings_check_that_crashes_is_a_configuration_error():
    """Checking settings at start: any other exception from check_settings is a configuration
    error naming the check and the exception, not a traceback."""
    with pytest.raises(ConfigError) as caught:
        load_runner("python!tests.test_runners:broken_check_call", {})
    assert caught.value.key is None
    assert caught.value.reason == "tests.test_runners:broken_check_call.check_settings raised KeyError: 'missing'"


def test_runner_without_settings_check_takes_any_settings():
    """Checking settings at start: a function without check_settings is built as before, with
    whatever settings its section holds, and still pickles to the job's process."""
    runner = load_runner("python!tests.test_runners:capture_call", {"anything": "goes"})
    assert pickle.loads(pickle.dumps(runner)).settings == {"anything": "goes"}


# -- shell!: splitting and substitution ---------------------------------------------


@pytest.mark.parametrize("line, argv", [
    ("/bin/sh -c 'make \"$0\"' %PACKAGE", ["/bin/sh", "-c", 'make "$0"', "%PACKAGE"]),
    ('/bin/echo a\\ b "c d" \'e\'"f"', ["/bin/echo", "a b", "c d", "ef"]),
    ("/bin/echo $HOME * ~ `id` $(id) ;", ["/bin/echo", "$HOME", "*", "~", "`id`", "$(id)", ";"]),
])
def test_shell_line_is_split_like_a_posix_shell_without_expansion(line, argv):
    """A shell! line is split once, as a POSIX shell splits words (quotes group, backslash
    escapes), with no variable, glob or command expansion."""
    assert ShellRunner(line, {}).argv == argv


def test_shell_runner_in_process_keeps_each_value_in_its_argument(tmp_path):
    """Placeholders are replaced inside single arguments: a package name written as
    shell commands adds no argument and runs nothing."""
    pwned = tmp_path / "PWNED"
    package = f"x; touch {pwned} $(touch {pwned}) `touch {pwned}`"
    runner = ShellRunner(PRINT_ARGV + " %PACKAGE %VERSION %ID-%PACKAGE %%", {"out_dir": str(tmp_path)})
    reported = []
    runner.run(message_for(7, package=package, version="1 2"), lambda s, t=None: reported.append(s))
    assert read_argv(tmp_path / "7.argv") == [package, "1 2", f"7-{package}", "%"]
    assert not pwned.exists()
    assert reported == []


def test_shell_runner_in_process_exit_status_gives_the_outcome(tmp_path):
    """Exit status 0 is success, 75 (EX_TEMPFAIL) raises Blocked, any other raises Failed."""
    message = message_for(8)
    ShellRunner("/bin/sh -c 'exit 0'", {}).run(message, lambda *a: None)
    with pytest.raises(Blocked):
        ShellRunner("/bin/sh -c 'exit 75'", {}).run(message, lambda *a: None)
    with pytest.raises(Failed, match="3"):
        ShellRunner("/bin/sh -c 'exit 3'", {}).run(message, lambda *a: None)


def test_shell_runner_in_process_returns_when_the_program_exits(tmp_path):
    """The outcome is the program's exit status, given when the program exits, even if it
    left a background process behind (a build's gpg-agent, say) that holds on to its
    inherited file descriptors."""
    message = message_for(9)
    started = time.monotonic()
    ShellRunner("/bin/sh -c 'sleep 3 > /dev/null 2>&1 & exit 0'", {}).run(message, lambda *a: None)
    assert time.monotonic() - started < 2.0


# -- shell! under the worker ----------------------------------------------------------


def shell_worker(tmp_path, vhost, unique, line, pybit=None, **settings):
    """A worker serving this test's queue with the shell! *line*; returns (worker, queue, key)."""
    dist = f"t{unique}"
    queue, key = queue_name(dist, "any", "a", "pdf"), routing_key(dist, "any", "a", "pdf")
    path = write_config(tmp_path / "rbit.ini", name=f"w{unique}", vhost=vhost, pybit=pybit,
                        runners={queue: {"runner": f"shell!{line}", "out_dir": str(tmp_path), **settings}})
    env = {"RBIT_AMQP_PASSWORD": "guest", "RBIT_PYBIT_PASSWORD": (pybit or {}).get("password", "unset")}
    return WorkerProcess(path, env=env), queue, key


def publish(vhost, key, unique, job_id, **fields):
    body = request_body(job_id, dist=f"t{unique}", arch="any", suite="a", fmt="pdf", **fields)
    vhost.publish_build(body, key)


def pybit_keys(fake):
    return {"url": fake.url, "user": fake.user, "password": fake.password, "timeout": "2"}


def test_shell_runner_never_hands_message_text_to_a_shell(tmp_path, vhost, unique):
    """Under the worker, package names and versions made of shell syntax (; $() ``
    && quotes, spaces, globs, placeholders) reach the program as exactly the expected
    arguments, and none of the commands they spell runs."""
    pwned = tmp_path / "PWNED"
    jobs = {
        201: (f"x; touch {pwned}-1", "1.0"),
        202: (f"$(touch {pwned}-2)", "1.0"),
        203: (f"`touch {pwned}-3`", f"1 && touch {pwned}-4"),
        204: ("a  b c", "' \" \\ |"),
        205: ("*", "%ID%%PACKAGE"),
        206: ("-n", f"--version touch {pwned}-5 #"),
    }
    worker, queue, key = shell_worker(tmp_path, vhost, unique,
                                      PRINT_ARGV + " %PACKAGE %VERSION pkg=%PACKAGE/v=%VERSION %% %ID")
    with worker:
        worker.wait_ready(timeout=20)
        for job_id, (package, version) in jobs.items():
            publish(vhost, key, unique, job_id, package=package, version=version)
        # (not one pattern per job: message text with a newline spans log lines)
        worker.wait_log(r"ended Done", timeout=15, count=len(jobs))
        # A line break in a field is refused before any runner sees it (it could forge log lines).
        publish(vhost, key, unique, 207, package="-n", version=f"\n touch {pwned}-6 #")
        assert vhost.wait_depth(f"rbit.rejected.w{unique}", 1, timeout=15)
    for job_id, (package, version) in jobs.items():
        assert read_argv(tmp_path / f"{job_id}.argv") == [
            package, version, f"pkg={package}/v={version}", "%", str(job_id)]
    assert not (tmp_path / "207.argv").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("PWNED")) == []


def test_shell_runner_environment_has_job_fields_and_settings(tmp_path, vhost, unique):
    """The program's environment holds the job's fields (RBIT_ID, RBIT_PACKAGE, ...) and the
    runner's settings (RBIT_SETTING_<KEY>), and never rbit's passwords."""
    worker, queue, key = shell_worker(tmp_path, vhost, unique,
                                      "/bin/sh -c 'env -0 > \"$RBIT_SETTING_OUT_DIR/$RBIT_ID.env\"'",
                                      **{"my-key": "%(not)s interpolated", "colour": "blue"})
    with worker:
        worker.wait_ready(timeout=20)
        publish(vhost, key, unique, 211, package="hello world; x", version="2.0-1", buildenv="squeeze")
        worker.wait_log(r"job 211: .* ended Done", timeout=15)
    pairs = (tmp_path / "211.env").read_bytes().decode("utf-8").split("\0")[:-1]
    env = dict(pair.split("=", 1) for pair in pairs)
    expected = {
        "RBIT_ID": "211", "RBIT_PACKAGE": "hello world; x", "RBIT_VERSION": "2.0-1",
        "RBIT_DIST": f"t{unique}", "RBIT_ARCH": "any", "RBIT_SUITE": "a", "RBIT_FORMAT": "pdf",
        "RBIT_BUILDENV": "squeeze", "RBIT_QUEUE": queue,
        "RBIT_SETTING_OUT_DIR": str(tmp_path), "RBIT_SETTING_MY_KEY": "%(not)s interpolated",
        "RBIT_SETTING_COLOUR": "blue",
    }
    assert {name: env.get(name) for name in expected} == expected
    assert "RBIT_AMQP_PASSWORD" not in env and "RBIT_PYBIT_PASSWORD" not in env
    assert "guest" not in {value for name, value in env.items() if name.startswith("RBIT_")}


def test_shell_exit_status_gives_the_outcome(tmp_path, vhost, unique, pybit_web):
    """Under the worker, exit status 0 ends the job Done, 75 Blocked, any other Failed."""
    line = ("/bin/sh -c 'case \"$RBIT_PACKAGE\" in blocked*) exit 75;; fail*) exit 3;; esac"
            "; exit 0'")
    worker, queue, key = shell_worker(tmp_path, vhost, unique, line, pybit=pybit_keys(pybit_web))
    for job_id in (221, 222, 223):
        pybit_web.add_job(job_id)
    with worker:
        worker.wait_ready(timeout=20)
        publish(vhost, key, unique, 221, package="ok-x")
        publish(vhost, key, unique, 222, package="blocked-x")
        publish(vhost, key, unique, 223, package="fail-x")
        for job_id, final in ((221, "Done"), (222, "Blocked"), (223, "Failed")):
            assert pybit_web.wait_for((job_id, final), timeout=10), (job_id, pybit_web.statuses(job_id), worker.log)
    assert pybit_web.statuses(221) == ["Waiting", "Building", "Done"]
    assert pybit_web.statuses(222)[:3] == ["Waiting", "Building", "Blocked"]
    assert pybit_web.statuses(223) == ["Waiting", "Building", "Failed"]
    assert re.search(r"job 223: .* ended Failed.*status 3", worker.log)


def test_shell_status_lines_on_the_status_fd_are_reported(tmp_path, vhost, unique, pybit_web):
    """Lines the program writes to fd $RBIT_STATUS_FD are reported as statuses in order;
    Done follows when none was final; an unknown name never reaches PyBit (it is logged as an
    error in the job's log, beside the program's output)."""
    line = ("/bin/sh -c 'echo Uploaded to the archive >&$RBIT_STATUS_FD"
            " && echo Bogus >&$RBIT_STATUS_FD && echo hello from the build'")
    worker, queue, key = shell_worker(tmp_path, vhost, unique, line, pybit=pybit_keys(pybit_web))
    pybit_web.add_job(231)
    with worker:
        worker.wait_ready(timeout=20)
        publish(vhost, key, unique, 231)
        assert pybit_web.wait_for((231, "Done"), timeout=10), worker.log
    assert pybit_web.statuses(231) == ["Waiting", "Building", "Uploaded", "Done"]
    assert all(report.status in statuses.ALL for report in pybit_web.reports)
    log = job_log(worker.config_path, 231)
    assert "hello from the build" in log
    assert re.search(r"ERROR rbit\.runners\.shell: runner program reported .*'Bogus'", log), log
    assert "hello from the build" not in worker.log


def test_shell_runner_past_its_timeout_is_stopped_and_failed(tmp_path, vhost, unique, pybit_web):
    """A job that runs past its section's timeout is stopped, with everything it started,
    and reported Failed."""
    marker = tmp_path / "still-running"
    sleep = f"sleep 30.{int(unique, 16) % 99991}"  # a command line no other process has
    line = f"/bin/sh -c '{sleep} & wait; touch {marker}'"
    worker, queue, key = shell_worker(tmp_path, vhost, unique, line, pybit=pybit_keys(pybit_web), timeout="1")
    pybit_web.add_job(241)
    with worker:
        worker.wait_ready(timeout=20)
        publish(vhost, key, unique, 241)
        assert pybit_web.wait_for((241, "Failed"), timeout=15), worker.log
        worker.wait_log(r"job 241: .* ended Failed.*timed out", timeout=5)
    assert pybit_web.statuses(241) == ["Waiting", "Building", "Failed"]
    assert not marker.exists()
    assert not any(cmdline(pid).startswith(sleep) for pid in os.listdir("/proc") if pid.isdigit())


def test_shell_program_that_leaves_a_background_process_ends_with_its_exit_status(
        tmp_path, vhost, unique, pybit_web):
    """A program that exits 0 ends its job Done at once, even if it left a background
    process behind; the job's end then stops that process with the rest of its group."""
    sleep = f"sleep 40.{int(unique, 16) % 99991}"  # a command line no other process has
    line = f"/bin/sh -c '{sleep} > /dev/null 2>&1 & exit 0'"
    worker, queue, key = shell_worker(tmp_path, vhost, unique, line, pybit=pybit_keys(pybit_web), timeout="4")
    pybit_web.add_job(251)
    with worker:
        worker.wait_ready(timeout=20)
        publish(vhost, key, unique, 251)
        assert pybit_web.wait_for((251, "Done"), timeout=3), (pybit_web.statuses(251), worker.log)
        worker.wait_log(r"job 251: .* ended Done", timeout=5)
    assert pybit_web.statuses(251) == ["Waiting", "Building", "Done"]
    assert wait_gone(sleep)


def wait_gone(command, timeout=5.0):
    """True once no process runs *command*."""
    deadline = time.monotonic() + timeout
    while any(cmdline(pid).startswith(command) for pid in os.listdir("/proc") if pid.isdigit()):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_shell_jobs_process_becomes_its_program_which_dies_with_its_worker(tmp_path, vhost, unique):
    """No Python process stands between a shell! program and the worker: the program leads the
    job's own session and process group, a child of the fork server. Killed with SIGKILL, the
    worker takes the program and the children it started with it."""
    pids = tmp_path / "pids"
    line = f"/bin/sh -c 'sleep 300 & echo $$ $! > {pids}.part && mv {pids}.part {pids}; wait'"
    worker, _, key = shell_worker(tmp_path, vhost, unique, line)
    with worker:
        worker.wait_ready(timeout=20)
        publish(vhost, key, unique, 241)
        assert wait_until(pids.exists, 20), worker.log
        program, child = map(int, pids.read_text().split())
        assert os.getsid(program) == program and os.getpgid(program) == program
        assert os.getpgid(child) == program
        assert cmdline(program).startswith("/bin/sh -c "), cmdline(program)
        parent = int(Path(f"/proc/{program}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert "forkserver" in cmdline(parent), cmdline(parent)
        worker.process.kill()
        worker.process.wait(10)
        assert wait_until(lambda: not alive(program) and not alive(child), 5), "the program outlived its worker"
