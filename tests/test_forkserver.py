"""rbit's fork server: job processes forked on request from a server of their own, their pids and
exits reported on its socket, a server that died replaced, and nothing left behind by one that
ends with its worker."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from rbit import jobs, runners
from rbit.forkserver import LOST
from rbit.lease import clock as lease_clock
from rbit.message import Message
from rbit.pybit import decode_build_request

from .harness import alive, cmdline, wait_until
from .pybit_models import request_body
from .reliability_runners import events

RUNNERS = "tests.reliability_runners"


@pytest.fixture
def server():
    made = jobs.fork_server([RUNNERS])
    yield made
    made.close()


def message(job_id):
    body = request_body(job_id, f"p{job_id}", "1.0", "d", "any", "s", "pdf")
    return Message(body=body, request=decode_build_request(body), queue="d_any_s_pdf")


def parent_of(pid):
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def run(process, runner, job_id):
    """Hand *process* its job, then wait for the job's end as the worker sees it."""
    process.begin(runner, message(job_id))
    assert wait_until(lambda: (process.receive(), process.read_output(), process.exited())[-1], 10), \
        "the job never ended"
    return process


def test_a_job_process_is_a_child_of_the_fork_server_in_a_session_of_its_own(server, tmp_path):
    """The worker asks and goes on; the pid comes back on the server's socket, the process is the
    server's child, leads its own session, and its exit is reported with its status."""
    record = tmp_path / "record"
    process = jobs.JobProcess(server)
    process.start(lease=lease_clock() + 60)
    assert process.pid is not None
    assert parent_of(process.pid) == server.process.pid
    assert "rbit.forkserver" in cmdline(server.process.pid)
    assert wait_until(lambda: os.getsid(process.pid) == process.pid, 5)
    run(process, runners.load(f"python!{RUNNERS}:ok", {"record": str(record)}), 1)
    assert [(event, job_id) for event, job_id, *_ in events(record)] == [("start", 1), ("end", 1)]
    assert wait_until(lambda: process.exitcode is not None, 5), "the server never reported the exit"
    assert process.exitcode == 0
    process.close()


def test_a_python_job_ends_with_its_result_and_its_output_pipe_not_its_reaping(server, tmp_path):
    """Once the result has come and the output pipe is closed the job has ended, whether or not the
    exit has been reported yet; what it wrote is all there."""
    process = jobs.JobProcess(server)
    process.start()
    run(process, runners.load(f"python!{RUNNERS}:ok", {}), 2)
    assert process.finished and process.output_eof
    process.close()


def test_an_offered_job_runs_only_at_the_word_go_and_never_if_its_worker_withdraws_it(server, tmp_path):
    """A job is offered while the broker confirms its message's copy: its process reads it and waits,
    runs it at the word go, and never runs one withdrawn (its process killed, as when the copy
    cannot be held)."""
    record = tmp_path / "record"
    runner = runners.load(f"python!{RUNNERS}:ok", {"record": str(record)})
    withdrawn, offered = jobs.JobProcess(server), jobs.JobProcess(server)
    for process in (withdrawn, offered):
        process.start(lease=lease_clock() + 60)
    withdrawn.offer(runner, message(3))
    offered.offer(runner, message(4))
    assert wait_until(lambda: os.getsid(offered.pid) == offered.pid, 5)
    assert not wait_until(lambda: events(record), 0.5), "a job ran before the word go"
    withdrawn.kill()
    withdrawn.close()
    offered.go()
    assert wait_until(lambda: (offered.receive(), offered.read_output(), offered.exited())[-1], 10)
    assert [(event, job_id) for event, job_id, *_ in events(record)] == [("start", 4), ("end", 4)]
    offered.close()


def test_a_killed_child_is_reported_with_the_signal(server):
    process = jobs.JobProcess(server)
    process.start()
    process.kill()
    process.process.join(5)
    assert process.exitcode == -signal.SIGKILL
    process.close()


