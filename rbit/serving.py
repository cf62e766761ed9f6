"""The build queues a worker serves: the order it consumes them in, and those out of reach for now."""

from __future__ import annotations

import logging
from typing import Callable

from . import queues
from .errors import QueueUnavailable
from .queues import QueueSpec

log = logging.getLogger(__name__)

#: Seconds at least between two tries to declare a served queue whose node is down.
UNAVAILABLE_RETRY = 5.0

LOG_BACK = "serving %s again: its node is back"


class Served:
    """The served build queues, in the order of the next round of consumers.

    Each round starts after the queue of the last message taken, so that with
    a prefetch per consumer no queue always loses the race to the one consumed
    first. A classic build queue whose cluster node is down is left out (the
    worker serves the others) and declared again every :data:`UNAVAILABLE_RETRY`
    seconds until it is back.
    """

    def __init__(self, config, clock: Callable[[], float]):
        self.config = config
        self.clock = clock
        self._first = 0
        #: Served queues whose (classic) queue is out of reach: its cluster node is down.
        self.unavailable: list[str] = []
        self._retry_at = 0.0

    def specs(self) -> list[QueueSpec]:
        """The queues to consume now, the one after the last taken first."""
        runners = self.config.runners
        first = self._first % len(runners)
        return [queues.build_queue(s.queue, s.routing_key)
                for s in runners[first:] + runners[:first] if s.queue not in self.unavailable]

    def taken_from(self, queue: str) -> None:
        """A message of *queue* is being taken: the next round starts after it."""
        self._first = next(i for i, s in enumerate(self.config.runners) if s.queue == queue) + 1

    def declare(self, broker) -> None:
        """Declare everything the worker uses, noting the served queues out of reach."""
        self.unavailable = queues.declare_worker(broker, self.config.worker, self.config.runners,
                                                 self.config.amqp.queue_type)

    def retry(self, broker) -> bool:
        """Declare again, now and then, the queues out of reach; True if one is back."""
        if not self.unavailable or self.clock() < self._retry_at:
            return False
        self._retry_at = self.clock() + UNAVAILABLE_RETRY
        back = []
        for section in self.config.runners:
            if section.queue in self.unavailable:
                try:
                    queues.declare_served(broker, self.config.worker, section, self.config.amqp.queue_type,
                                          spare=True)
                except QueueUnavailable:
                    continue
                back.append(section.queue)
        if back:
            log.info(LOG_BACK, ", ".join(back))
            self.unavailable = [queue for queue in self.unavailable if queue not in back]
        return bool(back)
