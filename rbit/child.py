"""Inside a job's own process: it waits for its job, runs it, and dies with its worker or its lease.

The process is started *warm*, before its job is known (:class:`rbit.jobs.JobProcess`): it makes
itself a session and process-group leader, takes its output pipe as standard output and error,
and waits for its job, which the worker offers while the broker confirms the job's copy, and for
the word to run it; then its lifeline starts, a thread that ends the whole job with the worker
or its lease. Then it asks PyBit's history whether to run it
(:mod:`rbit.history`), then either calls the runner (``python!``, and any runner with no program
to become) or *becomes* the runner's program (``shell!``): it executes the program in its own
place, so no Python process stands between the program and the worker. The process group, the
output pipe and the status pipe are the program's then; its lifeline is the guard's
(:mod:`rbit.guard`), and the worker reads its exit status and status lines.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import sys
import threading

from . import history, statuses
from .lease import clock as lease_clock
from .outcome import Ended, Result, call_runner

#: How a log record of the job's looks in its log.
JOB_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Longest wait of the lifeline between two looks at the lease: a host thawed after a suspend
#: (whose waits do not count the time asleep) stops its jobs at most this late.
LIFELINE_TICK = 0.2

#: The environment variable naming the file descriptor that takes a program's status lines.
STATUS_FD_VARIABLE = "RBIT_STATUS_FD"
#: That descriptor in a program the job's process became: one digit, as a POSIX shell's
#: ``>&$RBIT_STATUS_FD`` needs (dash reads no more).
STATUS_FD = 3

#: Set once the job's process is becoming its program: from then on the guard, not the
#: lifeline, takes the job with its worker (the lifeline's pipe may be closed under it).
_becoming = threading.Event()

#: Signals whose disposition Python changes and a program must find at their default (as
#: :mod:`subprocess` restores them): a program must die of a closed pipe as a shell's would.
_RESTORED_SIGNALS = ("SIGPIPE", "SIGXFZ", "SIGXFSZ")


class _Channel:
    """The job's end of the pipe to the worker; sends from several threads, one at a time."""

    def __init__(self, conn):
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, *event):
        with self.lock:
            self.conn.send(event)


def main(conn, output, status_pipe, log_level: int) -> None:
    """The entry point of every job process: get ready, wait for the job, run it."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _redirect_output(output)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(JOB_LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(min(log_level, logging.INFO))  # the job's log keeps its records at INFO even with -q
    channel = _Channel(conn)
    job, deadline = _wait_for_job(conn)
    if deadline is not None and lease_clock() >= deadline:
        os.killpg(0, signal.SIGKILL)  # the lease ran out while it waited: a peer may run this job soon
    # Not threading.Thread: its start() waits until the new thread runs, a wake-up before the runner's.
    _thread.start_new_thread(_lifeline, (conn, deadline))
    if isinstance(job, Exception):  # the job could not be read (its runner's module fails to import, say)
        channel.send("result", Result(Ended.CRASHED, None, f"the job could not be read: {job}"))
        return
    runner, message, pybit, worker_name = job

    def set_status(status, text=None):
        statuses.check(status)
        channel.send("status", status, text)

    try:
        result = _run(runner, message, pybit, worker_name, set_status, channel, status_pipe)
    finally:
        _flush()
    channel.send("result", result)
    _let_go_of_output()


def _let_go_of_output() -> None:
    """The job is over: once the runner's threads have ended (as at a Python program's end), let go
    of the output pipe, so that the worker sees the job's end now, not once this process's memory
    has been torn down (about a millisecond later)."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    _flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


def _run(runner, message, pybit, worker_name, set_status, channel, status_pipe) -> Result:
    """Ask PyBit whether the job runs; if so, run it or become its program. How it ended."""
    if pybit is not None:
        found = history.fetch(pybit, message.request.web_host, message.job_id)
        run, why = history.should_run(found, worker_name, message.recovered_from)
        if not run:
            return Result(Ended.SKIPPED, None, why)
    program = runner.program(message)
    if program is None:
        return call_runner(runner, message, set_status)
    set_status(statuses.BUILDING)
    return _become(program, channel, status_pipe)


