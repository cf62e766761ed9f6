"""The worker: takes build requests off the broker and sees each job to exactly one end.

How a message travels (contract §5, §6):

1. It arrives on a served queue. The channel's prefetch is 1, counted across
   all consumers, so the worker holds at most the one message it is about to
   start.
2. It is decoded safely; a bad one is moved to the rejected queue.
3. A copy goes, with a publisher confirm, to this worker's durable in-progress
   queue for the job's slot; then the original is acknowledged and the job
   starts in its own process. Acknowledging at once means the broker's
   ``consumer_timeout`` never sees a long build, and a connection that drops
   mid-job cannot make the broker hand the job to someone else. If every slot
   is now busy, the consumers are cancelled *before* the acknowledgement, so
   the broker sends nothing more until a slot is free.
4. The job ends: Blocked messages are published to the delay queue; a job
   stopped by a shutdown is put back on its queue; then the slot's in-progress
   queue is purged. If the broker is away then, this waits for the reconnection.
5. A worker that died mid-job finds its in-progress copies when it starts
   again and puts them back on their queues (``rbit recover`` does it for a
   worker that never comes back).

The loop is single-threaded: one ``select`` waits on the broker's socket, on
each job's pipe and exit, and on a wake-up pipe that signals write to. One
turn of it is :meth:`Worker.loop`.
"""

import logging
import os
import selectors
import signal
import threading
import time
from dataclasses import dataclass

from . import broker as amqp_side
from . import jobs, statuses, systemd
from .metrics import HealthServer, Metrics
from .errors import BadMessage, NameInUse
from .message import Message
from .pybit import decode_build_request, decode_cancel_request
from .reporting import StatusReporter

log = logging.getLogger(__name__)

#: Consumer key of the build queues (all cancelled and resumed together).
JOBS = "jobs"
#: Consumer key of the worker's own cancel queue.
CANCELS = "cancels"

#: How long the worker waits at most for the status backlog at a clean stop.
REPORT_FLUSH_TIMEOUT = 5.0

LOG_JOB_START = "job %s: starting %s %s from %s in slot %d"
LOG_JOB_END = "job %s: %s %s from %s ended %s in %.1f s%s"
LOG_JOB_DROPPED = "job %s: %s %s from %s not run: %s"


@dataclass
class RunningJob:
    """A job that holds a slot, from its start to its message's end."""

    slot: int
    queue: str
    message: Message
    raw: object
    process: jobs.JobProcess
    started: float
    deadline: float | None
    last_final: str | None = None
    result: tuple | None = None
    stop_reason: str | None = None
    outcome: str | None = None

    @property
    def job_id(self):
        return self.message.job_id


