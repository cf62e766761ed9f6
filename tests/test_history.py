"""Build what PyBit wants built: PyBit's history of a job decides whether it runs.

The rule, table by table, then each case through the real worker with the PyBit
stand-in (which answers as PyBit does: JobHistory objects, 404 for a job it has not).
"""

import pytest

from rbit import statuses
from rbit.history import Answer, Entry, fetch, should_run

from .harness import WorkerProcess, wait_until
from .pybit_web import FakePyBit
from .test_worker import body_for, make_config, pybit_section, queue_for, records

ME, OTHER, DEAD = "me", "someone-else", "dead-worker"

#: (history, reclaimed from, runs?, words of the reason)
CASES = [
    ([Entry("Waiting", None)], None, True, "ends in Waiting"),
    ([Entry("Waiting", None), Entry("Blocked", ME)], None, True, "ends in Blocked"),
    ([Entry("Waiting", None), Entry("Blocked", OTHER)], None, True, "ends in Blocked"),
    ([Entry("Waiting", None), Entry("Building", ME)], None, True, "by me, whose run is gone"),
    ([Entry("Building", ME), Entry("Uploaded", ME)], None, True, "Uploaded by me"),
    ([Entry("Building", DEAD)], DEAD, True, f"by {DEAD}, whose run is gone"),
    ([Entry("Building", OTHER)], DEAD, False, f"Building by {OTHER}"),
    ([Entry("Building", OTHER)], None, False, f"Building by {OTHER}"),
    ([Entry("Uploaded", OTHER)], None, False, f"Uploaded by {OTHER}"),
    ([Entry("Building", None)], None, False, "by an unnamed client"),
    ([Entry("Waiting", None), Entry("Done", ME)], None, False, "ends in Done"),
    ([Entry("Building", ME), Entry("Failed", ME)], None, False, "ends in Failed"),
    ([Entry("Waiting", None), Entry("Cancelled", None)], None, False, "ends in Cancelled"),
    (Answer.UNKNOWN, None, False, "does not know the job"),
    ([], None, False, "does not know the job"),
    (Answer.UNAVAILABLE, None, True, "cannot be asked"),
]


@pytest.mark.parametrize("history, reclaimed_from, runs, words", CASES)
def test_history_decides_whether_the_job_runs(history, reclaimed_from, runs, words):
    """Run on Waiting or Blocked, or on this worker's own (or the dead worker's) Building or
    Uploaded; drop on 404, Done, Failed, Cancelled or another client's Building/Uploaded; run
    when PyBit cannot be asked."""
    decided, reason = should_run(history, ME, reclaimed_from)
    assert decided is runs
    assert words in reason


def test_fetch_reads_pybits_job_history():
    """GET /job/ID/status gives PyBit's JobHistory list (status and client of each line);
    404 is an unknown job; a dead PyBit or a strange answer is 'unavailable'."""
    with FakePyBit("admin", "secret") as web:
        web.add_job(8, "Waiting", ("Building", "bob"), ("Cancelled", None))
        pybit = web.settings()
        assert fetch(pybit, None, 8) == [Entry("Waiting", None), Entry("Building", "bob"),
                                         Entry("Cancelled", None)]
        assert fetch(pybit, None, 9) is Answer.UNKNOWN
        web.fail_next(1, 500, methods=("GET",))
        assert fetch(pybit, None, 8) is Answer.UNAVAILABLE
        without_url = web.settings(use_url=False, user=None, password=None)
        web.user = web.password = None
        assert fetch(without_url, web.web_host, 8)[-1] == Entry("Cancelled", None)
    assert fetch(pybit, None, 8) is Answer.UNAVAILABLE


def test_fetch_without_a_url_follows_web_host_and_refuses_nonsense(pybit_web, monkeypatch, caplog):
    """Without [pybit] url the history comes from the request's web_host; an answer that is
    not a list of JobHistory objects counts as 'PyBit cannot be asked', logged as a warning."""
    import logging

    pybit_web.user = pybit_web.password = None
    pybit_web.add_job(8, "Waiting", "Cancelled")
    no_url = pybit_web.settings(use_url=False, user=None, password=None)
    assert fetch(no_url, pybit_web.web_host, 8)[-1] == Entry("Cancelled", None)
    caplog.set_level(logging.WARNING, logger="rbit.history")
    for bad in ({"status": "Cancelled"}, [{"state": "Cancelled"}], [{"status": 3}], "nope"):
        monkeypatch.setattr(pybit_web, "_history_of", lambda job_id, bad=bad: bad)
        assert fetch(no_url, pybit_web.web_host, 8) is Answer.UNAVAILABLE, bad
    assert len(caplog.records) == 4


