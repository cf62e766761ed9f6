"""The ini configuration (the README's "Configuration reference"): what it sets, and how each
mistake is refused ("Configuration errors").

A mistake is refused before any connection with exit status 2 and one line naming
the file, the section and the key; the error cases run the real ``python -m rbit``
against a closed port, so a worker that tried to connect first would not answer
at once.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from rbit import config as config_module
from rbit.errors import ConfigError

from .harness import WorkerProcess, environment, free_port, write_config

QUEUE = "cnx_any_latex_pdf"


def ini(sections):
    """Ini text from ``{section: {key: value}}``; a value of None leaves the key out."""
    lines = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {value}" for key, value in keys.items() if value is not None]
        lines.append("")
    return "\n".join(lines)


def base_sections(port=5672):
    return {
        "rbit": {"name": "bob-villa", "polling_time": "60", "blocked_delay": "60"},
        "amqp": {"host": "127.0.0.1", "port": str(port), "user": "guest", "password": "guest"},
        f"runner:{QUEUE}": {"runner": "python!rbitext.hello:hello", "name": "World"},
    }


def run_rbit(path, *args, env=None, timeout=10):
    """``python -m rbit PATH ARGS``; returns (exit status, stdout, stderr, seconds taken)."""
    environ = environment(**(env or {}))
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "rbit", str(path), *args], capture_output=True,
                              text=True, env=environ, timeout=timeout, cwd=str(Path(path).parent))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"rbit did not exit within {timeout} s (did it try to connect?): {exc.stderr!r}")
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


def edit(change):
    def apply(sections):
        change(sections)
        return sections
    return apply


def runner_key(key, value):
    return edit(lambda s: s[f"runner:{QUEUE}"].__setitem__(key, value))


#: (id, how to spoil the base configuration, section named, key named, words in the message).
#: A section of None means the message names only the file.
MISTAKES = [
    ("missing-rbit", edit(lambda s: s.pop("rbit")), "rbit", None, "missing"),
    ("missing-amqp", edit(lambda s: s.pop("amqp")), "amqp", None, "missing"),
    ("missing-name", edit(lambda s: s["rbit"].pop("name")), "rbit", "name", "required"),
    ("polling-time-not-a-number", edit(lambda s: s["rbit"].update(polling_time="soon")),
     "rbit", "polling_time", "soon"),
    ("blocked-delay-not-a-number", edit(lambda s: s["rbit"].update(blocked_delay="1m")),
     "rbit", "blocked_delay", "1m"),
    ("timeout-not-a-number", runner_key("timeout", "an hour"), f"runner:{QUEUE}", "timeout", "an hour"),
    ("unknown-key", edit(lambda s: s["rbit"].update(poling_time="60")),
     "rbit", "poling_time", "did you mean 'polling_time'"),
    ("unknown-amqp-key", edit(lambda s: s["amqp"].update(virtualhost="/")),
     "amqp", "virtualhost", "did you mean 'virtual_host'"),
    ("section-without-runner", runner_key("runner", None), f"runner:{QUEUE}", "runner", "required"),
    ("unknown-processor", runner_key("runner", "pyhton!rbitext.hello:hello"),
     f"runner:{QUEUE}", "runner", "did you mean 'python'"),
    ("unimportable-module", runner_key("runner", "python!no_such_module_rbit_test:hello"),
     f"runner:{QUEUE}", "runner", "no_such_module_rbit_test"),
    ("missing-function", runner_key("runner", "python!rbitext.hello:no_such_function"),
     f"runner:{QUEUE}", "runner", "no_such_function"),
    ("shell-program-not-found", runner_key("runner", "shell!/no/such/program-rbit %PACKAGE"),
     f"runner:{QUEUE}", "runner", "/no/such/program-rbit"),
    ("unknown-placeholder", runner_key("runner", "shell!/bin/echo %PACKAGE %NOPE"),
     f"runner:{QUEUE}", "runner", "%NOPE"),
    ("unbalanced-quotes", runner_key("runner", "shell!/bin/echo 'unbalanced %PACKAGE"),
     f"runner:{QUEUE}", "runner", "quotation"),
    ("no-runner-section", edit(lambda s: s.pop(f"runner:{QUEUE}")), None, None, "runner:QUEUE"),
    ("runner-section-without-queue",
     edit(lambda s: s.__setitem__("runner:", {"runner": "python!rbitext.hello:hello"})), "runner:", None, "QUEUE"),
    ("runner-line-without-processor", runner_key("runner", "rbitext.hello:hello"),
     f"runner:{QUEUE}", "runner", "PROCESSOR!SPEC"),
    ("python-runner-without-function", runner_key("runner", "python!rbitext.hello"),
     f"runner:{QUEUE}", "runner", "module:function"),
    ("port-not-a-number", edit(lambda s: s["amqp"].update(port="amqp")), "amqp", "port", "amqp"),
    ("unknown-pybit-key", edit(lambda s: s.__setitem__("pybit", {"usr": "admin"})),
     "pybit", "usr", "did you mean 'user'"),
    ("queue-without-routing-key",
     edit(lambda s: s.__setitem__("runner:notapybitqueue", {"runner": "python!rbitext.hello:hello"})),
     "runner:notapybitqueue", "routing_key", "notapybitqueue"),
    ("unknown-section", edit(lambda s: s.__setitem__("worker", {"name": "x"})), "worker", None, "unknown section"),
    ("rejected-queue-empty", edit(lambda s: s["rbit"].update(rejected_queue="")),
     "rbit", "rejected_queue", "required"),
    ("concurrency-zero", edit(lambda s: s["rbit"].update(concurrency="0")), "rbit", "concurrency", "at least 1"),
    ("concurrency-not-whole", edit(lambda s: s["rbit"].update(concurrency="1.5")),
     "rbit", "concurrency", "whole number"),
    ("polling-time-negative", edit(lambda s: s["rbit"].update(polling_time="-5")), "rbit", "polling_time", "at least"),
    ("shutdown-grace-infinite", edit(lambda s: s["rbit"].update(shutdown_grace="inf")),
     "rbit", "shutdown_grace", "at least"),
    ("heartbeat-not-a-number", edit(lambda s: s["amqp"].update(heartbeat="often")), "amqp", "heartbeat", "often"),
    ("ssl-not-a-flag", edit(lambda s: s["amqp"].update(ssl="maybe")), "amqp", "ssl", "true or false"),
    ("verify-not-a-flag", edit(lambda s: s["amqp"].update(verify="2")), "amqp", "verify", "true or false"),
    ("http-not-host-port", edit(lambda s: s["rbit"].update(http="9090x")), "rbit", "http", "HOST:PORT"),
    ("pybit-url-without-scheme", edit(lambda s: s.__setitem__("pybit", {"url": "pybit.example:8080"})),
     "pybit", "url", "http://"),
    ("pybit-timeout-not-a-number", edit(lambda s: s.__setitem__("pybit", {"timeout": "slow"})),
     "pybit", "timeout", "slow"),
    ("pybit-user-without-url", edit(lambda s: s.__setitem__("pybit", {"user": "admin"})),
     "pybit", "url", "credentials go only to the configured PyBit"),
    ("pybit-password-without-url", edit(lambda s: s.__setitem__("pybit", {"password": "secret"})),
     "pybit", "url", "credentials go only to the configured PyBit"),
    ("pybit-password-file-without-url",
     edit(lambda s: s.__setitem__("pybit", {"password_file": "/etc/hostname"})),
     "pybit", "url", "credentials go only to the configured PyBit"),
    ("nothing-after-processor", runner_key("runner", "python!"), f"runner:{QUEUE}", "runner", "nothing after"),
    ("queue-type-unknown", edit(lambda s: s["amqp"].update(queue_type="mirrored")),
     "amqp", "queue_type", "classic or quorum"),
    ("host-port-not-a-number", edit(lambda s: s["amqp"].update(host="127.0.0.1:amqp")),
     "amqp", "host", "1 to 65535"),
    ("host-port-out-of-range", edit(lambda s: s["amqp"].update(host="a.example, 127.0.0.1:65536")),
     "amqp", "host", "1 to 65535"),
    ("host-port-empty", edit(lambda s: s["amqp"].update(host="127.0.0.1:")), "amqp", "host", "1 to 65535"),
    ("host-empty-entry", edit(lambda s: s["amqp"].update(host="a.example,,b.example")), "amqp", "host", "empty entry"),
    ("host-trailing-comma", edit(lambda s: s["amqp"].update(host="a.example,")), "amqp", "host", "empty entry"),
    ("host-ipv6-without-brackets-and-port", edit(lambda s: s["amqp"].update(host="::1:5672:x")),
     "amqp", "host", "in brackets"),
    ("host-ipv6-unclosed-bracket", edit(lambda s: s["amqp"].update(host="[::1:5672")), "amqp", "host", "in brackets"),
    ("host-not-ipv6-in-brackets", edit(lambda s: s["amqp"].update(host="[rabbit]:5672")),
     "amqp", "host", "not an IPv6 address"),
    ("host-junk-after-brackets", edit(lambda s: s["amqp"].update(host="[::1]5672")), "amqp", "host", "in brackets"),
    ("host-is-a-url", edit(lambda s: s["amqp"].update(host="amqp://rabbit.example")), "amqp", "host", "not URLs"),
    ("host-with-user", edit(lambda s: s["amqp"].update(host="guest@rabbit.example")),
     "amqp", "host", "not a host name"),
    ("host-with-space", edit(lambda s: s["amqp"].update(host="rabbit one")), "amqp", "host", "not a host name"),
    ("port-out-of-range", edit(lambda s: s["amqp"].update(port="70000")), "amqp", "port", "1 to 65535"),
    ("function-not-callable", runner_key("runner", "python!rbitext.hello:log.name"),
     f"runner:{QUEUE}", "runner", "not callable"),
]


def check_one_line(output, path, section, key, words):
    """The output is one line naming the file, the section and the key, without a traceback."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    [line] = lines
    assert "Traceback" not in output
    assert str(path) in line
    if section is not None:
        assert f"[{section}]" in line
    if key is not None:
        assert key in line
    assert words in line
    return line


