"""Passwords: where they come from and where they must never show.

The README's configuration reference: a password can also come from
``RBIT_AMQP_PASSWORD``, ``RBIT_PYBIT_PASSWORD`` or ``password_file``. Its
"Security" ("Leaked passwords"): rbit warns when a file holding a password is
readable by every user; passwords appear in no log line, error, ``--help``
output or process title, and job processes do not inherit rbit's password
variables. The real-worker checks run a worker on the real broker as a
broker user of the test's own whose password is distinctive (guest's is
"guest", which would prove nothing), and look at its log, at ``ps`` and at
``/proc/PID/cmdline`` of the worker and its job processes.
"""

import json
import os
import re
import signal
import subprocess
import time
import uuid
from base64 import b64encode
from pathlib import Path
from urllib.parse import quote

import pytest

from rbit.config import load
from rbit.errors import ConfigError

from .broker import rabbitmqctl
from .harness import WorkerProcess, free_port, offline_config, write_config
from .pybit_web import FakePyBit
from .test_tools import rbit, request_body

QUEUE = "s_any_latex_pdf"

#: The runner section of the configurations that need no broker.
RUNNERS = {QUEUE: {"runner": "python!rbitext.hello:hello"}}


def env_runner(message, set_status, settings):
    """Writes the job process's ``RBIT_*`` environment to ``settings['record']``, then works a while."""
    rbit_vars = {k: v for k, v in os.environ.items() if k.startswith("RBIT_")}
    Path(settings["record"]).write_text(json.dumps(rbit_vars))
    time.sleep(float(settings.get("sleep", "0")))


def secret_file(path, text, mode=0o600):
    path.write_text(text)
    path.chmod(mode)
    return path


def forms(password):
    """Every way a password could show up in text: as is, URL-quoted, and inside basic auth."""
    return {password, quote(password, safe=""), quote(password)}


def leaks(text, passwords):
    return sorted(p for password in passwords for p in forms(password) if p in text)


# -- Where passwords come from ---------------------------------------------------------------


def test_environment_overrides_the_file(tmp_path):
    """RBIT_AMQP_PASSWORD and RBIT_PYBIT_PASSWORD win over the file's
    ``password`` keys; without them the file's passwords are used."""
    path = offline_config(tmp_path / "rbit.ini", RUNNERS, amqp={"password": "from-file-a"},
                          pybit={"url": "http://pybit.example", "user": "admin", "password": "from-file-p"})
    plain = load(path, environ={})
    assert (plain.amqp.password, plain.pybit.password) == ("from-file-a", "from-file-p")
    overridden = load(path, environ={"RBIT_AMQP_PASSWORD": "from-env-a", "RBIT_PYBIT_PASSWORD": "from-env-p"})
    assert (overridden.amqp.password, overridden.pybit.password) == ("from-env-a", "from-env-p")
    assert "from-env-a" not in repr(overridden) and "from-file-p" not in repr(plain)


def test_password_file_is_read_and_the_environment_still_wins(tmp_path):
    """``password_file`` gives the password (trailing newline dropped);
    the environment variable still wins over it; a 0600 file draws no warning."""
    amqp_file = secret_file(tmp_path / "amqp.pw", "amqp-from-file\n")
    pybit_file = secret_file(tmp_path / "pybit.pw", "pybit-from-file\n")
    path = offline_config(tmp_path / "rbit.ini", RUNNERS, amqp={"password": "", "password_file": amqp_file},
                          pybit={"url": "http://pybit.example", "user": "admin", "password_file": pybit_file})
    config = load(path, environ={})
    assert (config.amqp.password, config.pybit.password) == ("amqp-from-file", "pybit-from-file")
    assert config.warnings == ()
    env = load(path, environ={"RBIT_AMQP_PASSWORD": "amqp-env", "RBIT_PYBIT_PASSWORD": "pybit-env"})
    assert (env.amqp.password, env.pybit.password) == ("amqp-env", "pybit-env")