def test_each_case_through_the_worker(tmp_path, vhost, unique):
    """Each case of the rule through the real worker: jobs whose history ends in Waiting,
    Blocked or this worker's own Building run; jobs PyBit does not know, or whose history ends
    in Done, Failed, Cancelled or another client's Building or Uploaded are acknowledged
    without running, with one log line each, and nothing is reported for them."""
    queue, key = queue_for(unique)
    name = f"w{unique}"
    run = {1: ["Waiting"], 2: ["Waiting", ("Blocked", name)], 3: ["Waiting", ("Building", name)]}
    dropped = {5: ["Waiting", ("Done", name)], 6: ["Waiting", ("Failed", "x")],
               7: ["Waiting", "Cancelled"], 8: ["Waiting", ("Building", "other")],
               9: ["Waiting", ("Uploaded", "other")]}
    with FakePyBit("admin", "secret") as web:
        for job_id, history in {**run, **dropped}.items():
            web.add_job(job_id, *history)
        path, record = make_config(tmp_path, vhost, unique, pybit=pybit_section(web))
        with WorkerProcess(path) as worker:
            worker.wait_ready()
            for job_id in [*run, 4, *dropped]:  # 4: PyBit has no such job
                vhost.publish_build(body_for(job_id, unique), key)
            for job_id in run:
                assert web.wait_for((job_id, statuses.DONE), timeout=20), worker.log
            for job_id in [4, *dropped]:
                worker.wait_log(rf"job {job_id}: hello \S+ from {queue} not run: ")
        assert sorted(entry["job_id"] for entry in records(record)) == sorted(run)
        for job_id, history in dropped.items():
            assert web.history(job_id) == [entry if isinstance(entry, tuple) else (entry, None)
                                           for entry in history]
        assert web.statuses(4) == []
        assert "job 4: hello" in worker.log and "does not know the job" in worker.log
    assert vhost.depth(queue) == 0


def test_runs_when_pybit_cannot_be_reached(tmp_path, vhost, unique):
    """When PyBit cannot be reached, the job runs (its statuses wait for PyBit)."""
    queue, key = queue_for(unique)
    web = FakePyBit("admin", "secret").start()
    settings = pybit_section(web)
    web.stop()
    path, record = make_config(tmp_path, vhost, unique, pybit=settings)
    with WorkerProcess(path) as worker:
        worker.wait_ready()
        vhost.publish_build(body_for(11, unique), key)
        worker.wait_log(r"job 11: .* ended Done")
    assert [entry["job_id"] for entry in records(record)] == [11]


def test_job_recovered_from_a_dead_worker_runs_on_another(tmp_path, vhost, unique):
    """A job put back from a worker that died (``rbit recover --worker A``) runs on worker B
    although PyBit's history ends in A's Building: the history of the worker it was reclaimed
    from counts as B's own. PyBit ends with one Done, by B."""
    import signal
    import subprocess
    import sys

    from .harness import ROOT

    queue, key = queue_for(unique)
    with FakePyBit("admin", "secret") as web:
        web.add_job(21)
        path_a, record = make_config(tmp_path, vhost, unique, name=f"a{unique}", pybit=pybit_section(web))
        path_b, _ = make_config(tmp_path, vhost, unique, name=f"b{unique}", pybit=pybit_section(web))
        with WorkerProcess(path_a) as worker_a:
            worker_a.wait_ready()
            vhost.publish_build(body_for(21, unique, package="wait-x"), key)
            assert web.wait_for((21, statuses.BUILDING), timeout=20), worker_a.log
            worker_a.signal(signal.SIGKILL)
            worker_a.wait()
        def recovered():
            # The broker may take a moment to see the dead worker's connection gone.
            done = subprocess.run([sys.executable, "-m", "rbit", "recover", str(path_a)],
                                  capture_output=True, text=True, timeout=60, cwd=ROOT)
            return done.returncode == 0 and "put back 1 unfinished job" in done.stdout

        assert wait_until(recovered, timeout=20, interval=1)
        (tmp_path / "release").write_text("go")
        with WorkerProcess(path_b) as worker_b:
            worker_b.wait_ready()
            assert web.wait_for((21, statuses.DONE), timeout=20), worker_b.log
        assert web.history(21) == [("Waiting", None), ("Building", f"a{unique}"),
                                   ("Building", f"b{unique}"), ("Done", f"b{unique}")]
    assert [entry["job_id"] for entry in records(record)] == [21, 21]
