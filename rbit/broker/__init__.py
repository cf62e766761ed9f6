"""The broker boundary: one connection to RabbitMQ through kombu, and rbit's own errors for its failures.

Nothing outside this package imports kombu or amqp. Messages come out as
:class:`Delivery` objects and go in as :class:`Outgoing` ones; every library
error leaves as an :class:`~rbit.errors.BrokerError` (a :class:`ConnectionLost`
when connecting again cures it). Which queues rbit uses, and why, is
:mod:`rbit.queues`'s business; :mod:`.library` holds the translations, and
:mod:`.publisher` the channel that publishes and purges.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import amqp
from kombu import Consumer

from ..delivery import Delivery, Outgoing
from ..errors import BrokerError, ConnectionLost, QueueMissing, QueueUnavailable
from ..queues import QueueSpec
from .library import (
    Batch, _cancel_unanswered, _close_quietly, _delivery, _forget_consumer, _kombu_queue, _queue_of,
    _refuses_global_qos, _settle, _short, _translated, _where, connection_for,
)
from .publisher import Publisher

__all__ = ["Batch", "Broker", "Delivery", "Outgoing", "StopWaiting", "connection_for"]

log = logging.getLogger(__name__)

#: Reconnection backoff: first wait, step and cap, in seconds.
RECONNECT_START, RECONNECT_STEP, RECONNECT_MAX = 1.0, 2.0, 30.0

LOG_CONNECT_FAILED = "cannot reach the broker (%s); next attempt in %.0f s"
LOG_PER_CONSUMER = ("the broker refuses a prefetch shared by all consumers (%s); each consumer now "
                    "gets its own prefetch of 1, and a message that comes beside the one taken is handed back")


class Broker:
    """One connection to the broker and the channel the worker uses on it.

    Nothing is sent before :meth:`connect`.
    """

    def __init__(self, settings):
        self.settings = settings
        self._connection = None
        self._channel = None
        #: Publishes go on a channel of their own, which a refused publish replaces
        #: (see :meth:`publish`) without touching the consumers or unsettled messages.
        #: Purges go there too, so that the broker does each before anything published after it;
        #: the publisher keeps those not yet known done, across connections.
        self._publisher = Publisher()
        self._consumers = {}
        #: The prefetch count last asked for (see :meth:`qos`).
        self._prefetch = None
        #: True while the broker takes one prefetch limit for all of a channel's
        #: consumers (``basic.qos`` global). Quorum queues refuse it, and RabbitMQ
        #: 4.3 refuses it for every queue: then each consumer gets its own.
        self.shared_prefetch = getattr(settings, "queue_type", "classic") != "quorum"

    @property
    def connected(self) -> bool:
        return self._channel is not None

    @property
    def unsure_purges(self) -> frozenset[str]:
        """The queues whose purge is owed and not yet known done (see :meth:`purge_nowait`)."""
        return self._publisher.unsure_purges

    @property
    def address(self) -> str:
        """``host:port`` of the broker connected to (or first configured), never credentials."""
        return _where(self._connection or connection_for(self.settings))

    def connect(self, should_stop=lambda: False, idle=lambda: None, max_pause: float = RECONNECT_MAX) -> None:
        """Connect, retrying with a backoff capped at *max_pause*; each failed attempt is logged.

        *idle* is called about once a second while waiting; *should_stop* is
        asked then too, and ends the wait with :class:`StopWaiting`. A broker
        that refuses the login is not waited for: :class:`BrokerError`.
        """
        self.close()
        connection = connection_for(self.settings)
        last_error = []

        def on_error(exc, interval):
            last_error[:] = [exc]
            log.warning(LOG_CONNECT_FAILED, _short(exc), interval)

        def on_tick():
            idle()
            if should_stop():
                reason = f": {_short(last_error[0])}" if last_error else ""
                raise StopWaiting(f"gave up waiting for the broker at {_where(connection)}{reason}")

        try:
            connection.ensure_connection(
                errback=on_error, max_retries=None, interval_start=RECONNECT_START,
                interval_step=RECONNECT_STEP, interval_max=min(max_pause, RECONNECT_MAX), callback=on_tick,
            )
        except amqp.exceptions.AccessRefused as exc:
            raise BrokerError(
                f"the broker at {_where(connection)} refused the login of user "
                f"{self.settings.user!r} on vhost {self.settings.virtual_host!r} (ACCESS_REFUSED): "
                "check [amqp] user and password"
            ) from exc
        self._opened(connection)

    def connect_once(self) -> None:
        """One attempt, for the command-line tools: BrokerError says why it failed."""
        self.close()
        connection = connection_for(self.settings)
        try:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=10)
        except amqp.exceptions.AccessRefused as exc:
            raise BrokerError(
                f"the broker at {_where(connection)} refused the login of user "
                f"{self.settings.user!r} (ACCESS_REFUSED)"
            ) from exc
        except Exception as exc:
            raise BrokerError(f"cannot reach the broker at {_where(connection)}: {_short(exc)}") from exc
        self._opened(connection)

    @_translated
    def _opened(self, connection):
        self._connection = connection
        self._channel = connection.channel()
        self._publisher.open(connection)
        log.info("connected to the broker at %s", _where(connection))

    def fileno(self) -> int:
        return self._connection.connection.sock.fileno()

    @_translated
    def declare(self, spec: QueueSpec, spare: bool = False) -> None:
        """Declare *spec* (and PyBit's exchange and the binding, if it has a routing key).

        :class:`~rbit.errors.QueueUnavailable` for a classic queue of a cluster node
        that is down. The refusal closes the channel: with *spare*, the declaration
        uses a channel of its own, leaving the consumers' alone; without, the
        channel is replaced (before anything consumes on it).
        """
        channel = self._connection.channel() if spare else self._channel
        try:
            _kombu_queue(spec)(channel).declare()
        except amqp.exceptions.NotFound as exc:
            if "home node" not in (exc.reply_text or ""):
                raise
            if not spare:
                self._channel = self._connection.channel()
                self._prefetch = None
            raise QueueUnavailable(exc.reply_text) from exc
        finally:
            if spare:
                _close_quietly(channel)

    @_translated
    def qos(self, prefetch: int) -> None:
        """Let the broker send at most *prefetch* unsettled messages: to the channel, or to each consumer.

        Shared (``global``), the limit counts the channel's unacknowledged
        messages across all its consumers, so the worker holds at most one
        message that has not become a running job, whatever number of queues
        it serves. Where the broker refuses that, each consumer gets its own
        limit, and the worker hands back at once a message that came beside
        the one it takes (see :mod:`rbit.worker`).
        """
        self._prefetch = prefetch
        if self.shared_prefetch:
            try:
                self._channel.basic_qos(prefetch_size=0, prefetch_count=prefetch, a_global=True)
                return
            except amqp.exceptions.AMQPError as exc:
                if not _refuses_global_qos(exc):
                    raise
                self._per_consumer(exc)
        self._channel.basic_qos(prefetch_size=0, prefetch_count=prefetch, a_global=False)

    def _per_consumer(self, exc):
        """The broker refused a shared prefetch: use per-consumer ones from now on, on a new connection."""
        self.shared_prefetch = False
        log.warning(LOG_PER_CONSUMER, getattr(exc, "reply_text", None) or exc)
        raise ConnectionLost(f"the broker refused a shared prefetch: {_short(exc)}") from exc

    @_translated
    def consume(self, key: str, specs, callback, no_ack: bool = False) -> None:
        """Consume the queues of *specs*, remembered under *key*; ``callback(queue_name, delivery)``.

        One kombu Consumer for them all, so one round trip: every
        ``basic.consume`` but the last goes without waiting for its reply.
        The last one waits for its ``consume_ok``, which the broker sends only
        once it has handled the channel's methods before it (it handles them in
        order): a refusal of any of them (a queue gone, a quorum queue refusing
        the shared prefetch) is raised here, where the caller handles it. A
        message of the first queues may arrive while that wait lasts: *callback*
        gets it then.
        """

        def on_message(message):
            settle = None if no_ack else functools.partial(_settle, message)
            callback(_queue_of(consumer, message), _delivery(message, settle))

        consumer = Consumer(self._channel, queues=[_kombu_queue(spec) for spec in specs], no_ack=no_ack,
                            auto_declare=False, on_message=on_message, tag_prefix=f"rbit.{key}.")
        self._consumers[key] = [consumer]
        try:
            consumer.consume()
        except Exception as exc:
            # The broker closed the channel (or the connection): none of these consumers is left.
            self._consumers.pop(key, None)
            _forget_consumer(consumer)
            if self.shared_prefetch and isinstance(exc, amqp.exceptions.AMQPError) and _refuses_global_qos(exc):
                self._per_consumer(exc)  # a quorum queue: RabbitMQ closes the connection
            raise

    @_translated
    def cancel(self, key: str, before_ack: bool = False) -> None:
        """Stop the consumers under *key*; the broker sends none of their messages after this.

        *before_ack*: the caller holds an unacknowledged message of these
        consumers and acknowledges it after this call. With a prefetch of 1
        shared by the channel's consumers, that message is the only one the
        broker may send them until the ack; the broker handles a channel's
        methods in order, so a ``basic.cancel`` sent before the ack is done
        before the ack frees the prefetch, and nothing can come for these
        consumers in between: the cancel goes without waiting for its reply.
        """
        for consumer in self._consumers.pop(key, ()):
            if before_ack and self.shared_prefetch and self._prefetch == 1:
                _cancel_unanswered(consumer)
            else:
                # Waits for each cancel_ok: a message may be on its way to one of these
                # consumers (with a prefetch per consumer, for quorum queues, one per
                # consumer; with a shared one, when the caller holds none). It arrives
                # during the wait, through rbit's callback, which hands it back with
                # basic.nack. Once the callback is gone, py-amqp would basic.reject it,
                # and RabbitMQ 4.3 counts a reject against a quorum queue's delivery limit.
                consumer.cancel()

    def consuming(self, key: str) -> bool:
        return key in self._consumers

    @_translated
    def publish(self, message: Outgoing, routing_key: str, exchange: str = "", mandatory: bool = False,
                meanwhile: Callable[[], None] | None = None) -> None:
        """Publish *message* and wait for the broker's confirm; *meanwhile*, if given, is called
        once the message is sent, while the broker confirms it (its first try only).

        A refused confirm is tried again on a fresh channel, and in the end fails as a lost
        connection; with *mandatory*, :class:`~rbit.errors.Unroutable` if the broker returns
        the message (see :meth:`.Publisher.publish`).
        """
        self._publisher.publish(message, routing_key, exchange, mandatory, meanwhile)

    @_translated
    def purge_nowait(self, queue_name: str) -> None:
        """Empty *queue_name* without waiting, on the publisher channel: unsure until the broker is
        known to have done it (see :meth:`.Publisher.purge_nowait`, for why it is safe)."""
        self._publisher.purge_nowait(queue_name)

    @_translated
    def purge(self, queue_name: str) -> None:
        """Empty *queue_name*, waiting for the broker's ``purge_ok``, on the publisher channel.

        The reply also shows done every purge sent before it on that channel.
        """
        self._publisher.purge(queue_name)

    def purge_later(self, queue_name: str) -> None:
        """Owe a purge of *queue_name*, sending nothing now: :meth:`confirm_purges` does it."""
        self._publisher.purge_later(queue_name)

    def confirm_purges(self) -> None:
        """Make sure the broker has done every purge not yet known done: each is done again, waiting.

        Doing one again is safe: a queue stays in :attr:`unsure_purges` only
        while nothing that must stay has been published to it (the confirm of
        such a copy would have shown the purge done). The first ``purge_ok``
        shows done every purge sent before it on this connection.
        """
        while self.unsure_purges:
            self.purge(min(self.unsure_purges))

    @_translated
    def get(self, queue_name: str) -> Delivery | None:
        """One message from *queue_name* (settled by the caller), or None."""
        message = self._channel.basic_get(queue_name, no_ack=False)
        if message is None:
            return None
        return _delivery(message, functools.partial(_settle, message))

    @_translated
    def queue_info(self, queue_name: str) -> tuple[int, int]:
        """(message count, consumer count) of *queue_name*; :class:`QueueMissing` if it does not exist.

        A failed passive declare costs a channel, so this uses a spare one.
        """
        channel = self._connection.channel()
        try:
            ok = channel.queue_declare(queue_name, passive=True)
            return ok.message_count, ok.consumer_count
        finally:
            _close_quietly(channel)

    @_translated
    def claim(self, spec: QueueSpec) -> bool:
        """Declare the exclusive queue *spec* on a spare channel; False if another connection holds it."""
        channel = self._connection.channel()
        try:
            _kombu_queue(spec)(channel).declare()
            return True
        except amqp.exceptions.ResourceLocked:
            return False
        finally:
            _close_quietly(channel)

    @_translated
    def delete(self, queue_name: str) -> None:
        self._channel.queue_delete(queue_name)

    def exists(self, queue_name: str) -> bool:
        """True if *queue_name* exists."""
        try:
            self.queue_info(queue_name)
        except QueueMissing:
            return False
        return True

    @_translated
    def take(self, queue_name: str, limit: int) -> Batch:
        """Up to *limit* messages of *queue_name*, unsettled, on a spare channel.

        Ack what is done with; closing the batch puts the rest back, in their order.
        """
        channel = self._connection.channel()
        messages = []
        try:
            while len(messages) < limit:
                message = channel.basic_get(queue_name, no_ack=False)
                if message is None:
                    break
                tag = message.delivery_tag
                messages.append(_delivery(message, lambda ack, tag=tag: channel.basic_ack(tag) if ack else None))
        except amqp.exceptions.NotFound:
            _close_quietly(channel)
            raise
        return Batch(messages, channel)

    @_translated
    def drain(self) -> None:
        """Handle every frame the broker has sent so far, without blocking."""
        while True:
            try:
                self._connection.drain_events(timeout=0)
            except TimeoutError:
                return

    @_translated
    def heartbeat_check(self) -> None:
        self._connection.heartbeat_check()

    def close(self) -> None:
        """Drop the connection, quietly: it may be dead already.

        A purge sent on it and not yet shown done may or may not have been
        done: it is owed, for :meth:`confirm_purges` on the next connection.
        """
        self._publisher.close()
        self._consumers.clear()
        self._prefetch = None
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            try:
                connection.release()
            except Exception as exc:
                log.debug("closing the broker connection: %s", exc)


class StopWaiting(BrokerError):
    """Waiting for the broker ended because the worker was asked to stop."""