@pytest.mark.parametrize("section", ["amqp", "pybit"])
@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_password_file_is_a_config_error(tmp_path, section, kind):
    """A ``password_file`` that cannot be read stops rbit with exit 2
    and one message naming the file, the section and the key ``password_file``; no traceback."""
    target = tmp_path / "nothing-here.pw" if kind == "missing" else tmp_path
    settings = {"password_file": str(target)}
    pybit = {"url": "http://pybit.example", "user": "admin", **settings} if section == "pybit" else None
    path = offline_config(tmp_path / "rbit.ini", RUNNERS, amqp=settings if section == "amqp" else None, pybit=pybit)
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    assert (caught.value.section, caught.value.key) == (section, "password_file")
    for args in ((path,), ("run", "--check", path)):
        result = rbit(*args, timeout=30)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert str(path) in result.stderr
        assert f"[{section}]" in result.stderr and "'password_file'" in result.stderr
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().count("\n") == 0, "one message, one line"


# -- Warnings about readable passwords ----------------------------------------------------------


def test_world_readable_config_with_a_password_is_warned_about(tmp_path):
    """A world-readable file holding a password gives a warning (in
    ``Config.warnings`` and on ``--check``'s stderr); the same file at 0600 does not."""
    path = offline_config(tmp_path / "rbit.ini", RUNNERS, amqp={"password": "hunter2-readable"}, mode=0o644)
    config = load(path, environ={})
    assert len(config.warnings) == 1
    assert str(path) in config.warnings[0] and "[amqp] password" in config.warnings[0]
    assert "hunter2-readable" not in config.warnings[0]
    check = rbit("run", "--check", path, timeout=30)
    assert check.returncode == 0, check.stderr
    assert "warning:" in check.stderr and str(path) in check.stderr
    assert "hunter2-readable" not in check.stderr + check.stdout

    path.chmod(0o600)
    assert load(path, environ={}).warnings == ()
    quiet = rbit("run", "--check", path, timeout=30)
    assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr


def test_world_readable_password_file_is_warned_about(tmp_path):
    """A world-readable ``password_file`` is named in a warning; a 0600 one is not."""
    secret = secret_file(tmp_path / "amqp.pw", "pw-in-file", mode=0o644)
    path = offline_config(tmp_path / "rbit.ini", RUNNERS, amqp={"password": "", "password_file": secret})
    warnings = load(path, environ={}).warnings
    assert len(warnings) == 1 and str(secret) in warnings[0] and "password_file" in warnings[0]
    secret.chmod(0o600)
    assert load(path, environ={}).warnings == ()


def test_password_from_the_environment_draws_no_warning(tmp_path):
    """A password given through the environment is not in the file: no warning."""
    path = write_config(tmp_path / "rbit.ini", name="secrets-env", vhost=None,
                        runners={QUEUE: {"runner": "python!rbitext.hello:hello"}})
    text = path.read_text().replace("password = guest\n", "")
    path.write_text(text)
    path.chmod(0o644)
    config = load(path, environ={"RBIT_AMQP_PASSWORD": "env-only"})
    assert config.amqp.password == "env-only"
    assert config.warnings == ()


# -- Where passwords must never show --------------------------------------------------------------


def test_help_never_shows_passwords():
    """``rbit --help`` and every command's ``--help`` show no password,
    even with the password variables set."""
    amqp_pw, pybit_pw = f"HelpAmqp-{uuid.uuid4().hex}", f"HelpPybit-{uuid.uuid4().hex}"
    env = {"RBIT_AMQP_PASSWORD": amqp_pw, "RBIT_PYBIT_PASSWORD": pybit_pw}
    for args in (["--help"], ["-h"], ["run", "--help"], ["publish", "--help"], ["status", "--help"],
                 ["try", "--help"], ["rejected", "--help"], ["recover", "--help"]):
        result = rbit(*args, env=env, timeout=30)
        assert result.returncode == 0, (args, result.stderr)
        assert not leaks(result.stdout + result.stderr, [amqp_pw, pybit_pw]), args