class Worker:
    """Serves the queues of a configuration until told to stop."""

    def __init__(self, config, reporter=None, context=None):
        self.config = config
        self.settings = config.worker
        self.broker = amqp_side.Broker(config.amqp)
        self.reporter = reporter or StatusReporter(
            config.pybit, self.settings.name, spool_path=self._spool_path()
        )
        self.context = context
        self.metrics = Metrics()
        self.metrics.backlog.set_function(lambda: self.reporter.backlog)
        self.metrics.running.set_function(lambda: len(self.running()))
        self.http = HealthServer(self.settings.http, self.metrics, self.health) if self.settings.http else None
        self.slots = {}
        self.finishing = []
        self._subscribing = False
        self._held = []
        self.stopping = False
        self.stop_deadline = None
        self.hurry = False
        self.selector = None
        self._wake_r = self._wake_w = None

    # -- Lifecycle --------------------------------------------------------------

    def run(self):
        """Connect, serve until stopped, and hand back every running job's message."""
        self._open_wakeup()
        restore = self._install_signals()
        self.reporter.start()
        if self.http is not None:
            self.http.start()
        try:
            self.context = self.context or jobs.fork_context(self._runner_modules())
            if not self._connect(first=True):
                return
            systemd.notify("READY=1\nSTATUS=serving " + ", ".join(s.queue for s in self.config.runners))
            while not self._done():
                self.loop()
            self._apply_stop(time.monotonic())  # a stop with no job running still says STOPPING
        finally:
            restore()
            self._shutdown()

    def request_stop(self, hurry=False):
        """Stop taking jobs (from any thread or a signal handler); *hurry* stops jobs now."""
        self.hurry = self.hurry or hurry or self.stopping
        self.stopping = True
        self._wake()

    def loop(self):
        """One turn: wait for news (at most the poll time), then act on it."""
        now = time.monotonic()
        self._apply_stop(now)
        if self._done():
            return
        timeout = self._timeout(now)
        for key, _ in self.selector.select(timeout):
            if key.data == "wake":
                self._drain_wakeup()
        self._service_jobs()
        if self.broker.connected:
            try:
                self.broker.drain()
                self.broker.heartbeat_check()
                self._finish_jobs()
                self._resume_consuming()
            except self.broker.errors as exc:
                self._reconnect(exc)
        else:
            self._reconnect(None)

    # -- Connecting -----------------------------------------------------------------

    def _connect(self, first=False):
        """(Re)connect, declare, recover or resume; False if told to give up waiting."""
        try:
            self.broker.connect(should_stop=self._give_up_broker, idle=self._idle)
        except amqp_side.StopWaiting:
            return False
        self.broker.declare(
            self.settings.name,
            self.config.runners,
            self.settings.blocked_delay,
            self.settings.rejected_queue,
            self.settings.concurrency,
        )
        if first:
            recover(self.broker, self.settings.name, self.settings.concurrency, self.settings.rejected_queue)
        self.broker.qos(1)
        self.broker.consume(
            CANCELS, [amqp_side.cancel_queue(self.settings.name)], self._on_cancel, no_ack=True
        )
        self._watch(self.broker.fileno(), "broker")
        self._finish_jobs()
        self._resume_consuming()
        log.info(
            "serving %s as %s (concurrency %d)",
            ", ".join(section.queue for section in self.config.runners),
            self.settings.name, self.settings.concurrency,
        )
        return True

    def _reconnect(self, exc):
        """Connect again after *exc*, keeping the jobs serviced while the broker is away."""
        if exc is not None:
            log.warning("lost the broker connection (%s); reconnecting", exc)
            self.metrics.reconnects.inc()
        while True:
            self._unwatch("broker")
            self.broker.close()
            try:
                self._connect()
                return
            except NameInUse as again:
                # The broker has not yet noticed that our old connection is gone.
                log.warning("%s; waiting for the broker to drop our old connection", again)
            except self.broker.errors as again:
                log.warning("broker connection failed again (%s)", again)
            if self._give_up_broker():
                return
            self._idle()
            time.sleep(amqp_side.RECONNECT_START)

    def _give_up_broker(self):
        """Waiting for the broker stops at a second signal, or at a stop with nothing to hand back."""
        return self.hurry or (self.stopping and not self.slots)

    def _idle(self):
        """Keep the jobs serviced while the loop waits for the broker."""
        self._apply_stop(time.monotonic())
        self._service_jobs()

    # -- Taking jobs ---------------------------------------------------------------

    def _free_slot(self):
        for slot in range(self.settings.concurrency):
            if slot not in self.slots:
                return slot
        return None

    def _resume_consuming(self):
        if self.stopping or self.finishing or self.broker.consuming(JOBS):
            return
        if self._free_slot() is None:
            return
        queues = [amqp_side.build_queue(section.queue, section.routing_key) for section in self.config.runners]
        # The broker may deliver on the first queues while a later basic.consume
        # waits for its reply; such a message is held (prefetch 1: at most one)
        # and taken once every consumer is in place, so that cancelling them then
        # finds them all.
        self._subscribing = True
        try:
            self.broker.consume(JOBS, queues, self._on_message)
        finally:
            self._subscribing = False
        held, self._held = self._held, []
        for queue, raw in held:
            self._on_message(queue, raw)

    def _on_message(self, queue, raw):
        """A build request arrived on *queue*: start it, or move it to the rejected queue."""
        if self._subscribing:
            self._held.append((queue, raw))
            return
        slot = self._free_slot()
        if self.stopping or slot is None:
            # Not expected (consumers are cancelled before the last slot fills),
            # but never hold a message that is not running.
            self.broker.cancel(JOBS)
            raw.requeue()
            return
        try:
            request = decode_build_request(raw.body)
        except BadMessage as exc:
            reject(self.broker, raw, queue, exc.reason, self.settings.rejected_queue)
            self.metrics.rejected.labels(queue=queue).inc()
            return
        headers = dict(raw.headers or {})
        message = Message(
            body=raw.body if isinstance(raw.body, str) else raw.body.decode("utf-8"),
            request=request,
            queue=queue,
            redelivered=bool(raw.delivery_info.get("redelivered") or headers.get(amqp_side.HEADER_RECOVERED)),
            headers=headers,
            recovered_from=_text(headers.get(amqp_side.HEADER_RECOVERED)),
        )
        if any(job.job_id == message.job_id for job in self.slots.values()):
            log.warning("job %s (%s): already running here; dropping the duplicate", message.job_id, queue)
            raw.ack()
            return
        if len(self.slots) + 1 >= self.settings.concurrency:
            self.broker.cancel(JOBS)
        self.broker.publish(
            amqp_side.copy_message(raw, {amqp_side.HEADER_QUEUE: queue}),
            amqp_side.in_progress_name(self.settings.name, slot),
        )
        raw.ack()
        self._start(slot, queue, message, raw)

    def _start(self, slot, queue, message, raw):
        section = self.config.runner_for(queue)
        process = jobs.JobProcess(
            self.context, section.runner, message, self.config.pybit, self.settings.name,
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        now = time.monotonic()
        job = RunningJob(
            slot=slot, queue=queue, message=message, raw=raw, process=process, started=now,
            deadline=now + section.timeout if section.timeout else None,
        )
        self.slots[slot] = job
        request = message.request
        log.info(LOG_JOB_START, job.job_id, request.get_package(), request.get_version(), queue, slot)
        try:
            process.start()
        except OSError as exc:
            log.error("job %s (%s): cannot start its process: %s", job.job_id, queue, exc)
            job.outcome = statuses.FAILED
            job.result = (statuses.FAILED, f"cannot start the job's process: {exc}")
            self._end(job)
            return
        self.selector.register(process.conn.fileno(), selectors.EVENT_READ, ("pipe", slot))
        self.selector.register(process.process.sentinel, selectors.EVENT_READ, ("exit", slot))

    # -- Running jobs ---------------------------------------------------------------

    def _service_jobs(self):
        """Read every job's news, stop jobs past their time, and end the jobs that exited."""
        now = time.monotonic()
        for job in list(self.slots.values()):
            if job.outcome is not None:
                continue
            for event in job.process.receive():
                self._on_job_event(job, event)
            if job.process.eof:
                self._unwatch(("pipe", job.slot))  # a closed pipe stays readable: stop waking on it
            if job.deadline is not None and now >= job.deadline and job.stop_reason is None:
                log.warning("job %s (%s): timed out after %g s; stopping it", job.job_id, job.queue, job.deadline - job.started)
                job.stop_reason = "timeout"
                job.process.stop(now)
            job.process.tick(now)
            if job.process.exited():
                for event in job.process.receive():
                    self._on_job_event(job, event)
                self._end(job)

    def _on_job_event(self, job, event):
        kind = event[0]
        if kind == "status":
            _, status, text = event
            self._report(job, status, text)
            if status in statuses.FINAL:
                job.last_final = status
        elif kind == "log":
            _, level, name, text = event
            logging.getLogger(name).log(level, "job %s (%s): %s", job.job_id, job.queue, text)
        elif kind == "result":
            job.result = event[1:]

    def _report(self, job, status, text=None):
        self.reporter.report(job.job_id, job.message.request.web_host, status, text, queue=job.queue)

    def _end(self, job):
        """Decide the job's outcome and report it; the message's end follows in _finish_jobs."""
        self._unwatch(("pipe", job.slot))
        self._unwatch(("exit", job.slot))
        job.process.close()
        status, text = self._outcome(job)
        job.outcome = status
        if status is not None and status != job.last_final and status != jobs.DROPPED:
            self._report(job, status, text)
        duration = time.monotonic() - job.started
        self.metrics.job_ended(job.queue, status or jobs.DROPPED, duration)
        request = job.message.request
        if status == jobs.DROPPED:
            log.info(LOG_JOB_DROPPED, job.job_id, request.get_package(), request.get_version(), job.queue, text)
        else:
            log.info(
                LOG_JOB_END, job.job_id, request.get_package(), request.get_version(), job.queue,
                status, duration, f": {text}" if text else "",
            )
        self.finishing.append(job)

    def _outcome(self, job):
        reason = job.stop_reason
        if reason == "timeout":
            return statuses.FAILED, f"timed out after {job.deadline - job.started:g} s"
        if reason == "cancel":
            return statuses.CANCELLED, "cancelled from PyBit"
        if reason == "shutdown":
            return statuses.WAITING, "the worker stopped; the job is back on its queue"
        if job.result is None:
            return statuses.FAILED, job.process.describe_exit()
        status, text = job.result
        if status is None:
            return (job.last_final or statuses.DONE), None
        return status, text

    def _finish_jobs(self):
        """Give each ended job's message its one end, then free the slot."""
        while self.finishing:
            job = self.finishing[0]
            if job.outcome == statuses.BLOCKED:
                queue = amqp_side.delay_queue(job.queue, self.settings.blocked_delay)
                self.broker.publish(amqp_side.copy_message(job.raw), queue.name)
            elif job.outcome == statuses.WAITING:
                self.broker.publish(
                    amqp_side.copy_message(job.raw, {amqp_side.HEADER_RECOVERED: self.settings.name}), job.queue
                )
            self.broker.purge(amqp_side.in_progress_name(self.settings.name, job.slot))
            self.finishing.pop(0)
            del self.slots[job.slot]

    # -- Cancelling and stopping ---------------------------------------------------

    def _on_cancel(self, queue, raw):
        try:
            cancel = decode_cancel_request(raw.body)
        except BadMessage as exc:
            log.warning("ignored a bad cancel request: %s", exc.reason)
            return
        job_id = cancel.job.id
        for job in self.slots.values():
            if job.job_id == job_id and job.outcome is None:
                log.info("job %s (%s): cancelled from PyBit; stopping it", job_id, job.queue)
                job.stop_reason = job.stop_reason or "cancel"
                job.process.stop(time.monotonic())
                return
        log.info("cancel request for job %s, which is not running here; ignored", job_id)

    def _apply_stop(self, now):
        if not self.stopping:
            return
        if self.stop_deadline is None:
            systemd.notify("STOPPING=1")
            self.stop_deadline = now + self.settings.shutdown_grace
            log.info(
                "stopping: no new jobs; %d running job(s) get %g s to finish",
                len(self.running()), self.settings.shutdown_grace,
            )
            if self.broker.connected:
                try:
                    self.broker.cancel(JOBS)
                except self.broker.errors as exc:
                    log.warning("could not cancel consumers: %s", exc)
        if self.hurry or now >= self.stop_deadline:
            for job in self.running():
                if job.stop_reason is None:
                    job.stop_reason = "shutdown"
                    job.process.stop(now, grace=0 if self.hurry else jobs.KILL_GRACE)

    def health(self):
        """What ``/healthz`` says: healthy while connected to the broker and not stopping."""
        connected = self.broker.connected
        return {
            "healthy": connected and not self.stopping,
            "broker": "connected" if connected else "disconnected",
            "queues": [section.queue for section in self.config.runners],
            "running": len(self.running()),
            "stopping": self.stopping,
        }

    def running(self):
        return [job for job in list(self.slots.values()) if job.outcome is None]

    def _done(self):
        if not self.stopping:
            return False
        if not self.slots:
            return True
        # At a second signal with the broker away, ended jobs keep their
        # in-progress copies: the next start puts them back.
        return self.hurry and not self.running() and not self.broker.connected

    def _timeout(self, now):
        timeout = self.settings.polling_time
        if self.broker.connected and self.config.amqp.heartbeat:
            timeout = min(timeout, self.config.amqp.heartbeat / 4)
        for job in self.running():
            for moment in (job.deadline, job.process.kill_at):
                if moment is not None:
                    timeout = min(timeout, max(0.0, moment - now))
        if self.stopping and self.stop_deadline is not None:
            timeout = min(timeout, max(0.0, self.stop_deadline - now))
        if self.finishing:
            timeout = min(timeout, 1.0)
        return timeout

    def _shutdown(self):
        if self.slots and self.broker.connected:
            try:
                self._finish_jobs()
            except self.broker.errors as exc:
                log.warning("could not put back every message (%s); the next start recovers them", exc)
        self.broker.close()
        self.reporter.stop(REPORT_FLUSH_TIMEOUT)
        if self.http is not None:
            self.http.stop()
        if self.selector is not None:
            self.selector.close()
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        log.info("stopped")

    # -- Plumbing --------------------------------------------------------------------

    def _spool_path(self):
        if self.settings.state_dir is None:
            return None
        return self.settings.state_dir / f"{self.settings.name}.statuses.jsonl"

    def _runner_modules(self):
        modules = []
        for section in self.config.runners:
            module = type(section.runner).__module__
            function = getattr(section.runner, "function", None)
            modules.append(module)
            if function is not None and getattr(function, "__module__", None):
                modules.append(function.__module__)
        return modules

    def _open_wakeup(self):
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")

    def _wake(self):
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, b"!")
            except (BlockingIOError, OSError):
                pass

    def _drain_wakeup(self):
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _watch(self, fd, tag):
        self._unwatch(tag)
        self.selector.register(fd, selectors.EVENT_READ, tag)

    def _unwatch(self, tag):
        for fd, key in list(self.selector.get_map().items()):
            if key.data == tag:
                self.selector.unregister(fd)

    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, frame):
            first = not self.stopping
            log.info("%s received; %s", signal.Signals(signum).name,
                     "finishing the running jobs" if first else "stopping now")
            self.request_stop(hurry=not first)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        previous_fd = signal.set_wakeup_fd(self._wake_w)

        def restore():
            for sig, old in previous.items():
                signal.signal(sig, old)
            signal.set_wakeup_fd(previous_fd)

        return restore