def test_an_exit_read_anywhere_calls_on_exit(server):
    """An exit taken in while the caller waits for something else (a pid) says so: the worker's
    loop, whose select waits on the server's socket, would find it emptied."""
    told = []
    server.on_exit = lambda: told.append(True)
    first = jobs.JobProcess(server)
    first.start()
    first.kill()
    assert wait_until(lambda: not alive(first.pid), 5)  # reaped: its exit is on the socket
    second = jobs.JobProcess(server)
    second.start()
    assert second.pid is not None  # read until this pid came, the first's exit with it
    assert told and first.process._exitcode == -signal.SIGKILL
    for process in (first, second):
        process.kill()
        process.close()


def test_a_fork_server_that_died_is_replaced_and_its_children_count_as_lost(server):
    """The server is killed: each child it started is taken as gone (LOST), since its exit can no
    longer be reported, and the next process comes from a new server."""
    process = jobs.JobProcess(server)
    process.start()
    pid, old = process.pid, server.process.pid
    os.kill(old, signal.SIGKILL)
    server.process.wait(5)
    assert wait_until(lambda: process.exitcode is not None, 5)
    assert process.exitcode == LOST
    os.kill(pid, signal.SIGKILL)  # the orphan: its worker is still here, so its pipe is open
    process.close()
    again = jobs.JobProcess(server)
    again.start()
    assert server.process.pid != old and parent_of(again.pid) == server.process.pid
    again.kill()
    again.close()


def test_a_server_whose_worker_went_while_it_reported_an_exit_ends_quietly():
    """The worker closes its end as a child's exit is being reported: the server ends with status 0,
    not with a traceback of the record it could not send."""
    made = jobs.fork_server()
    process = jobs.JobProcess(made)
    process.start()
    pid = process.pid
    os.kill(made.process.pid, signal.SIGSTOP)  # so that it finds both at once when it goes on
    try:
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: _state(pid) == "Z", 5), "the child did not die"
        made.sock.close()
        made.sock = None
    finally:
        os.kill(made.process.pid, signal.SIGCONT)
    assert made.process.wait(5) == 0
    process.close()


def _state(pid):
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_the_server_ends_with_its_worker_and_its_children_with_their_pipes(tmp_path):
    """A worker killed with SIGKILL: its fork server sees its socket close and ends; a waiting job
    process sees its pipe close and ends too."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = {sys.path!r}
        from rbit import jobs
        server = jobs.fork_server()
        process = jobs.JobProcess(server)
        process.start()
        print(server.process.pid, process.pid, flush=True)
        time.sleep(60)
    """)
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        server_pid, child_pid = map(int, worker.stdout.readline().split())
        assert alive(server_pid) and alive(child_pid)
    finally:
        worker.kill()
        worker.wait(5)
    assert wait_until(lambda: not alive(server_pid), 5), "the fork server outlived its worker"
    assert wait_until(lambda: not alive(child_pid), 5), "a waiting job process outlived its worker"


def test_the_server_imports_from_the_worker_sys_path(tmp_path, monkeypatch):
    """A runner module found only through the worker's own sys.path (not PYTHONPATH) is imported
    by the fork server, once, not by each job; what it imported is frozen out of the garbage
    collector's sight, so that a job's collections do not copy the shared pages."""
    loaded = tmp_path / "loaded"
    (tmp_path / "only_here.py").write_text(textwrap.dedent(f"""
        import gc
        import os
        LOADED_IN = os.getpid()

        def where(message, set_status, settings):
            with open({str(loaded)!r}, "w") as out:
                out.write(f"{{LOADED_IN}} {{gc.get_freeze_count()}}")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert str(tmp_path) not in os.environ.get("PYTHONPATH", "")
    made = jobs.fork_server(["only_here"])
    try:
        process = jobs.JobProcess(made)
        process.start()
        run(process, runners.load("python!only_here:where", {}), 3)
        pid, frozen = map(int, loaded.read_text().split())
        assert pid == made.process.pid
        assert frozen > 1000
        process.close()
    finally:
        made.close()