DISTINCT = "Zq7-distinct/p@ss;w0rd"


@pytest.mark.parametrize("amqp, pybit, extra", [
    ({"password": DISTINCT, "port": "not-a-port"}, None, ""),
    ({"password": DISTINCT, "heartbeat": "often"}, None, ""),
    ({"pasword": DISTINCT}, None, ""),
    ({"password": DISTINCT, "password_file": "/nonexistent/rbit.pw"}, None, ""),
    (None, {"url": "pybit.example", "user": "admin", "password": DISTINCT}, ""),
    (None, {"url": f"htp://admin:{DISTINCT}@pybit.example", "user": "admin"}, ""),
    ({"password": DISTINCT}, None, f"[rbit]\npassword = {DISTINCT}\n"),
    ({"password": DISTINCT}, None, f"[amqp]\npassword = {DISTINCT}\n"),
], ids=["bad-port", "bad-heartbeat", "misspelt-key", "bad-password-file", "bad-pybit-url",
        "credentials-in-bad-url", "duplicate-section", "duplicate-section-amqp"])
def test_config_errors_never_show_passwords(tmp_path, amqp, pybit, extra):
    """A configuration error's message (the exception and ``rbit``'s
    stderr, exit 2) never contains a password written in the file."""
    path = offline_config(tmp_path / "rbit.ini", RUNNERS, amqp=amqp, pybit=pybit, extra=extra)
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    assert not leaks(str(caught.value), [DISTINCT]), str(caught.value)
    result = rbit(path, timeout=30)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert not leaks(result.stdout + result.stderr, [DISTINCT]), result.stderr


def test_check_connections_never_shows_pybit_credentials(tmp_path):
    """``--check-connections`` reporting an unreachable PyBit whose url
    carries user:password shows the url without the password."""
    password = f"UrlPw-{uuid.uuid4().hex[:8]}"
    path = offline_config(tmp_path / "rbit.ini", RUNNERS,
                          pybit={"url": f"http://admin:{password}@127.0.0.1:{free_port()}", "timeout": "2"})
    result = rbit("run", "--check-connections", path, timeout=60)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert not leaks(result.stdout + result.stderr, [password]), result.stdout + result.stderr


# -- A worker with distinctive passwords ---------------------------------------------------------------