def _text(value):
    """A header's value as text (amqp gives bytes or str), or None if it is not one."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def reject(broker, raw, queue, reason, rejected_queue):
    """Move a bad message, unchanged, to the rejected queue (confirmed first), then ack it."""
    log.warning("rejected a message from %s: %s", queue, reason)
    broker.publish(
        amqp_side.copy_message(raw, {amqp_side.HEADER_REASON: reason, amqp_side.HEADER_QUEUE: queue}),
        rejected_queue,
    )
    raw.ack()


def recover(broker, worker_name, slots, rejected_queue):
    """Put every in-progress copy of *worker_name* back on its queue; return how many.

    Used when a worker starts (its previous run may have died mid-job) and by
    ``rbit recover`` for a worker that will not come back. Slots beyond
    *slots* left by an earlier, larger concurrency are found and emptied too.
    """
    count = 0
    slot = 0
    while slot < slots or broker.exists(amqp_side.in_progress_name(worker_name, slot)):
        name = amqp_side.in_progress_name(worker_name, slot)
        while (message := broker.get(name)) is not None:
            headers = dict(message.properties.get("application_headers") or {})
            queue = headers.get(amqp_side.HEADER_QUEUE)
            if not queue:
                broker.publish(
                    amqp_side.copy_message(message, {amqp_side.HEADER_REASON: "in-progress copy without its queue"}),
                    rejected_queue,
                )
            else:
                headers = {amqp_side.HEADER_RECOVERED: worker_name}
                broker.publish(amqp_side.copy_message(message, headers), str(queue))
                log.warning("put back a job that %s did not finish, on %s", worker_name, queue)
            message.channel.basic_ack(message.delivery_tag)
            count += 1
        slot += 1
    return count
