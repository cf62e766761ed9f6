"""Each job in its own process and process group, started before its job is known.

Job processes are forked by rbit's fork server (:mod:`rbit.forkserver`): a small
single-threaded process started once, with the runners imported, so that a job
never inherits the worker's threads, sockets or broker connection, nor imports
anything the fork server has imported. Each is started *warm*, one for each
slot's next job, before a message arrives: picking a job up then costs a
message down a pipe, not a fork. Every job still has a fresh process, used once.

A job process makes itself a session and process-group leader, so the worker
can stop everything it started with one ``killpg``. It watches its pipe to the
worker: if the worker dies, the pipe closes and the job kills its own group,
so that a restarted worker never finds the old build still running beside the
new one. It also holds the worker's lease (:mod:`rbit.lease`): if the worker
does not renew it in time (frozen, or cut off from the broker), the job kills
its own group when it runs out, before a peer may run the job again. What
happens inside is :mod:`rbit.child`'s; a process that becomes its program
(``shell!``) leaves both watches to the guard (:mod:`rbit.guard`).

The worker's messages to the job process: ``("lease", deadline)``, a
:func:`rbit.lease.clock` value (the same clock in every process of a host);
``("job", runner, message, pybit, worker_name)``, once; then ``("go",)``, once.
The job is offered before the worker holds its message, so that the process
reads it while the broker confirms the copy; it starts only at the word go.

A second pipe takes the job's output: its write end becomes the job process's
standard output and error (and so those of every program it starts), and its
log records are written there as lines. The worker reads it in large
non-blocking reads into the job's log (:mod:`rbit.joblog`); nothing in the job
process copies output. After the job's process group has ended the worker
reads the pipe dry, so nothing written before then is lost. A third takes the
status lines of a program the job's process became (``RBIT_STATUS_FD``).

Messages from the job process to the worker, on the first pipe, each a tuple:

``("status", status, text)``
    the runner reported a status;
``("exec", program)``
    the job's process is about to become *program*: its exit status is the job's result;
``("result", result)``
    how the runner ended, an :class:`rbit.outcome.Result` (``SKIPPED`` when
    PyBit's history says the job is not to run: see :mod:`rbit.history`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
from multiprocessing.connection import Pipe

from .forkserver import JOB, ForkServer

#: Seconds between SIGTERM and SIGKILL when a job's process group is stopped.
KILL_GRACE = 5.0

#: Bytes of one read of a job's output pipe, and the pipe's size asked for (Linux's
#: unprivileged maximum by default): a job writing fast fills it while the worker works.
OUTPUT_CHUNK = 1 << 20

#: Bytes of one read of a program's status pipe.
STATUS_CHUNK = 1 << 16

#: fcntl's F_SETPIPE_SZ (Linux).
_F_SETPIPE_SZ = 1031

#: Modules every job needs; the fork server imports them once, so that no job
#: pays for them (unpickling a job's Message needs rbit.pybit, hence jsonpickle).
PRELOAD = ["rbit.jobs", "rbit.child", "rbit.guard", "rbit.message", "rbit.pybit", "rbit.runners.python",
           "rbit.runners.shell"]

log = logging.getLogger(__name__)


def fork_server(preload=()) -> ForkServer:
    """The server that starts job processes; it starts now, with *preload* imported.

    Starting it here, not at the first job, keeps its start-up (a fresh
    interpreter importing the runners) out of the first job's pickup time.
    """
    server = ForkServer([*PRELOAD, *preload])
    server.start()
    return server


def preload(config) -> list[str]:
    """What the fork server imports for *config*'s jobs: the runners' modules, and the HTTP client
    that asks PyBit for a job's history where a ``[pybit]`` section says to (:mod:`rbit.history`)."""
    return runner_modules(config.runners) + (["requests"] if config.pybit is not None else [])


def runner_modules(sections) -> list[str]:
    """The modules the runners of *sections* live in, for the fork server to preload."""
    modules = []
    for section in sections:
        modules.append(type(section.runner).__module__)
        function = getattr(section.runner, "function", None)
        if function is not None and getattr(function, "__module__", None):
            modules.append(function.__module__)
    return modules