def descendants(pid):
    """*pid* and every process below it, from /proc."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cmdlines(pids):
    lines = {}
    for pid in pids:
        try:
            lines[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
    return lines


@pytest.fixture(scope="module")
def secret_worker(vhost, tmp_path_factory):
    """One worker run with distinctive passwords, as a broker user made for it; what it showed.

    The AMQP password comes from RBIT_AMQP_PASSWORD, PyBit's from a 0600 ``password_file``. Two
    jobs run at once (a shell one and a python one), each recording its environment and working
    a few seconds, while ``ps`` and /proc/PID/cmdline of the worker's process tree are captured.
    The worker logs at debug level (``-v``), where most could leak.
    """
    token = uuid.uuid4().hex[:8]
    tmp = tmp_path_factory.mktemp("secrets")
    user = f"rbit-secret-{token}"
    amqp_pw = f"Amqp-{token}-p@ss/w0rd;x"
    pybit_pw = f"Pybit-{token}-s3cr3t:y%"
    rabbitmqctl("add_user", user, amqp_pw)
    web = FakePyBit("admin", pybit_pw).start()
    worker = None
    try:
        rabbitmqctl("set_permissions", "-p", vhost.name, user, ".*", ".*", ".*")
        pybit_file = secret_file(tmp / "pybit.pw", pybit_pw + "\n")
        dist = f"s{token}"
        shell_queue, python_queue = f"{dist}_any_latex_sh", f"{dist}_any_latex_py"
        shell_env, python_env = tmp / "shell.env", tmp / "python.json"
        config = write_config(
            tmp / "rbit.ini", name=f"secret-{token}", vhost=vhost,
            rbit={"concurrency": "2", "shutdown_grace": "5"},
            amqp={"user": user, "password": ""},
            pybit={"url": web.url, "user": "admin", "password_file": pybit_file},
            runners={
                shell_queue: {"runner": f"shell!/bin/sh -c 'env | grep ^RBIT_ > \"$0\"; sleep 4' {shell_env}"},
                python_queue: {"runner": "python!tests.test_secrets:env_runner",
                               "record": str(python_env), "sleep": "4"},
            },
        )
        config.chmod(0o600)
        web.add_job(6101)
        web.add_job(6102)
        worker = WorkerProcess(config, "-v", env={"RBIT_AMQP_PASSWORD": amqp_pw}).start()
        worker.wait_ready()
        vhost.publish_build(request_body(6101, dist), f"{dist}.any.latex.sh")
        vhost.publish_build(request_body(6102, dist), f"{dist}.any.latex.py")
        worker.wait_log(r"job 6101: starting")
        worker.wait_log(r"job 6102: starting")
        deadline = time.monotonic() + 10
        while not (shell_env.exists() and python_env.exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
        tree = descendants(worker.process.pid)
        titles = cmdlines(tree)
        ps = subprocess.run(["ps", "ww", "-o", "pid,ppid,args", "-p", ",".join(map(str, tree))],
                            capture_output=True, text=True).stdout
        worker.wait_log(r"job 6101: .* ended Done", timeout=30)
        worker.wait_log(r"job 6102: .* ended Done", timeout=30)
        web.wait_for((6101, "Done"))
        web.wait_for((6102, "Done"))
        worker.signal(signal.SIGTERM)
        code = worker.wait(30)
        yield {
            "passwords": [amqp_pw, pybit_pw, b64encode(f"admin:{pybit_pw}".encode()).decode()],
            "amqp_pw": amqp_pw, "pybit_pw": pybit_pw, "log": worker.log, "exit": code,
            "titles": titles, "ps": ps, "tree": tree, "web": web,
            "shell_env": shell_env.read_text() if shell_env.exists() else None,
            "python_env": json.loads(python_env.read_text()) if python_env.exists() else None,
        }
    finally:
        if worker is not None:
            worker.stop()
        web.stop()
        rabbitmqctl("delete_user", user, check=False)


def test_the_worker_authenticates_with_the_secret_passwords(secret_worker):
    """The worker reached the broker with RBIT_AMQP_PASSWORD and PyBit with the
    password_file's password (both jobs' statuses arrived), then stopped cleanly."""
    web = secret_worker["web"]
    assert web.statuses(6101) == ["Waiting", "Building", "Done"]
    assert web.statuses(6102) == ["Waiting", "Building", "Done"]
    assert secret_worker["exit"] == 0, secret_worker["log"][-3000:]


def test_worker_log_never_shows_passwords(secret_worker):
    """The worker's log at debug level holds no password, in any form."""
    found = leaks(secret_worker["log"], secret_worker["passwords"])
    assert not found, f"passwords {found} in the log:\n{secret_worker['log'][-3000:]}"


def test_process_titles_never_show_passwords(secret_worker):
    """Neither ``ps`` nor /proc/PID/cmdline of the worker, its fork
    server, its job processes or their programs shows a password."""
    titles = secret_worker["titles"]
    assert len(titles) >= 4, f"expected the worker, its fork server and the jobs: {titles}"
    assert any("sleep 4" in line for line in titles.values()), titles
    for pid, line in titles.items():
        assert not leaks(line, secret_worker["passwords"]), (pid, line)
    assert not leaks(secret_worker["ps"], secret_worker["passwords"])


def test_shell_job_environment_has_no_password_variables(secret_worker):
    """A ``shell!`` program's environment has no RBIT_*_PASSWORD and no password."""
    env = secret_worker["shell_env"]
    assert env is not None and "RBIT_ID=6101" in env.splitlines()
    names = [line.partition("=")[0] for line in env.splitlines()]
    present = [name for name in ("RBIT_AMQP_PASSWORD", "RBIT_PYBIT_PASSWORD") if name in names]
    assert present == [], f"the shell job's environment has {present}"
    assert leaks(env, [secret_worker["amqp_pw"], secret_worker["pybit_pw"]]) == []


