"""Taking a build request: it becomes a job in a free slot, or goes back, or to the rejected queue.

One message at a time: a broker call dispatches what arrives while it waits
for its reply, so a message can come while another is being taken, or while
the consumers are being started; it waits its turn. How a message travels,
from its arrival to its end, is told in :mod:`rbit.worker`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from . import queues
from .errors import BadMessage, BrokerError
from .message import Message
from .pybit import decode_build_request

log = logging.getLogger(__name__)

#: Consumer key of the build queues (all cancelled and resumed together).
JOBS = "jobs"


class Taker:
    """Takes the build requests delivered on the served queues into the worker's free slots.

    *stopping* says whether the worker is stopping, when it takes nothing more.
    """

    def __init__(self, settings, broker, jobs, liveness, served, metrics, stopping: Callable[[], bool]):
        self.settings = settings
        self.broker = broker
        self.jobs = jobs
        self.liveness = liveness
        self.served = served
        self.metrics = metrics
        self.stopping = stopping
        #: True while a message is being taken or consumers started: a delivery that
        #: the broker sends meanwhile (a broker call dispatches what arrives while
        #: it waits for its reply) is held and taken after, never in the middle.
        self._taking = False
        self._held = []

    def consume(self) -> None:
        """Consume the served queues, taking each message that comes in :meth:`on_message`."""
        # One wait, for the last queue's consume_ok: a refusal of any queue is
        # raised here. The broker may deliver on the first queues meanwhile; such
        # a message is held and taken once every consumer is in place, so that
        # cancelling them then finds them all.
        self.hold_deliveries(lambda broker: broker.consume(JOBS, self.served.specs(), self.on_message))

    def on_message(self, queue: str, delivery) -> None:
        """A build request arrived on *queue*: take it, unless one is being taken (then later)."""
        self._held.append((queue, delivery))
        if not self._taking:
            self._take_held()

    def hold_deliveries(self, action: Callable) -> None:
        """Call ``action(broker)``, taking a message that arrives meanwhile only once it is done."""
        self._taking = True
        try:
            action(self.broker)
        finally:
            self._taking = False
        self._take_held()

    def forget_held(self) -> None:
        """Drop the deliveries held of a connection that is gone: the broker has them back."""
        self._held = []

    def _take_held(self) -> None:
        while self._held and not self._taking:
            queue, delivery = self._held.pop(0)
            self._taking = True
            try:
                self._take(queue, delivery)
            finally:
                self._taking = False

    def _take(self, queue: str, delivery) -> None:
        """Start the build request *delivery* from *queue*, or move it to the rejected queue."""
        slot = self.jobs.free_slot()
        if self.stopping() or slot is None or not self.liveness.joined:
            # With a prefetch per consumer, a message that came beside the one
            # that filled the last slot (consumers are cancelled before then);
            # never hold a message that is not running.
            self.broker.cancel(JOBS)
            delivery.requeue()
            return
        try:
            request = decode_build_request(delivery.body)
        except BadMessage as exc:
            queues.reject(self.broker, delivery, queue, exc.reason, self.settings.rejected_queue)
            self.metrics.rejected.labels(queue=queue).inc()
            return
        message = Message(body=delivery.text, request=request, queue=queue,
                          redelivered=delivery.redelivered or bool(queues.recovered_from(delivery)),
                          headers=dict(delivery.headers), recovered_from=queues.recovered_from(delivery))
        if self.jobs.holds(message.job_id):
            log.warning("job %s (%s): already running here; dropping the duplicate", message.job_id, queue)
            delivery.ack()
            return
        last_slot = len(self.jobs.slots) + 1 >= self.settings.concurrency
        self.served.taken_from(queue)

        def while_the_copy_is_confirmed():
            if last_slot:
                # No hoarding: the consumers go before the ack below lets the broker send more.
                self.broker.cancel(JOBS, before_ack=True)
            self.jobs.offer(slot, queue, message)  # its process reads the job now, runs it at jobs.start
            self.jobs.logs.close_ended()  # those of jobs that ended before: their last lines, off the way of this one

        try:
            # No loss: this waits for the broker's confirm of the copy, and only then is
            # the original acknowledged; a worker that dies in between finds the copy.
            queues.hold(self.broker, delivery, queue, self.settings.name, slot, meanwhile=while_the_copy_is_confirmed)
            delivery.ack()
        except BrokerError:
            # The copy may be on the broker although the job never starts (the connection
            # broke between the copy and the acknowledgement), and the original comes back:
            # the copy is removed once connected again, before the slot takes a job.
            self.jobs.withdraw(slot)
            self.broker.purge_later(queues.in_progress_name(self.settings.name, slot))
            raise
        except BaseException:
            self.jobs.withdraw(slot)
            raise
        self.jobs.start(slot, delivery)