class JobProcess:
    """The worker's handle on one job's process: started warm, given its job once."""

    def __init__(self, server: ForkServer, log_level=logging.INFO):
        self.server = server
        self.log_level = log_level
        self.job_id = None
        self.process = None
        self.conn = None
        self.kill_at = None
        self.closed = False
        #: True once the job's end of the pipe is closed: nothing more will come.
        self.eof = False
        #: True once the process has sent its result.
        self.finished = False
        #: The read end of the job's output pipe, and whether every writer has closed it.
        self.output = None
        self.output_eof = False
        #: The read end of the status pipe of a program the process became, what is read of a
        #: line not yet ended, and whether every writer has closed it.
        self.status_pipe = None
        self._status_part = b""
        self.status_eof = False

    def start(self, lease: float | None = None) -> None:
        """Start the process, holding *lease*; it waits for :meth:`begin`."""
        parent_end, child_end = Pipe(duplex=True)
        output, output_child = Pipe(duplex=False)
        status_pipe, status_child = Pipe(duplex=False)
        if lease is not None:
            parent_end.send(("lease", lease))  # waiting in the pipe before the job's first instruction
        try:
            # Asked for, not waited for: the pid comes back while the worker goes on (rbit.forkserver).
            self.process = self.server.fork(JOB, [child_end.fileno(), output_child.fileno(), status_child.fileno()],
                                            self.log_level)
        finally:
            for end in (child_end, output_child, status_child):
                end.close()
        self.conn = parent_end
        self.output = output
        self.status_pipe = status_pipe
        os.set_blocking(output.fileno(), False)
        os.set_blocking(status_pipe.fileno(), False)
        try:
            fcntl.fcntl(output.fileno(), _F_SETPIPE_SZ, OUTPUT_CHUNK)
        except OSError:  # over /proc/sys/fs/pipe-max-size: the default 64 KiB works too
            pass

    def ready(self) -> bool:
        """True while the started process waits for its job (it has not died meanwhile)."""
        return self.job_id is None and not self.eof and self.process.exitcode is None

    def offer(self, runner, message, pybit=None, worker_name: str | None = None) -> None:
        """Give the process its job, to run at :meth:`go`; :class:`OSError` if the process is gone."""
        self.job_id = message.job_id
        self.conn.send(("job", runner, message, pybit, worker_name))

    def go(self) -> None:
        """Run the job offered; :class:`OSError` if the process is gone."""
        self.conn.send(("go",))

    def begin(self, runner, message, pybit=None, worker_name: str | None = None) -> None:
        """Give the process its job and run it at once; :class:`OSError` if the process is gone."""
        self.offer(runner, message, pybit, worker_name)
        self.go()

    def read_output(self, limit: int = 4 * OUTPUT_CHUNK) -> list[bytes]:
        """What the job wrote since the last call, at most about *limit* bytes, without blocking."""
        if self.output_eof:
            return []
        chunks, self.output_eof = _read_available(self.output.fileno(), OUTPUT_CHUNK, limit)
        return chunks

    def read_statuses(self, final: bool = False) -> list[str]:
        """The status lines the program wrote since the last call, without blocking; with
        *final* (its group has ended) a last line without its line break counts too."""
        data = self._status_part
        if not self.status_eof:
            chunks, self.status_eof = _read_available(self.status_pipe.fileno(), STATUS_CHUNK, OUTPUT_CHUNK)
            data += b"".join(chunks)
        *lines, self._status_part = data.split(b"\n")
        if (final or self.status_eof) and self._status_part:
            lines.append(self._status_part)
            self._status_part = b""
        return [line.decode("utf-8", "replace") for line in lines]

    def group_gone(self) -> bool:
        """True once no process of the job's group is left (all it wrote is in the output pipe)."""
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # a member we may not signal (setuid): still there
            pass
        return False

    def renew(self, deadline: float) -> None:
        """The worker's lease now runs until *deadline*."""
        try:
            # Never block on a job that does not read (stopped, say): it keeps the earlier deadline.
            if select.select([], [self.conn.fileno()], [], 0)[1]:
                self.conn.send(("lease", deadline))
        except (OSError, ValueError):  # the job has ended; its exit is noticed elsewhere
            pass

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def receive(self) -> list[tuple]:
        """Everything the job has sent so far, without blocking; sets :attr:`eof` at the end."""
        events = []
        try:
            while not self.closed and not self.eof and self.conn.poll():
                events.append(self.conn.recv())
                self.finished = self.finished or events[-1][0] == "result"
        except (EOFError, OSError):
            self.eof = True
        return events

    def exited(self) -> bool:
        """True once the job's process has ended (the rest of its group is killed then).

        The fork server reports every exit; a process that sent its result and then let go of its
        output pipe is ending anyway (:func:`rbit.child.main`), and is not waited for: its exit
        status says nothing more.
        """
        if self.process.exitcode is None and not (self.finished and self.output_eof):
            return False
        self.signal_group(signal.SIGKILL)
        return True

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def stop(self, now: float, grace: float = KILL_GRACE) -> None:
        """Ask the whole group to stop (SIGTERM); :meth:`tick` sends SIGKILL after *grace*."""
        if self.kill_at is None:
            self.kill_at = now + grace
            self.signal_group(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the whole group at once."""
        self.signal_group(signal.SIGKILL)

    def tick(self, now: float) -> None:
        """Escalate a stop that the group has ignored for its grace period."""
        if self.kill_at is not None and now >= self.kill_at:
            self.kill()

    def signal_group(self, signum: int) -> None:
        if self.pid is None:  # the fork server died before it said which process this is
            return
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            # The job has not made its process group yet (it does so first
            # thing): the process alone is all there is to stop.
            try:
                os.kill(self.process.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass
        except PermissionError:
            pass

    def close(self) -> None:
        """Release the pipes (the fork server reaps the process)."""
        if not self.closed and self.conn is not None:
            self.closed = True
            self.receive()
            self.conn.close()
            for pipe in (self.output, self.status_pipe):
                if pipe is not None:
                    pipe.close()

    def describe_exit(self) -> str:
        code = self.process.exitcode
        if code is not None and code < 0:
            return f"the job's process was killed by {signal.Signals(-code).name}"
        return f"the job's process exited with status {code} before reporting a result"


def _read_available(fd: int, size: int, limit: int) -> tuple[list[bytes], bool]:
    """What the non-blocking *fd* holds now, in reads of *size* up to about *limit* bytes, and
    whether every writer has closed it."""
    chunks, total = [], 0
    while total < limit:
        try:
            chunk = os.read(fd, size)
        except BlockingIOError:
            break
        if not chunk:
            return chunks, True
        chunks.append(chunk)
        total += len(chunk)
    return chunks, False