def test_python_job_process_does_not_inherit_password_variables(secret_worker):
    """Job processes do not inherit rbit's password variables: a
    ``python!`` runner's process (which may start anything) has no RBIT_AMQP_PASSWORD."""
    env = secret_worker["python_env"]
    assert env is not None
    present = [name for name in ("RBIT_AMQP_PASSWORD", "RBIT_PYBIT_PASSWORD") if name in env]
    assert present == [], f"the python job's process has {present} in os.environ"
    assert leaks(json.dumps(env), [secret_worker["amqp_pw"]]) == []


def test_wrong_password_and_closed_port_log_no_password(tmp_path):
    """A worker whose broker is down logs each connection attempt and the
    world-readable-file warning, at debug level, without the (wrong) password."""
    password = f"Wrong-{uuid.uuid4().hex[:8]}-p@ss/word"
    path = offline_config(tmp_path / "rbit.ini", RUNNERS, amqp={"password": password}, mode=0o644)
    worker = WorkerProcess(path, "-v").start()
    try:
        worker.wait_log(r"every user can read it", timeout=15)
        worker.wait_log(r"cannot reach the broker", count=2, timeout=20)
        worker.signal(signal.SIGTERM)
        assert worker.wait(20) == 0
    finally:
        worker.stop()
    assert not leaks(worker.log, [password]), worker.log


@pytest.fixture
def broker_user(vhost):
    """A broker user of the test's own with a distinctive password; deleted after."""
    token = uuid.uuid4().hex[:8]
    user, password = f"rbit-secret-{token}", f"Right-{token}-p@ss"
    rabbitmqctl("add_user", user, password)
    rabbitmqctl("set_permissions", "-p", vhost.name, user, ".*", ".*", ".*")
    yield user, password
    rabbitmqctl("delete_user", user, check=False)


def test_wrong_password_on_the_real_broker_logs_no_password(tmp_path, vhost, broker_user):
    """Refused by the real broker (wrong password), the worker's log and
    ``--check-connections`` output hold neither the wrong nor the right password."""
    user, right = broker_user
    wrong = f"Wrong-{uuid.uuid4().hex[:8]}-p@ss/word"
    path = write_config(tmp_path / "rbit.ini", name=f"wrongpw-{uuid.uuid4().hex[:8]}", vhost=vhost,
                        amqp={"user": user, "password": wrong},
                        runners={QUEUE: {"runner": "python!rbitext.hello:hello"}})
    path.chmod(0o600)
    worker = WorkerProcess(path, "-v").start()
    try:
        worker.wait_log(r"ACCESS_REFUSED|[Aa]ccess refused|[Ll]ogin was refused", timeout=30)
    finally:
        worker.stop()
    assert not leaks(worker.log, [wrong, right]), worker.log
    check = rbit("run", "--check-connections", path, timeout=60)
    assert check.returncode == 1
    assert not leaks(check.stdout + check.stderr, [wrong, right])


def test_wrong_password_is_one_clear_message_not_a_traceback(tmp_path, vhost, broker_user):
    """A wrong password is one clear message, not a traceback: a worker whose
    [amqp] password the broker refuses says so in one line and exits non-zero, no traceback."""
    user, _ = broker_user
    path = write_config(tmp_path / "rbit.ini", name=f"wrongpw-{uuid.uuid4().hex[:8]}", vhost=vhost,
                        amqp={"user": user, "password": "certainly-wrong"},
                        runners={QUEUE: {"runner": "python!rbitext.hello:hello"}})
    path.chmod(0o600)
    worker = WorkerProcess(path).start()
    try:
        code = worker.wait(30)
    finally:
        worker.stop()
    assert code != 0
    assert re.search(r"ACCESS_REFUSED|[Ll]ogin was refused", worker.log), worker.log
    assert "Traceback" not in worker.log, worker.log
