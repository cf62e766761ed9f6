"""Timing hooks for profiling where an rbit job's time goes (used by bench/profile_worker.py).

Nothing here changes what rbit does: functions are wrapped so that their start
and end times (``time.time()``) are recorded. The one addition is this module,
imported by the fork server (and so present in every job process).

* In the worker (:func:`install_worker_hooks`): spans of the broker calls
  (cancel, the in-progress copy's publish with its confirm, ack, consume,
  the purge sent without waiting at a job's end and the waiting one, drain),
  of taking a message (decode; while the copy is confirmed, ``JobProcess.offer``,
  the job's log opened and ``LogKeeper.close_ended`` closing the logs of jobs
  ended before; ``Jobs.start`` with ``JobProcess.go``; ``Ready.take``), of
  ``Jobs.warm_up`` and the
  steps below it (``Ready.fill``, ``Ready._start``, ``JobProcess.start``,
  ``Guard.watch``: the slot's next waiting process, forked from ``Jobs.start``
  once the job was handed over, while it runs; the same ``Jobs.warm_up`` at the
  start of ``Worker._resume_consuming`` normally finds that process waiting and
  starts none), of noticing the job's end (its events, its exit, its output
  drained, ``Jobs._end`` with ``Ready.done`` and ``Guard.forget``), of
  ``Jobs.finish``, ``Worker._resume_consuming``, ``Liveness.tick`` and
  ``select``.
  Each span is ``(name, start, end, info)``, *info* a job id, a pid or a dict
  saying which job, process or outcome the call was about. They are kept in
  memory and written by :func:`dump` as JSON lines. A process's pid is never
  read where the worker would wait for it (``JobProcess.start`` asks the fork
  server for a process and does not wait for its pid; reading
  ``JobProcess.pid`` then would): such spans name the process by its fork
  server request and its pid as the fork server's answer gives it, filled in
  by :func:`dump` (``JobProcess.offer`` knows the pid: ``Ready.watch`` read it
  just before).
* In the fork server and the job processes: the worker's hooks add this
  module to the fork server's preloaded modules (it is also the runner module
  of the profiling configuration, ``python!profile_hooks:stamp``, but a
  ``shell!``-only configuration names none), so the fork server imports it at
  start-up. When ``RBIT_BENCH_REPORT_TO`` is set, the import
  wraps ``rbit.child.main``, ``_wait_for_job``, ``_run`` and ``_become`` and
  ``rbit.guard.main``, which the fork server's child looks up in their modules
  when it is forked (rbit/forkserver.py ``_child``); each process then sends
  UDP datagrams ``KIND ID TIME``
  (the format of bench/runners.py) to that address: ``w_main`` (the process
  started, waiting for no job yet), ``w_ready`` (set up: it waits for
  its job) and ``w_guard`` with the process's pid as ID; ``c_handed`` (the
  process has read its job and the word go), ``c_run`` and ``c_ran`` (``_run`` entered and
  returned), ``c_become`` (``_become`` entered: the process is about to become
  its program) and ``c_exit`` (``main`` returns) with the job id. Each datagram
  is sent as it happens, nothing is buffered: the fork server's child ends with
  ``os._exit`` once its entry point returns, which runs no exit handler.
"""

import functools
import json
import os
import socket
import time

import runners

#: Spans recorded in this process: (name, start, end, info: a job id, a pid, a dict or None).
SPANS = []

_REPORT_TO = os.environ.get("RBIT_BENCH_REPORT_TO")

# -- The runners of the profiling configuration (so that the fork server imports this module) --


def stamp(message, set_status, settings):
    runners.stamp(message, set_status, settings)


def noop(message, set_status, settings):
    runners.noop(message, set_status, settings)


def gate(message, set_status, settings):
    runners.gate(message, set_status, settings)


# -- The worker's side --------------------------------------------------------------------------


