"""The publisher channel: publishes the broker confirms, and the purges that must come before them.

Publishes go on a channel of their own, apart from the consumers and their
unsettled messages, so that a refused publish can replace it; purges go there
too, as the broker handles a channel's methods in order. The library's errors
leave as they are: the :class:`~rbit.broker.Broker` methods that call these
translate them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import amqp

from ..delivery import Outgoing
from ..errors import ConnectionLost, Unroutable
from .library import _amqp_message, _close_quietly, _publish_confirmed

log = logging.getLogger(__name__)

#: Seconds to wait before each new try of a publish the broker refused (basic.nack), on a
#: fresh channel: the first goes at once, as a quorum queue whose leader has just died
#: keeps refusing an old channel's publishes for a while but takes a new one's once it
#: has a new leader. After the last, the publish fails as a lost connection.
PUBLISH_RETRY_WAITS = (0.0, 0.5, 1.0, 2.0, 4.0)

LOG_PUBLISH_REFUSED = "the broker refused a message for %s (basic.nack); it is published again on a new channel"


class Publisher:
    """The publisher channel of the broker connection, and the purges sent on it not yet known done.

    Nothing is sent before :meth:`open`. The purges owed outlive the connection
    they were sent on (see :meth:`close`).
    """

    def __init__(self):
        self._connection = None
        #: The channel, which a refused publish replaces (see :meth:`publish`).
        self.channel = None
        #: Queues purged without waiting on the publisher channel (see :meth:`purge_nowait`)
        #: whose purge no later reply on that channel has yet shown done.
        self._purges_sent: set[str] = set()
        #: Queues whose purge is owed and not known done, to be done (again) waiting, by
        #: :meth:`~rbit.broker.Broker.confirm_purges`: those sent on a connection since lost,
        #: and those asked for by :meth:`purge_later`. Kept across connections.
        self._purges_owed: set[str] = set()

    @property
    def unsure_purges(self) -> frozenset[str]:
        """The queues whose purge is owed and not yet known done (see :meth:`purge_nowait`)."""
        return frozenset(self._purges_sent | self._purges_owed)

    def open(self, connection) -> None:
        """Open the publisher channel on *connection*, just connected."""
        self._connection = connection
        self.channel = connection.channel()

    def close(self) -> None:
        """Forget the connection, dropped.

        A purge sent on it and not yet shown done may or may not have been
        done: it is owed, for :meth:`~rbit.broker.Broker.confirm_purges` on the
        next connection.
        """
        self._purges_owed |= self._purges_sent
        self._purges_sent.clear()
        self._connection, self.channel = None, None

    def publish(self, message: Outgoing, routing_key: str, exchange: str = "", mandatory: bool = False,
                meanwhile: Callable[[], None] | None = None) -> None:
        """Publish *message* and wait for the broker's confirm; *meanwhile*, if given, is called
        once the message is sent, while the broker confirms it (its first try only).

        A refused confirm (basic.nack: the broker did not take the message) is
        never success: the message is published again on a fresh channel, up
        to ``len(PUBLISH_RETRY_WAITS)`` more times, and then the publish fails with
        :class:`~rbit.errors.ConnectionLost`, for the caller to do again once
        connected again. The message may then be there twice (a broker can
        refuse a message it took), which each of rbit's uses allows for. With
        *mandatory*, :class:`~rbit.errors.Unroutable` if the broker returns it.
        The confirm also shows done the purges sent before it on the channel
        (see :meth:`purge_nowait`).
        """
        returned = []
        tries = 1 + len(PUBLISH_RETRY_WAITS)
        for wait in (None, *PUBLISH_RETRY_WAITS):
            if wait is not None:  # the one before was refused
                meanwhile = None
                time.sleep(wait)
                self._connection.heartbeat_check()
            publisher = self._publishing()
            if mandatory:
                publisher.events["basic_return"].add(lambda *args: returned.append(args))
            try:
                _publish_confirmed(publisher, _amqp_message(message), exchange, routing_key, mandatory, meanwhile)
                break
            except amqp.exceptions.MessageNacked:
                log.warning(LOG_PUBLISH_REFUSED, exchange or routing_key)
                self.channel = None
                _close_quietly(publisher)
        else:
            raise ConnectionLost(f"the broker refused {tries} times to take a message for {exchange or routing_key!r}")
        # The broker's confirm came on the channel the purges sent before it went on: done.
        self._purges_sent.clear()
        if returned:
            raise Unroutable(f"no queue is bound to {exchange!r} with the key {routing_key!r}")

    def _publishing(self):
        """The publisher channel, opened anew after a refused publish closed the one before.

        The purges sent on that one and not yet shown done are sent again on
        the new one before anything else, so that each still comes before
        whatever is published after it (see :meth:`purge_nowait`).
        """
        if self.channel is None:
            self.channel = self._connection.channel()
            for queue_name in sorted(self._purges_sent):
                self.channel.queue_purge(queue_name, nowait=True)
        return self.channel

    def purge_nowait(self, queue_name: str) -> None:
        """Empty *queue_name* without waiting: ``queue.purge`` with ``nowait`` on the publisher channel.

        rbit purges only an in-progress queue, once its job has had its end
        (:func:`rbit.queues.release`), and two promises hang on it. No loss:
        RabbitMQ handles a channel's methods in order, each purge fully before
        the next method, and the slot's next copy (:func:`rbit.queues.hold`)
        is published on this same channel, so this purge can never remove it;
        the slot can take its next job at once. No double run: until the
        broker is known to have done it, the purge is *unsure*
        (:attr:`unsure_purges`); any later reply on this channel shows it done
        (the confirm of the next publish, whatever it is for, or a waiting
        purge's ``purge_ok``). Should the connection be lost first, it may
        never have been done, and :meth:`~rbit.broker.Broker.confirm_purges`
        does it again, waiting, once connected again and before anything is
        consumed; a clean stop does too. A publish the broker refuses replaces
        the channel (see :meth:`publish`): the new one gets the purges again first.
        """
        self._purges_sent.add(queue_name)  # before it is sent: if sending fails, it stays unsure
        self._publishing().queue_purge(queue_name, nowait=True)

    def purge(self, queue_name: str) -> None:
        """Empty *queue_name*, waiting for the broker's ``purge_ok``, on the publisher channel.

        The reply also shows done every purge sent before it on that channel.
        """
        self._publishing().queue_purge(queue_name)
        self._purges_sent.clear()
        self._purges_owed.discard(queue_name)

    def purge_later(self, queue_name: str) -> None:
        """Owe a purge of *queue_name*, sending nothing now: :meth:`~rbit.broker.Broker.confirm_purges` does it.

        For a copy that may have reached the broker on a connection that just
        failed, though its job never started (see :mod:`rbit.taking`): the
        caller connects again, and nothing is put in *queue_name* before then.
        """
        self._purges_owed.add(queue_name)