def _become(program, channel, status_pipe) -> Result:
    """Execute *program* ``(argv, env)`` in this process's place; return only if it cannot start.

    Only standard input, output and error and the status pipe (descriptor
    :data:`STATUS_FD`, named in ``RBIT_STATUS_FD``) are inherited; every other
    descriptor, the pipe to the worker included, closes at the exec (the worker
    was told "exec" first). If the exec fails, the result goes to the worker as
    from any job, unless the worker's pipe was on :data:`STATUS_FD`: the job then
    ends as a process that exited without a result.
    """
    argv, env = program
    env = {**env, STATUS_FD_VARIABLE: str(STATUS_FD)}
    for name in _RESTORED_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    _flush()
    channel.send("exec", argv[0])
    _becoming.set()
    if status_pipe.fileno() != STATUS_FD:
        os.dup2(status_pipe.fileno(), STATUS_FD)  # whatever was there (the worker's pipe, say) is closed
    _inherit_only({0, 1, 2, STATUS_FD})
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        text = f"cannot start {argv[0]}: {exc.strerror}"
        print(f"rbit: {text}", file=sys.stderr, flush=True)  # in the job's log, whatever becomes of the pipe
        return Result(Ended.RAISED, statuses.FAILED, text)


def _inherit_only(keep: set[int]) -> None:
    """Mark every open descriptor but *keep* close-on-exec, and those in *keep* inheritable.

    Marked, not closed: the lifeline thread still waits on the pipe to the worker until the exec.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.set_inheritable(fd, fd in keep)
        except OSError:  # the directory's own descriptor, closed since
            pass


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed or replaced by the runner
            pass


def _wait_for_job(conn) -> tuple:
    """The job, or why it could not be read, and the lease's deadline then (None: no lease).

    The worker's messages: ``("lease", deadline)`` (a :func:`rbit.lease.clock` value),
    ``("job", runner, message, pybit, worker_name)``, once, and ``("go",)``, once the worker
    holds the job's message: the job is read while the broker confirms its copy, and returned
    at the word go. Until then the process has nothing to stop, so it waits for the pipe
    alone, never waking for the lease (an idle worker's waiting processes cost no CPU); if the
    worker goes away meanwhile, so does the process.
    """
    deadline = job = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            os.killpg(0, signal.SIGKILL)
        except Exception as exc:  # noqa: BLE001 -- a job that cannot be unpickled here fails, not the process
            job = exc
            continue
        if isinstance(message, tuple) and len(message) == 2 and message[0] == "lease":
            deadline = message[1]
        elif isinstance(message, tuple) and len(message) == 5 and message[0] == "job":
            job = message[1:]
        elif message == ("go",) and job is not None:
            return job, deadline


def _lifeline(conn, deadline) -> None:
    """While the job runs: if the worker goes away, or its lease (until *deadline*, renewed down
    the pipe) runs out, take the whole job with it."""
    try:
        while True:
            timeout = None if deadline is None else deadline - lease_clock()
            if timeout is not None and timeout <= 0:
                break  # the worker did not renew its lease: a peer may run this job soon
            if not conn.poll(None if timeout is None else min(timeout, LIFELINE_TICK)):
                continue
            try:
                message = conn.recv()
            except (EOFError, OSError):
                raise
            except Exception as exc:  # noqa: BLE001 -- a message this side cannot read changes nothing
                message = exc
            if isinstance(message, tuple) and len(message) == 2 and message[0] == "lease":
                deadline = message[1]
    except (EOFError, OSError):  # the worker is gone (or the pipe was closed to become the program)
        pass
    if not _becoming.is_set():
        os.killpg(0, signal.SIGKILL)


def _redirect_output(output) -> None:
    """Make the output pipe our standard output and error, line-buffered; stdin reads nothing."""
    os.dup2(output.fileno(), 1)
    os.dup2(output.fileno(), 2)
    output.close()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # A worker started without standard streams (a daemon) gives the fork server
    # none, and Python then sets sys.stdout and sys.stderr to None: give them back.
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(fd, "w", buffering=1, closefd=False))
        else:
            try:
                stream.reconfigure(line_buffering=True)
            except (AttributeError, ValueError):
                pass