def _timed(owner, attribute, name=None, info=None):
    """Replace ``owner.attribute`` by a wrapper that records a span named *name*.

    ``info(result, *args, **kwargs)``, called after the original returned (with
    *result* None if it raised), gives the span's job id, pid or dict.
    """
    original = getattr(owner, attribute)
    name = name or attribute

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.time()
        result = None
        try:
            result = original(*args, **kwargs)
            return result
        finally:
            end = time.time()
            found = None
            if info is not None:
                try:
                    found = info(result, *args, **kwargs)
                except Exception:  # noqa: BLE001 - a span without its info is still a span
                    found = None
            SPANS.append((name, start, end, found))

    setattr(owner, attribute, wrapper)


def install_worker_hooks():
    """Wrap the worker's steps; call before the worker is made."""
    import amqp.channel

    from rbit import (
        broker,
        capture,
        guard,
        jobs,
        liveness,
        logkeeping,
        queues,
        ready,
        reporting,
        running,
        taking,
        wakeup,
        worker,
    )

    # The fork server imports this module whatever the runners (a shell!-only configuration names
    # none of ours), so that every job process and the guard send their stamps.
    fork_server = jobs.fork_server

    @functools.wraps(fork_server)
    def fork_server_hooked(preload=()):
        return fork_server([*preload, __name__])

    jobs.fork_server = fork_server_hooked

    # The broker: each call is one round trip, but drain and heartbeat_check (none, unless frames
    # wait), a cancel before an ack and the purge at a job's end (both sent without waiting).
    _timed(broker.Broker, "cancel", "broker.cancel")
    _timed(broker.Broker, "publish", "broker.publish+confirm")
    _timed(broker.Broker, "consume", "broker.consume")
    _timed(broker.Broker, "purge_nowait", "broker.purge")
    _timed(broker.Broker, "purge", "broker.purge+purge_ok")
    _timed(broker.Broker, "drain", "broker.drain")
    _timed(broker.Broker, "heartbeat_check", "broker.heartbeat_check")
    _timed(amqp.channel.Channel, "basic_ack", "broker.ack")
    # Taking a message.
    _timed(taking, "decode_build_request", "decode")
    # The worker's callback for a delivery, under the name bench/profile_worker.py reads.
    _timed(taking.Taker, "on_message", "worker._on_message")
    _timed(queues, "hold", "queues.hold")
    _timed(running.Jobs, "start", "jobs.start", info=lambda _, self, slot, delivery: self.slots[slot].job_id)
    _timed(running.Jobs, "_open_log", "jobs._open_log", info=lambda _, self, job: job.job_id)
    _timed(running.Jobs, "_begin", "jobs._begin", info=lambda _, self, job, runner: job.job_id)
    _timed(running.Jobs, "offer", "jobs.offer", info=lambda _, self, slot, queue, message: message.job_id)
    _timed(ready.Ready, "take", "ready.take")
    _timed(jobs.JobProcess, "offer", "jobprocess.offer",
           info=lambda _, self, runner, message, *args, **kwargs: {"job": message.job_id, **_forked(self)})
    _timed(jobs.JobProcess, "go", "jobprocess.go", info=lambda _, self: self.job_id)
    # The job's news and its end.
    _timed(running.Jobs, "service", "jobs.service")
    _timed(running.Jobs, "_on_event", "jobs._on_event",
           info=lambda _, self, job, event: {"job": job.job_id, "event": event[0],
                                             "status": event[1] if event[0] == "status" else None})
    _timed(jobs.JobProcess, "receive", "jobprocess.receive")
    _timed(jobs.JobProcess, "exited", "jobprocess.exited",
           info=lambda result, self: {"job": self.job_id, "exited": result})
    _timed(capture.Output, "drained", "output.drained",
           info=lambda result, self, now: {"job": self.process.job_id, "drained": result})
    _timed(running.Jobs, "_end", "jobs._end", info=lambda _, self, job, exit_text: job.job_id)
    _timed(jobs.JobProcess, "close", "jobprocess.close", info=lambda _, self: self.job_id)
    _timed(logkeeping.LogKeeper, "close_ended", "logkeeper.close_ended")
    _timed(reporting.StatusReporter, "report", "reporter.report")
    _timed(ready.Ready, "done", "ready.done", info=lambda _, self, process: _forked(process))
    _timed(ready.Ready, "discard", "ready.discard", info=lambda _, self, process: _forked(process))
    _timed(guard.Guard, "forget", "guard.forget")
    # The slot's next waiting process: Jobs.start calls Jobs.warm_up once its job is handed over,
    # so it forks while the job runs (Ready.fill -> Ready._start -> JobProcess.start, Guard.watch);
    # Worker._resume_consuming calls Jobs.warm_up too, which then normally starts nothing.
    _timed(running.Jobs, "warm_up", "jobs.warm_up")
    _timed(ready.Ready, "fill", "ready.fill")
    # Not JobProcess.pid: it would wait for the fork server's answer, which the worker does not.
    _timed(ready.Ready, "_start", "ready._start", info=lambda result, self, server: _forked(result) if result else None)
    _timed(jobs.JobProcess, "start", "jobprocess.start", info=lambda _, self, *args, **kwargs: _forked(self))
    _timed(guard.Guard, "watch", "guard.watch")
    # Between two jobs: the message's end, consuming again.
    _timed(running.Jobs, "finish", "jobs.finish")
    _timed(liveness.Liveness, "tick", "liveness.tick")
    _timed(worker.Worker, "_resume_consuming", "worker._resume_consuming")
    _timed(wakeup.Wakeup, "wait", "select")


