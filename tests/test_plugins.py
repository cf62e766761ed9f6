"""Processors added by plugins through the ``rbit.processors`` entry-point group (the README's
"Processors from plugins").

A package adds a processor beside ``python`` and ``shell`` without changing
rbit; an unknown processor, or a plugin processor that cannot be imported or is
not a Runner, is a configuration error reported before any connection
("Configuration errors"). ``tests/plugin/`` is a plugin as a
distribution ships it: a module and a ``.dist-info`` folder whose
``entry_points.txt`` registers ``echo`` (a working Runner), ``notarunner`` (a
class that is not a Runner) and ``broken`` (a module that does not exist).
Putting the folder on the path is enough for ``importlib.metadata``.
"""

import os

import pytest

from rbit import runners
from rbit.config import load
from rbit.errors import ConfigError
from rbit.runners import Runner, processors

from .harness import ROOT, WorkerProcess, offline_config, write_config
from .test_tools import rbit, request_body

PLUGIN_DIR = ROOT / "tests" / "plugin"

#: PYTHONPATH for rbit subprocesses: what the harness sets, plus the plugin folder.
PLUGIN_PATH = os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(PLUGIN_DIR)])

#: The queue of the configurations that need no broker.
QUEUE = "p_any_latex_pdf"


def test_echo_plugin_runs_a_job_through_the_worker(tmp_path, vhost, unique, pybit_web):
    """An ``echo!`` job from the broker runs in a real worker that
    found the processor by its entry point only; the job ends Done and the file is written."""
    dist = f"e{unique}"
    queue, key = f"{dist}_any_latex_pdf", f"{dist}.any.latex.pdf"
    output = tmp_path / "echo.txt"
    config = write_config(tmp_path / "rbit.ini", name=f"plugin-{unique}", vhost=vhost,
                          pybit={"url": pybit_web.url, "user": "admin", "password": "secret"},
                          runners={queue: {"runner": "echo!hello from a plugin", "output": str(output)}})
    pybit_web.add_job(8801)
    with WorkerProcess(config, env={"PYTHONPATH": PLUGIN_PATH}) as worker:
        worker.wait_ready()
        vhost.publish_build(request_body(8801, dist), key)
        worker.wait_log(r"job 8801: .* ended Done")
        assert pybit_web.wait_for((8801, "Done"))
    assert output.read_text() == f"hello from a plugin 8801 {queue}\n"
    assert pybit_web.statuses(8801) == ["Waiting", "Building", "Done"]
    assert vhost.depth(queue) == 0


def test_processors_lists_the_plugin_when_it_is_on_the_path(monkeypatch, tmp_path):
    """``processors()`` finds ``echo`` through the entry-point group once the
    plugin's folder is on ``sys.path`` (and not before); the config builds an EchoRunner."""
    assert "echo" not in processors(), "the test plugin must not be installed for real"
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    found = processors()
    assert {"python", "shell", "echo"} <= set(found)
    assert found["echo"].value == "rbit_echo_plugin:EchoRunner"
    cls = runners.get_processor("echo")
    assert issubclass(cls, Runner) and cls.__name__ == "EchoRunner"
    runner = runners.load("echo!some text", {"output": str(tmp_path / "out")})
    assert isinstance(runner, cls) and runner.spec == "some text"

    config = load(offline_config(tmp_path / "plugin.ini",
                                 {QUEUE: {"runner": "echo!configured", "output": str(tmp_path / "out")}}))
    assert type(config.runners[0].runner).__name__ == "EchoRunner"
    assert config.runners[0].settings == {"output": str(tmp_path / "out")}


def test_plugin_runner_checks_its_settings_at_config_time(monkeypatch, tmp_path):
    """A plugin's own ConfigError (no ``output``) names section and key."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    with pytest.raises(ConfigError) as caught:
        load(offline_config(tmp_path / "plugin.ini", {QUEUE: {"runner": "echo!no output given"}}))
    assert caught.value.section == "runner:p_any_latex_pdf" and caught.value.key == "runner"
    assert "output" in str(caught.value)


@pytest.mark.parametrize("line, expected", [
    ("ecko!hi", "did you mean 'echo'?"),
    ("shel!/bin/true", "did you mean 'shell'?"),
    ("pythn!rbitext.hello:hello", "did you mean 'python'?"),
])
def test_unknown_processor_is_a_config_error_with_a_hint(tmp_path, line, expected):
    """An unknown processor stops ``rbit CONFIG`` before connecting,
    exit 2, one message naming file, section and key with "did you mean"; no traceback."""
    output = tmp_path / "out"
    config = offline_config(tmp_path / "plugin.ini", {QUEUE: {"runner": line, "output": str(output)}})
    result = rbit(config, env={"PYTHONPATH": PLUGIN_PATH}, timeout=30)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert expected in result.stderr
    assert str(config) in result.stderr and "[runner:p_any_latex_pdf]" in result.stderr
    assert "'runner'" in result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot reach the broker" not in result.stderr


@pytest.mark.parametrize("line, expected", [
    ("notarunner!x", "not a rbit.runners.Runner subclass"),
    ("broken!x", "cannot be loaded"),
])
def test_a_bad_plugin_is_refused_at_config_time(tmp_path, line, expected):
    """A registered processor that is not a Runner subclass, or whose
    module cannot be imported, is refused when the configuration is read: exit 2, no traceback."""
    config = offline_config(tmp_path / "plugin.ini", {QUEUE: {"runner": line}})
    for args in ((config,), ("run", "--check", config)):
        result = rbit(*args, env={"PYTHONPATH": PLUGIN_PATH}, timeout=30)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert expected in result.stderr
        assert "[runner:p_any_latex_pdf]" in result.stderr
        assert "Traceback" not in result.stderr


def test_not_a_runner_is_refused_by_load(monkeypatch, tmp_path):
    """``rbit.config.load`` raises ConfigError for a non-Runner plugin class."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    with pytest.raises(ConfigError) as caught:
        load(offline_config(tmp_path / "plugin.ini", {QUEUE: {"runner": "notarunner!x"}}))
    assert caught.value.section == "runner:p_any_latex_pdf"
    assert "not a rbit.runners.Runner subclass" in caught.value.reason
