"""Timing hooks for profiling where an rbit job's time goes (used by bench/profile_worker.py).

Nothing here changes what rbit does: functions are wrapped so that their start
and end times (``time.time()``) are recorded.

* In the worker (:func:`install_worker_hooks`): spans of the broker calls
  (cancel, publish with its confirm, consume, purge, drain), of starting and
  reaping the job's process, of status reporting, and of ``select``. They are
  kept in memory and written by :func:`dump` as JSON lines.
* In the fork server and the job processes: this module is the runner module
  of the profiling configuration (``python!profile_hooks:stamp``), so the fork
  server imports it at start-up. When ``RBIT_BENCH_REPORT_TO`` is set, the import
  wraps ``rbit.jobs.child_main`` and its helpers; each job then sends UDP
  datagrams ``KIND JOB_ID TIME`` (the format of bench/runners.py) to that address.
"""

import functools
import json
import os
import socket
import time

import runners

#: Spans recorded in this process: (name, start, end, job id or None).
SPANS = []

_REPORT_TO = os.environ.get("RBIT_BENCH_REPORT_TO")

#: Experimental fixes to try (comma-separated in ``RBIT_BENCH_FIX``), each emulating a
#: possible change to rbit/ without editing it (``preload`` and ``defer``, tried
#: here first, are now part of rbit):
#:
#: ``purge-nowait``
#:     the in-progress queue is purged with ``nowait=True`` (channel order still
#:     puts the purge before the slot's next copy).
FIXES = {name for name in os.environ.get("RBIT_BENCH_FIX", "").split(",") if name}


# -- The runners of the profiling configuration (so that the fork server imports this module) --


def stamp(message, set_status, settings):
    runners.stamp(message, set_status, settings)


def noop(message, set_status, settings):
    runners.noop(message, set_status, settings)


def gate(message, set_status, settings):
    runners.gate(message, set_status, settings)


# -- The worker's side --------------------------------------------------------------------------


def _timed(owner, attribute, name=None, job_of=None):
    """Replace ``owner.attribute`` by a wrapper that records a span named *name*."""
    original = getattr(owner, attribute)
    name = name or attribute

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            job = None
            if job_of is not None:
                try:
                    job = job_of(*args, **kwargs)
                except Exception:  # noqa: BLE001 - a span without a job id is still a span
                    job = None
            SPANS.append((name, start, time.time(), job))

    setattr(owner, attribute, wrapper)


def install_fixes():
    """Apply the worker-side experimental fixes named in ``RBIT_BENCH_FIX``."""
    from rbit import broker

    if "purge-nowait" in FIXES:
        def purge(self, queue_name):
            self._channel.queue_purge(queue_name, nowait=True)

        broker.Broker.purge = purge


def install_worker_hooks():
    """Apply the experimental fixes, then wrap the worker's steps; call before the worker is made."""
    from rbit import broker, jobs, reporting, running, wakeup, worker

    install_fixes()

    _timed(broker.Broker, "cancel", "broker.cancel")
    _timed(broker.Broker, "publish", "broker.publish+confirm")
    _timed(broker.Broker, "consume", "broker.consume")
    _timed(broker.Broker, "purge", "broker.purge")
    _timed(broker.Broker, "drain", "broker.drain")
    _timed(broker.Broker, "heartbeat_check", "broker.heartbeat_check")
    _timed(worker, "decode_build_request", "decode")
    _timed(worker.Worker, "_on_message", "worker._on_message")
    _timed(worker.Worker, "_resume_consuming", "worker._resume_consuming")
    _timed(running.Jobs, "start", "jobs.start", job_of=lambda self, slot, queue, message, delivery: message.job_id)
    _timed(running.Jobs, "_end", "jobs.end", job_of=lambda self, job, exit_text: job.job_id)
    _timed(running.Jobs, "finish", "jobs.finish")
    _timed(running.Jobs, "service", "jobs.service")
    _timed(running.Jobs, "_on_event", "jobs.on_event",
           job_of=lambda self, job, event: f"{job.job_id}:{event[0]}:{event[1] if event[0] == 'status' else ''}")
    _timed(jobs.JobProcess, "start", "jobprocess.start")
    _timed(jobs.JobProcess, "close", "jobprocess.close")
    _timed(jobs.JobProcess, "receive", "jobprocess.receive")
    _timed(jobs.JobProcess, "exited", "jobprocess.exited")
    _timed(reporting.StatusReporter, "report", "reporter.report")
    _timed(wakeup.Wakeup, "wait", "select")
    import amqp.channel
    _timed(amqp.channel.Channel, "basic_ack", "broker.ack")


def dump(path):
    """Write the spans recorded so far as JSON lines."""
    with open(path, "w") as out:
        out.writelines(json.dumps(span) + "\n" for span in SPANS)


# -- The job's side (fork server and job processes) -----------------------------------------------


def _send(kind, job_id):
    host, _, port = _REPORT_TO.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.sendto(f"{kind} {job_id} {time.time()!r}".encode("ascii"), (host, int(port)))
    finally:
        sock.close()


def _install_child_hooks():
    from rbit import jobs

    child_main = jobs.child_main
    redirect = jobs._redirect_output
    run = jobs._run

    @functools.wraps(child_main)
    def child_main_hooked(conn, output, runner, message, *args):
        _current[0] = message.job_id
        _send("c_enter", message.job_id)
        try:
            return child_main(conn, output, runner, message, *args)
        finally:
            _send("c_exit", message.job_id)

    @functools.wraps(redirect)
    def redirect_hooked(output):
        try:
            return redirect(output)
        finally:
            _send("c_captured", _current[0])

    @functools.wraps(run)
    def run_hooked(runner, message, *args):
        _send("c_run", message.job_id)
        try:
            return run(runner, message, *args)
        finally:
            _send("c_ran", message.job_id)

    # child_main is pickled by name to the job process; functools.wraps keeps that name.
    jobs.child_main = child_main_hooked
    jobs._redirect_output = redirect_hooked
    jobs._run = run_hooked


_current = [0]

if _REPORT_TO:
    _install_child_hooks()