class _Pid:
    """The pid of a fork server's child, as the server's answer gives it: read when the spans are
    written (None if the answer never came), never while the worker runs."""

    def __init__(self, forked):
        self.forked = forked


def _forked(process):
    """Which process a ``JobProcess`` is, without waiting for it: its fork server request, and its pid."""
    forked = process.process
    return {"request": forked.request, "pid": _Pid(forked)} if forked is not None else {}


def _json_default(value):
    if isinstance(value, _Pid):
        return value.forked._pid
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def dump(path):
    """Write the spans recorded so far as JSON lines."""
    with open(path, "w") as out:
        out.writelines(json.dumps(span, default=_json_default) + "\n" for span in SPANS)


# -- The job's side (fork server and job processes) -----------------------------------------------


def _send(kind, key):
    """One datagram ``KIND KEY TIME`` (KEY a job id or a pid), from a socket used once:
    a job's process keeps no descriptor of ours open into its program."""
    now = time.time()
    host, _, port = _REPORT_TO.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.sendto(f"{kind} {key} {now!r}".encode("ascii"), (host, int(port)))
    finally:
        sock.close()


#: The job this process was given (None while it waits, and in the fork server).
_current = [None]


def _install_child_hooks():
    from rbit import child, guard

    main, wait_for_job, run, become = child.main, child._wait_for_job, child._run, child._become
    guard_main = guard.main

    # The fork server's child calls child.main or guard.main as found in their modules then.
    @functools.wraps(main)
    def main_hooked(*args):
        _send("w_main", os.getpid())
        try:
            return main(*args)
        finally:
            if _current[0] is not None:
                _send("c_exit", _current[0])

    @functools.wraps(wait_for_job)
    def wait_for_job_hooked(conn):
        _send("w_ready", os.getpid())
        job, deadline = wait_for_job(conn)
        if isinstance(job, tuple):  # (runner, message, pybit, worker_name); else the error unpickling it
            _current[0] = job[1].job_id
            _send("c_handed", job[1].job_id)
        return job, deadline

    @functools.wraps(run)
    def run_hooked(runner, message, *args):
        _send("c_run", message.job_id)
        try:
            return run(runner, message, *args)
        finally:
            _send("c_ran", message.job_id)  # not sent once the process became its program

    @functools.wraps(become)
    def become_hooked(*args):
        _send("c_become", _current[0])
        return become(*args)

    @functools.wraps(guard_main)
    def guard_main_hooked(*args):
        _send("w_guard", os.getpid())
        return guard_main(*args)

    child.main = main_hooked
    child._wait_for_job = wait_for_job_hooked
    child._run = run_hooked
    child._become = become_hooked
    guard.main = guard_main_hooked


if _REPORT_TO:
    _install_child_hooks()
