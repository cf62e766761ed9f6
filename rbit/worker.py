"""The worker: takes build requests off the broker and sees each job to exactly one end.

How a message travels:

1. It arrives on a served queue. The channel's prefetch is 1, counted across
   all consumers, so the worker holds at most the one message it is about to
   start. Where the broker refuses such a shared prefetch (quorum queues,
   RabbitMQ 4.3), each consumer has a prefetch of 1: a message that comes
   beside the one taken is handed back at once, and the consumers are
   cancelled before the last free slot's message is acknowledged, as below.
2. It is decoded safely; a bad one is moved to the rejected queue.
3. A copy goes, with a publisher confirm, to this worker's durable in-progress
   queue for the job's slot; while the broker confirms it, the job is offered
   to the process waiting for the slot's next job, which reads it; then the
   original is acknowledged and the process told to run the job (it never
   runs one before). Acknowledging at once means the broker's
   ``consumer_timeout`` never sees a long build, and a connection that drops
   mid-job cannot make the broker hand the job to someone else. If every slot
   is now busy, the consumers are cancelled *before* the acknowledgement (while
   the copy is confirmed), so the broker sends nothing more until a slot is
   free. With the shared prefetch the cancel needs no reply: the message taken is the only one the
   broker may send until its acknowledgement, which the cancel precedes on
   the same channel (see :meth:`rbit.broker.Broker.cancel`).
4. The job ends; :func:`rbit.outcome.decide` says what to report and what the
   message becomes (acknowledged, delayed, put back, dropped); then the slot's
   in-progress copy is purged, without waiting, on the channel that the
   slot's next copy will go on: the broker does the purge before that copy
   arrives, so the slot is free at once. Until the broker is seen to have
   done it, the purge is unsure; should the connection be lost meanwhile, it
   is done again, waiting, once connected again and before anything is
   consumed, and a clean stop waits for it too, so that no later start puts
   back the job that ended (see :meth:`rbit.broker.Broker.purge_nowait`). If
   the broker is away when the job ends, this waits for the reconnection.
5. A worker that died mid-job finds its in-progress copies when it starts
   again and puts them back on their queues; if it does not come back within
   ``reclaim_after``, a live peer does it (:mod:`rbit.liveness`), and
   ``rbit recover`` does it by hand.

The loop is single-threaded and takes its broker from its caller, so tests
can drive it with an in-memory one. One turn of it is :meth:`Worker.loop`.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Callable

from . import jobs, queues, systemd
from .broker import StopWaiting
from .errors import BadMessage, BrokerError, ConnectionLost, NameInUse, QueueLocked, QueueMissing
from .liveness import Liveness
from .metrics import HealthServer, Metrics
from .outcome import Stop
from .pybit import decode_cancel_request
from .reporting import StatusReporter
from .running import Jobs, RunningJob
from .serving import Served
from .taking import JOBS, Taker
from .wakeup import Wakeup
from .web import Board

log = logging.getLogger(__name__)

#: Consumer key of the worker's own cancel queue.
CANCELS = "cancels"

#: How long the worker waits at most for the status backlog at a clean stop.
REPORT_FLUSH_TIMEOUT = 5.0

#: Seconds between two reconnections when the broker refuses the one before.
RECONNECT_PAUSE = 1.0

class Worker:
    """Serves the queues of a configuration through *broker* until told to stop."""

    def __init__(self, config, broker, reporter=None, forks=None, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.settings = config.worker
        self.broker = broker
        self.clock = clock
        self.reporter = reporter or StatusReporter(config.pybit, self.settings.name, spool_path=self._spool_path())
        self.metrics = Metrics()
        self.metrics.backlog.set_function(lambda: self.reporter.backlog)
        self.metrics.running.set_function(lambda: len(self.running()))
        self.wakeup = Wakeup()
        self.jobs = Jobs(config, self.reporter, self.metrics, self.wakeup, clock)
        self.jobs.board = self.board = Board(self.settings.name, self.jobs.logs.log_dir)
        self.http = HealthServer(self.settings.http, self.metrics, self.health, self.board) if self.settings.http else None
        self.jobs.forks = forks
        self.liveness = Liveness(self.settings, self.jobs, idle=self._idle, should_stop=self._give_up_broker,
                                 queue_type=config.amqp.queue_type)
        self.served = Served(config, clock)
        self.taker = Taker(self.settings, broker, self.jobs, self.liveness, self.served, self.metrics,
                           stopping=lambda: self.stopping)
        self._recovered = False
        self.stopping = False
        self.stop_deadline = None
        self.hurry = False

    @property
    def slots(self) -> dict[int, RunningJob]:
        return self.jobs.slots

    def running(self) -> list[RunningJob]:
        return self.jobs.running()

    # -- Lifecycle --------------------------------------------------------------

    def run(self) -> None:
        """Connect, serve until stopped, and hand back every running job's message."""
        restore = self.wakeup.on_signals(self._on_signal)
        self.reporter.start()
        self.jobs.logs.prepare(self.clock())
        if self.http is not None:
            self.http.start()
        own_forks = self.jobs.forks is None
        try:
            self.jobs.forks = self.jobs.forks or jobs.fork_server(jobs.preload(self.config))
            self.jobs.warm_up()
            try:
                connected = self._connect()
            except ConnectionLost as exc:  # the first connection broke before it served
                self._reconnect(exc)
                connected = self.broker.connected
            if not connected:
                return
            systemd.notify("READY=1\nSTATUS=serving " + ", ".join(s.queue for s in self.config.runners))
            while not self._done():
                self.loop()
            self._apply_stop(self.clock())  # a stop with no job running still says STOPPING
        finally:
            restore()
            self._shutdown()
            if own_forks and self.jobs.forks is not None:
                self.jobs.forks.close()

    def request_stop(self, hurry: bool = False) -> None:
        """Stop taking jobs (from any thread or a signal handler); *hurry* stops jobs now."""
        self.hurry = self.hurry or hurry or self.stopping
        self.stopping = True
        self.wakeup.wake()

    def loop(self) -> None:
        """One turn: wait for news (at most the poll time), then act on it."""
        self._apply_stop(self.clock())
        if self._done():
            return
        self.wakeup.wait(self._timeout(self.clock()))
        try:
            self._turn()
        finally:
            self.jobs.logs.close_ended()  # of the jobs that ended, unless a job taken since did it (rbit.taking)

    def _turn(self) -> None:
        self.liveness.check()  # before any job's news: a fenced worker reports nothing more
        self.jobs.service()
        if not self.broker.connected:
            self._reconnect(None)
            return
        try:
            self.broker.drain()
            self.broker.heartbeat_check()
            self.jobs.finish(self.broker)
            if self.stopping and not self.slots:
                self.broker.confirm_purges()  # a clean stop leaves no in-progress copy behind
            self._serve_returned()
            self.taker.hold_deliveries(self.liveness.tick)
            self._resume_consuming()
        except ConnectionLost as exc:
            self._reconnect(exc)

    # -- Connecting -----------------------------------------------------------------

    def _connect(self) -> bool:
        """(Re)connect, declare, join (recovering at the first start) and resume; False if told to give up waiting."""
        self.liveness.disconnected()
        try:
            self.broker.connect(should_stop=self._give_up_broker, idle=self._idle,
                                max_pause=self.liveness.max_pause)
        except StopWaiting:
            return False
        self.taker.forget_held()
        try:
            self.served.declare(self.broker)
        except QueueLocked as exc:
            raise NameInUse(f"another worker named {self.settings.name!r} is connected to this broker") from exc
        self.broker.qos(1)
        try:
            self.broker.consume(CANCELS, [queues.cancel_queue(self.settings.name)], self._on_cancel, no_ack=True)
        except QueueMissing as exc:
            # Declared a moment ago, gone now: a cluster whose node just died was still removing the
            # old one, which lived there. Connecting again declares it anew.
            raise ConnectionLost(f"the cancel queue went as it was declared ({exc})") from exc
        self.wakeup.watch(self.broker.fileno(), "broker")
        self.board.broker_address = self.broker.address
        self.jobs.finish(self.broker)
        # Every in-progress copy that must go is known gone before anything is consumed:
        # each purge that a lost connection left unsure is done again, waiting. No slot has
        # taken a job on this connection yet, so none of them holds a running job's copy.
        self.broker.confirm_purges()
        # Once: what an earlier run of this worker left unfinished is put back under its lock.
        self.taker.hold_deliveries(lambda broker: self.liveness.join(broker, first=not self._recovered))
        self._recovered = True
        self._resume_consuming()
        log.info("serving %s as %s (concurrency %d)", ", ".join(s.queue for s in self.config.runners),
                 self.settings.name, self.settings.concurrency)
        return True

    def _reconnect(self, exc: Exception | None) -> None:
        """Connect again after *exc*, keeping the jobs serviced while the broker is away."""
        if exc is not None:
            log.warning("lost the broker connection (%s); reconnecting", exc)
            self.metrics.reconnects.inc()
        while True:
            self.wakeup.unwatch("broker")
            self.broker.close()
            try:
                self._connect()
                return
            except NameInUse as again:
                # The broker has not yet noticed that our old connection is gone.
                log.warning("%s; waiting for the broker to drop our old connection", again)
            except ConnectionLost as again:
                log.warning("broker connection failed again (%s)", again)
            if self._give_up_broker():
                return
            self._idle()
            time.sleep(RECONNECT_PAUSE)

    def _give_up_broker(self) -> bool:
        """Waiting for the broker stops at a second signal, or at a stop with nothing to hand back
        and no in-progress copy to remove."""
        return self.hurry or (self.stopping and not self.slots and not self.broker.unsure_purges)

    def _idle(self) -> None:
        """Keep the jobs serviced while the loop waits for the broker."""
        self._apply_stop(self.clock())
        self.liveness.check()
        self.jobs.service()

    # -- Taking jobs ---------------------------------------------------------------

    def _resume_consuming(self) -> None:
        if not self.stopping:
            self.jobs.warm_up()  # the next job finds its process waiting (one that died is replaced)
        if (self.stopping or self.jobs.finishing or self.broker.consuming(JOBS) or self.jobs.free_slot() is None
                or not self.liveness.joined):
            return
        self.taker.consume()

    def _serve_returned(self) -> None:
        """Consume again the served queues whose node was down, once they are back."""
        if self.served.retry(self.broker):
            self.broker.cancel(JOBS)  # resumed at once, with them

    # -- Cancelling and stopping ---------------------------------------------------

    def _on_cancel(self, queue: str, delivery) -> None:
        try:
            cancel = decode_cancel_request(delivery.body)
        except BadMessage as exc:
            log.warning("ignored a bad cancel request: %s", exc.reason)
            return
        for job in self.running():
            if job.job_id == cancel.job.id:
                log.info("job %s (%s): cancelled from PyBit; stopping it", job.job_id, job.queue)
                self.jobs.stop(job, Stop.CANCEL)
                return
        log.info("cancel request for job %s, which is not running here; ignored", cancel.job.id)

    def _on_signal(self, signum: int) -> None:
        first = not self.stopping
        log.info("%s received; %s", signal.Signals(signum).name,
                 "finishing the running jobs" if first else "stopping now")
        self.request_stop(hurry=not first)

    def _apply_stop(self, now: float) -> None:
        if not self.stopping:
            return
        if self.stop_deadline is None:
            systemd.notify("STOPPING=1")
            self.stop_deadline = now + self.settings.shutdown_grace
            log.info("stopping: no new jobs; %d running job(s) get %g s to finish",
                     len(self.running()), self.settings.shutdown_grace)
            if self.broker.connected:
                try:
                    self.broker.cancel(JOBS)
                except ConnectionLost as exc:
                    log.warning("could not cancel consumers: %s", exc)
        if self.hurry or now >= self.stop_deadline:
            for job in self.running():
                self.jobs.stop(job, Stop.SHUTDOWN, grace=0 if self.hurry else jobs.KILL_GRACE)

    def health(self) -> dict:
        """What ``/healthz`` says: healthy while connected to the broker and not stopping."""
        connected = self.broker.connected
        return {
            "healthy": connected and not self.stopping and not self.liveness.fenced,
            "broker": "connected" if connected else "disconnected",
            "queues": [section.queue for section in self.config.runners],
            "running": len(self.running()),
            "stopping": self.stopping,
            "fenced": self.liveness.fenced,
        }

    def _done(self) -> bool:
        if not self.stopping:
            return False
        if not self.slots and not self.broker.unsure_purges:
            return True  # every message has had its end, and every copy is known gone
        # At a second signal with the broker away, ended jobs keep their
        # in-progress copies: the next start puts them back.
        return self.hurry and not self.running() and not self.broker.connected

    def _timeout(self, now: float) -> float:
        timeout = self.settings.polling_time
        if self.broker.connected and self.config.amqp.heartbeat:
            timeout = min(timeout, self.config.amqp.heartbeat / 4)
        moments = self.jobs.moments() + [now + wait for wait in self.liveness.waits()]
        if self.stopping and self.stop_deadline is not None:
            moments.append(self.stop_deadline)
        if self.jobs.finishing:
            moments.append(now + 1.0)
        return min([timeout, *(max(0.0, moment - now) for moment in moments)])

    def _shutdown(self) -> None:
        if self.broker.connected:
            try:
                if self.slots:
                    self.jobs.finish(self.broker)
                self.broker.confirm_purges()  # ended jobs' copies are gone before the connection is
            except BrokerError as exc:
                log.warning("could not put back every message or remove every copy (%s); "
                            "the next start recovers them", exc)
        if self.broker.connected:
            try:
                self.liveness.leave(self.broker)
            except BrokerError as exc:
                log.debug("could not leave the registry: %s", exc)
        self.broker.close()
        self.jobs.logs.close_ended()
        self.jobs.cool_down()
        self.reporter.stop(REPORT_FLUSH_TIMEOUT)
        if self.http is not None:
            self.http.stop()
        self.wakeup.close()
        log.info("stopped")

    # -- Plumbing --------------------------------------------------------------------

    def _spool_path(self):
        if self.settings.state_dir is None:
            return None
        return self.settings.state_dir / f"{self.settings.name}.statuses.jsonl"
