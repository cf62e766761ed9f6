"""The README's hello example ("Quick start"): rbit.ini.example, as shipped, runs a request to Done.

The test copies the example and rewrites only what must differ on the test
broker: the virtual host, the broker's address, and the names (worker, rejected
queue, distribution and runner section) so that they are this test's own.
"""

import re
import subprocess
import sys

from .broker import AMQP_HOST, AMQP_PORT
from .harness import ROOT, WorkerProcess, job_log
from .pybit_models import request_body

EXAMPLE = ROOT / "rbit.ini.example"


def rewrite(text, section, key, value):
    """Set *key* of *section* in ini *text* (the key must be there, uncommented)."""
    pattern = re.compile(rf"(^\[{re.escape(section)}\][^\[]*?^{re.escape(key)}\s*=)[^\n]*", re.M | re.S)
    new, count = pattern.subn(lambda match: f"{match.group(1)} {value}", text, count=1)
    assert count == 1, f"rbit.ini.example has no [{section}] {key}"
    return new


def example_copy(tmp_path, vhost, unique):
    """rbit.ini.example, rewritten for the test broker and this test's names; returns (path, dist)."""
    text = EXAMPLE.read_text()
    assert "[runner:cnx_any_latex_pdf]" in text
    assert "runner = python!rbitext.hello:hello" in text
    dist = f"hello{unique}"
    text = rewrite(text, "rbit", "name", f"hello-{unique}")
    text = rewrite(text, "rbit", "distribution", dist)
    text = rewrite(text, "rbit", "rejected_queue", f"rbit.rejected.hello-{unique}")
    text = rewrite(text, "amqp", "host", AMQP_HOST)
    text = rewrite(text, "amqp", "port", str(AMQP_PORT))
    text = rewrite(text, "amqp", "virtual_host", vhost.name)
    text = text.replace("[runner:cnx_any_latex_pdf]", f"[runner:{dist}_any_latex_pdf]")
    path = tmp_path / "rbit.ini"
    path.write_text(text)
    return path, dist


def test_hello_example_runs_a_request_to_done(tmp_path, vhost, unique):
    """The shipped example, pointed at the test broker, serves its queue with
    python!rbitext.hello:hello: a request published as PyBit's controller does logs
    "Hello, World!" in the job's log and ends Done."""
    path, dist = example_copy(tmp_path, vhost, unique)
    queue = f"{dist}_any_latex_pdf"
    with WorkerProcess(path) as worker:
        worker.wait_ready(timeout=20)
        vhost.publish_build(request_body(301, package="hello", version="1.0-1", dist=dist, arch="any",
                                         suite="latex", fmt="pdf"), f"{dist}.any.latex.pdf")
        worker.wait_log(r"job 301: hello 1\.0-1 from \S+ ended Done", timeout=15)
    assert worker.process.returncode == 0
    assert re.search(rf"Hello, World! Job 301 asks for hello 1\.0-1 on any \(queue {queue}\)", job_log(path, 301))
    assert re.search(rf"job 301 queue {queue}: Done", worker.log)
    assert vhost.depth(queue) == 0


def test_readme_quick_start_with_rbit_publish(tmp_path, vhost, unique):
    """The README's quick start: `rbit publish CONFIG --job-id 1 --package hello --version 1.0`
    gives the running example worker a job; the job ends Done and `rbit logs CONFIG 1` prints
    its log: "Hello, World! Job 1 asks for hello 1.0"."""
    path, dist = example_copy(tmp_path, vhost, unique)
    queue = f"{dist}_any_latex_pdf"
    with WorkerProcess(path) as worker:
        worker.wait_ready(timeout=20)
        done = subprocess.run(
            [sys.executable, "-m", "rbit", "publish", str(path), "--job-id", "1", "--package", "hello",
             "--version", "1.0"],
            capture_output=True, text=True, timeout=20, env=worker.env)
        assert done.returncode == 0, done.stdout + done.stderr
        worker.wait_log(r"job 1: hello 1\.0 from \S+ ended Done", timeout=15)
    shown = subprocess.run([sys.executable, "-m", "rbit", "logs", str(path), "1"],
                           capture_output=True, text=True, timeout=20, env=worker.env)
    assert shown.returncode == 0, shown.stderr
    assert "Hello, World! Job 1 asks for hello 1.0" in shown.stdout
    assert "Hello, World!" not in worker.log
    assert re.search(rf"job 1 queue {queue}: Done", worker.log)
