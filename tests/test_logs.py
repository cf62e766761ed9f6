"""What the worker's log says (the README's "Looking at the worker"): a line at each job's start
and end, each status report with -v, and silence from an idle worker."""

import re
import time

from .harness import WorkerProcess
from .test_worker import body_for, make_config, pybit_section, queue_for

#: A log line's level, after its timestamp.
LEVEL = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ", re.MULTILINE)


def test_one_line_at_start_and_end_with_id_package_queue_status_and_duration(tmp_path, vhost, unique, pybit_web):
    """The job's start line names job id, package and queue; its end line also the
    final status and the duration; with -v each status delivered to PyBit is logged too."""
    path, _ = make_config(tmp_path, vhost, unique, pybit=pybit_section(pybit_web))
    queue, key = queue_for(unique)
    pybit_web.add_job(501)
    with WorkerProcess(path, "-v") as worker:
        worker.wait_ready()
        vhost.publish_build(body_for(501, unique, package="logpkg", version="2.1"), key)
        worker.wait_log(r"job 501: logpkg 2\.1 from .* ended Done in [0-9.]+ s")
        assert re.search(rf"job 501: starting logpkg 2\.1 from {queue}", worker.log)
        assert re.search(rf"job 501: logpkg 2\.1 from {queue} ended Done in [0-9.]+ s", worker.log)
        for status in ("Building", "Done"):
            worker.wait_log(rf"DEBUG rbit\.reporting: job 501 queue {queue}: status {status} delivered")


def test_idle_worker_logs_nothing_above_debug(tmp_path, vhost, unique):
    """Once it serves its queues, an idle worker writes nothing at INFO or above,
    even with a short poll time that makes it wake often."""
    path, _ = make_config(tmp_path, vhost, unique, rbit_keys={"polling_time": "0.2"})
    with WorkerProcess(path) as worker:
        ready = worker.wait_ready()
        time.sleep(3)
        after = worker.log[ready.end():]
        assert LEVEL.findall(after) == [], after