@pytest.mark.parametrize("spoil, section, key, words", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_mistake_is_refused_in_one_line_before_connecting(tmp_path, spoil, section, key, words):
    """Each configuration mistake ends `python -m rbit CONFIG` at once, before any
    connection (the broker port is closed), with exit status 2 and one line naming the file,
    the section and the key, and no traceback."""
    path = tmp_path / "rbit.ini"
    path.write_text(ini(spoil(base_sections(port=free_port()))))
    code, out, err, took = run_rbit(path)
    assert code == 2, (out, err)
    check_one_line(out + err, path, section, key, words)
    assert "broker" not in (out + err).lower()
    assert took < 5.0


@pytest.mark.parametrize("spoil, section, key, words", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_mistake_raises_config_error_naming_section_and_key(tmp_path, spoil, section, key, words):
    """rbit.config.load raises ConfigError whose section and key point at the mistake."""
    path = tmp_path / "rbit.ini"
    path.write_text(ini(spoil(base_sections())))
    with pytest.raises(ConfigError) as caught:
        config_module.load(path, environ={})
    error = caught.value
    assert (error.section, error.key) == (section, key)
    assert Path(error.path) == path
    assert words in str(error)


def logging_sections(handler_class="StreamHandler", args="()", level="INFO"):
    """``logging.config.fileConfig`` sections with one handler, to spoil."""
    return {
        "loggers": {"keys": "root"},
        "handlers": {"keys": "main"},
        "formatters": {"keys": "plain"},
        "logger_root": {"level": level, "handlers": "main"},
        "handler_main": {"class": handler_class, "formatter": "plain", "args": args},
        "formatter_plain": {"format": "%(message)s"},
    }


LOGGING_MISTAKES = {
    "unknown-handler-class": logging_sections(handler_class="NoSuchHandlerClass"),
    "unknown-level": logging_sections(level="LOUD"),
    "log-file-in-missing-directory": logging_sections(handler_class="FileHandler",
                                                      args="('/nonexistent-rbit-dir/rbit.log',)"),
    "args-not-python": logging_sections(args="("),
    "args-do-not-fit": logging_sections(args="(1, 2, 3, 4)"),
}


@pytest.mark.parametrize("logging_part", list(LOGGING_MISTAKES.values()), ids=list(LOGGING_MISTAKES))
def test_logging_mistake_is_refused_in_one_line_before_connecting(tmp_path, logging_part):
    """A mistake in the logging sections is a configuration mistake too: exit
    status 2 at once, one line naming the file and a section, no traceback."""
    path = tmp_path / "rbit.ini"
    path.write_text(ini({**base_sections(port=free_port()), **logging_part}))
    code, out, err, took = run_rbit(path)
    assert "Traceback" not in out + err
    assert code == 2, (out, err)
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1, out + err
    assert str(path) in lines[0] and "[" in lines[0]
    assert took < 5.0


def test_check_refuses_a_logging_mistake(tmp_path):
    """`rbit CONFIG --check` refuses a configuration that `rbit CONFIG` would refuse:
    here, logging sections naming a handler class that does not exist."""
    path = tmp_path / "rbit.ini"
    path.write_text(ini({**base_sections(port=free_port()), **LOGGING_MISTAKES["unknown-handler-class"]}))
    code, out, err, _ = run_rbit(path)
    assert code == 2, (out, err)
    code, out, err, _ = run_rbit(path, "--check")
    assert code == 2, (out, err)
    assert "NoSuchHandlerClass" in out + err


def test_missing_file_is_refused_in_one_line(tmp_path):
    """A configuration file that does not exist: exit 2, one line naming it."""
    path = tmp_path / "nowhere.ini"
    code, out, err, took = run_rbit(path)
    assert code == 2
    check_one_line(out + err, path, None, None, "no such file")
    assert took < 5.0


def test_file_that_is_not_ini_is_refused_in_one_line(tmp_path):
    """A file that is not ini at all: exit 2, one line naming it, no traceback."""
    path = tmp_path / "rbit.ini"
    path.write_text("name = bob-villa\nthis is not an ini file\n")
    code, out, err, took = run_rbit(path)
    assert code == 2
    check_one_line(out + err, path, None, None, "ini")
    assert took < 5.0


def test_binary_file_is_refused_in_one_line(tmp_path):
    """A file that is not even text: exit 2, one line naming it, no traceback."""
    path = tmp_path / "rbit.ini"
    path.write_bytes(b"\xff\xfe\x00[rbit]\x00\x80")
    code, out, err, took = run_rbit(path)
    assert code == 2
    check_one_line(out + err, path, None, None, str(path))
    assert took < 5.0


def test_error_line_never_shows_a_password(tmp_path):
    """A mistake in [amqp] is reported without the password written beside it."""
    sections = base_sections(port=free_port())
    sections["amqp"].update(password="hunter2-very-secret", heartbeat="often")
    path = tmp_path / "rbit.ini"
    path.write_text(ini(sections))
    code, out, err, _ = run_rbit(path)
    assert code == 2
    check_one_line(out + err, path, "amqp", "heartbeat", "often")
    assert "hunter2" not in out + err


# -- what a good configuration gives ---------------------------------------------


def load(tmp_path, sections, environ=None):
    path = tmp_path / "rbit.ini"
    path.write_text(ini(sections))
    return config_module.load(path, environ=environ or {})


def test_required_sections_only_and_pybit_optional(tmp_path):
    """[rbit] and [amqp] (with a runner section) are enough; without [pybit] there is no
    PyBit to report to, and the documented defaults apply."""
    sections = base_sections()
    sections["rbit"] = {"name": "bob-villa"}
    sections["amqp"] = {}
    config = load(tmp_path, sections)
    assert config.pybit is None
    assert config.worker.name == "bob-villa"
    assert config.worker.polling_time == 60
    assert config.worker.blocked_delay == 60
    assert config.worker.rejected_queue == "rbit.rejected"
    assert config.amqp.hosts == ("localhost",)
    assert (config.amqp.port, config.amqp.user, config.amqp.virtual_host) == (5672, "guest", "/")


def test_amqp_hosts_may_carry_their_own_ports(tmp_path):
    """``[amqp] host``, README "Clusters": each entry is HOST, HOST:PORT, [IPv6] or [IPv6]:PORT
    (or a bare IPv6 address); an entry without a port gets ``port``; the order is kept for
    failover; queue_type defaults to classic."""
    sections = base_sections()
    sections["amqp"].update(host="rabbit-1.example, 127.0.0.1:5673 ,[::1]:5674, [fd00::2], ::1", port="5680")
    config = load(tmp_path, sections)
    assert [(a.host, a.port) for a in config.amqp.addresses] == [
        ("rabbit-1.example", 5680), ("127.0.0.1", 5673), ("::1", 5674), ("fd00::2", 5680), ("::1", 5680)]
    assert [str(a) for a in config.amqp.addresses] == [
        "rabbit-1.example:5680", "127.0.0.1:5673", "[::1]:5674", "[fd00::2]:5680", "[::1]:5680"]
    assert config.amqp.hosts == ("rabbit-1.example", "127.0.0.1", "::1", "fd00::2", "::1")
    assert config.amqp.queue_type == "classic"
    sections["amqp"]["queue_type"] = "Quorum"
    assert load(tmp_path, sections).amqp.queue_type == "quorum"


def test_check_refuses_a_host_the_worker_cannot_use(tmp_path):
    """A bad configuration is refused at start: ``rbit CONFIG --check`` says
    "configuration OK" only for hosts the worker can use; ``127.0.0.1:5673`` is one of them,
    ``127.0.0.1:x`` is not (exit 2, one line, no traceback)."""
    sections = base_sections(port=free_port())
    sections["amqp"]["host"] = "127.0.0.1:5673"
    path = tmp_path / "rbit.ini"
    path.write_text(ini(sections))
    code, out, err, _ = run_rbit(path, "--check")
    assert code == 0 and "configuration OK" in out, (out, err)
    sections["amqp"]["host"] = "127.0.0.1:x"
    path.write_text(ini(sections))
    code, out, err, _ = run_rbit(path, "--check")
    assert code == 2, (out, err)
    check_one_line(out + err, path, "amqp", "host", "1 to 65535")


def test_every_runner_section_serves_its_queue_with_pybits_routing_key(tmp_path):
    """Every [runner:QUEUE] makes the worker serve QUEUE, bound with the key
    DIST.ARCH.SUITE.FORMAT; [rbit]'s declared capabilities name the key of a queue whose
    parts contain underscores; routing_key can be given."""
    sections = base_sections()
    sections["rbit"].update(distribution="my_dist", architecture="any", format="pdf", suites="latex, html")
    sections.pop(f"runner:{QUEUE}")
    sections["runner:cnx_any_latex_pdf"] = {"runner": "python!rbitext.hello:hello"}
    sections["runner:my_dist_any_html_pdf"] = {"runner": "python!rbitext.hello:hello"}
    sections["runner:odd-queue"] = {"runner": "python!rbitext.hello:hello", "routing_key": "a.b.c.d"}
    config = load(tmp_path, sections)
    assert [(s.queue, s.routing_key) for s in config.runners] == [
        ("cnx_any_latex_pdf", "cnx.any.latex.pdf"),
        ("my_dist_any_html_pdf", "my_dist.any.html.pdf"),
        ("odd-queue", "a.b.c.d"),
    ]
    assert config.worker.suites == ("latex", "html")
    assert config.runner_for("odd-queue").routing_key == "a.b.c.d"


def test_other_runner_keys_reach_the_runner_as_settings(tmp_path):
    """Every key of a runner section but rbit's own (runner, timeout, routing_key) is
    handed to the runner as its settings."""
    sections = base_sections()
    sections[f"runner:{QUEUE}"].update(timeout="3600", colour="blue", **{"out-dir": "/srv/out"})
    config = load(tmp_path, sections)
    [section] = config.runners
    assert section.timeout == 3600
    assert section.settings == {"name": "World", "colour": "blue", "out-dir": "/srv/out"}
    assert section.runner.settings == section.settings


def test_no_percent_interpolation(tmp_path):
    """The file is read without % interpolation: a runner line with %ID and %% and a setting
    with %(foo)s survive as written."""
    sections = base_sections()
    sections[f"runner:{QUEUE}"] = {
        "runner": "shell!/bin/echo job=%ID %PACKAGE 100%%",
        "template": "%(foo)s and 50%",
    }
    config = load(tmp_path, sections)
    [section] = config.runners
    assert section.runner.argv == ["/bin/echo", "job=%ID", "%PACKAGE", "100%%"]
    assert section.settings == {"template": "%(foo)s and 50%"}


def test_passwords_from_the_environment(tmp_path, monkeypatch):
    """RBIT_AMQP_PASSWORD and RBIT_PYBIT_PASSWORD give the passwords, over the file's."""
    sections = base_sections()
    sections["pybit"] = {"url": "http://pybit.example:8080", "user": "admin", "password": "in-file"}
    path = tmp_path / "rbit.ini"
    path.write_text(ini(sections))
    monkeypatch.setenv("RBIT_AMQP_PASSWORD", "amqp-from-env")
    monkeypatch.setenv("RBIT_PYBIT_PASSWORD", "pybit-from-env")
    config = config_module.load(path)
    assert config.amqp.password == "amqp-from-env"
    assert config.pybit.password == "pybit-from-env"
    assert config.pybit.user == "admin"
    assert "from-env" not in repr(config)


def test_passwords_from_password_files(tmp_path):
    """password_file names a file holding the password (its trailing newline dropped)."""
    (tmp_path / "amqp.secret").write_text("amqp-from-file\n")
    (tmp_path / "pybit.secret").write_text("pybit-from-file\n")
    sections = base_sections()
    sections["amqp"] = {"password_file": str(tmp_path / "amqp.secret")}
    sections["pybit"] = {"url": "http://pybit.example", "user": "admin",
                         "password_file": str(tmp_path / "pybit.secret")}
    config = load(tmp_path, sections)
    assert config.amqp.password == "amqp-from-file"
    assert config.pybit.password == "pybit-from-file"


def test_pybit_password_from_the_environment_needs_a_url(tmp_path, monkeypatch):
    """Credentials go only to the configured PyBit: a [pybit] section without url, with
    RBIT_PYBIT_PASSWORD set, is refused naming [pybit] and url; without any credentials,
    statuses may follow each request's web_host."""
    sections = base_sections()
    sections["pybit"] = {"timeout": "5"}
    path = tmp_path / "rbit.ini"
    path.write_text(ini(sections))
    assert config_module.load(path, environ={}).pybit.url is None
    with pytest.raises(ConfigError) as caught:
        config_module.load(path, environ={"RBIT_PYBIT_PASSWORD": "from-env"})
    assert (caught.value.section, caught.value.key) == ("pybit", "url")
    assert "from-env" not in str(caught.value)


def test_unreadable_password_file_names_section_and_key(tmp_path):
    """A password_file that cannot be read is a configuration error naming the key."""
    sections = base_sections(port=free_port())
    sections["amqp"] = {"port": sections["amqp"]["port"], "password_file": str(tmp_path / "missing.secret")}
    path = tmp_path / "rbit.ini"
    path.write_text(ini(sections))
    code, out, err, took = run_rbit(path)
    assert code == 2
    check_one_line(out + err, path, "amqp", "password_file", "missing.secret")
    assert took < 5.0


def test_password_from_environment_reaches_the_broker(tmp_path, vhost, unique):
    """With a wrong password in the file, RBIT_AMQP_PASSWORD lets the worker connect."""
    path = write_config(tmp_path / "rbit.ini", name=f"w{unique}", vhost=vhost,
                        runners={f"t{unique}_any_a_pdf": {"runner": "python!rbitext.hello:hello"}},
                        amqp={"password": "wrong-password"})
    with WorkerProcess(path, env={"RBIT_AMQP_PASSWORD": "guest"}) as worker:
        worker.wait_ready(timeout=20)
    assert "wrong-password" not in worker.log


def test_logging_sections_configure_logging(tmp_path, vhost, unique):
    """The logging.config.fileConfig sections, when present, configure the worker's logging
    (here: a file handler with a format of its own)."""
    log_file = tmp_path / "custom.log"
    extra = "\n".join([
        "[loggers]", "keys = root", "",
        "[handlers]", "keys = file", "",
        "[formatters]", "keys = plain", "",
        "[logger_root]", "level = INFO", "handlers = file", "",
        "[handler_file]", "class = FileHandler", "formatter = plain", f"args = ({str(log_file)!r}, 'a')", "",
        "[formatter_plain]", "format = CUSTOM-FORMAT %(levelname)s %(name)s %(message)s", "",
    ])
    path = write_config(tmp_path / "rbit.ini", name=f"w{unique}", vhost=vhost,
                        runners={f"t{unique}_any_a_pdf": {"runner": "python!rbitext.hello:hello"}},
                        extra=extra)
    worker = WorkerProcess(path)
    try:
        worker.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if log_file.exists() and "serving" in log_file.read_text():
                break
            assert worker.process.poll() is None, worker.log
            time.sleep(0.05)
    finally:
        worker.stop()
    assert worker.process.returncode == 0, worker.log
    text = log_file.read_text()
    assert "CUSTOM-FORMAT INFO rbit.worker serving" in text
    assert "CUSTOM-FORMAT INFO rbit.worker stopped" in text
