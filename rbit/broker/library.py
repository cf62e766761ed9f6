"""The library side of the broker boundary: kombu connections and queues, amqp messages and errors.

Everything here turns kombu's and amqp's objects into rbit's (:class:`~rbit.delivery.Delivery`,
:class:`Batch`, :class:`~rbit.queues.QueueSpec`, :class:`~rbit.errors.BrokerError`) or back.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
from urllib.parse import quote

import amqp
import kombu.exceptions
from kombu import Connection, Exchange, Queue

from ..delivery import Delivery, Outgoing
from ..errors import BrokerError, ConnectionLost, QueueLocked, QueueMismatch, QueueMissing
from ..queues import PYBIT_EXCHANGE, QueueSpec

#: PyBit's exchange, declared exactly as PyBit declares it.
_EXCHANGE = Exchange(PYBIT_EXCHANGE, type="direct", durable=True, auto_delete=False)

#: The library's errors that a new connection cures (a refused publisher confirm among them).
_LIBRARY_ERRORS = (amqp.exceptions.AMQPError, amqp.exceptions.MessageNacked,
                   kombu.exceptions.KombuError, OSError)


@contextlib.contextmanager
def _as_rbit_errors():
    """Let the library's errors leave as rbit's own."""
    try:
        yield
    except BrokerError:
        raise
    except amqp.exceptions.NotFound as exc:
        raise QueueMissing(getattr(exc, "reply_text", None) or str(exc)) from exc
    except amqp.exceptions.ResourceLocked as exc:
        raise QueueLocked(getattr(exc, "reply_text", None) or str(exc)) from exc
    except amqp.exceptions.PreconditionFailed as exc:
        raise QueueMismatch(f"the broker refused a queue declaration: {exc.reply_text}") from exc
    except _LIBRARY_ERRORS as exc:
        raise ConnectionLost(_short(exc)) from exc


def _translated(method):
    """A Broker method whose library errors leave as rbit's own."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _as_rbit_errors():
            return method(self, *args, **kwargs)

    return wrapper


def connection_for(settings) -> Connection:
    """A kombu Connection (not yet connected) to every host of ``[amqp]``, for failover."""
    credentials = f"{quote(settings.user, safe='')}:{quote(settings.password, safe='')}@"
    vhost = quote(settings.virtual_host, safe="")
    # str(address) is HOST:PORT, an IPv6 address in brackets: each node with its own port.
    urls = [f"amqp://{credentials}{address}/{vhost}" for address in settings.addresses]
    ssl_options = False
    if settings.ssl:
        ssl_options = {"cert_reqs": ssl.CERT_REQUIRED if settings.verify else ssl.CERT_NONE}
        if settings.ca_file:
            ssl_options["ca_certs"] = settings.ca_file
        if settings.cert_file:
            ssl_options["certfile"] = settings.cert_file
        if settings.key_file:
            ssl_options["keyfile"] = settings.key_file
        if settings.verify and len(settings.addresses) == 1:
            # The name is checked against the certificate. kombu keeps one set
            # of TLS options for all failover hosts, so with several hosts only
            # the certificate chain is verified (the README says so).
            ssl_options["server_hostname"] = settings.addresses[0].host
    return Connection(
        urls,
        heartbeat=settings.heartbeat or None,
        ssl=ssl_options,
        connect_timeout=5,
        failover_strategy="round-robin",
        transport_options={"confirm_publish": True},
    )


def _kombu_queue(spec: QueueSpec) -> Queue:
    return Queue(
        spec.name,
        _EXCHANGE if spec.routing_key is not None else None,
        routing_key=spec.routing_key,
        durable=spec.durable,
        exclusive=spec.exclusive,
        auto_delete=spec.auto_delete,
        queue_arguments=dict(spec.arguments) or None,
    )


def _delivery(message, settle) -> Delivery:
    if settle is not None:
        settle = _settled_as_rbit(settle)
    properties = dict(message.properties)
    headers = dict(properties.pop("application_headers", None) or {})
    return Delivery(message.body, headers, properties,
                    bool(message.delivery_info.get("redelivered")), settle)


def _settled_as_rbit(settle):
    """*settle* (an ack or a requeue) with the library's errors translated, like every Broker call."""

    def settled(ack):
        with _as_rbit_errors():
            settle(ack)

    return settled


def _amqp_message(outgoing: Outgoing) -> amqp.Message:
    properties = {**outgoing.properties, "delivery_mode": 2}
    return amqp.Message(outgoing.body, application_headers=dict(outgoing.headers), **properties)


def _publish_confirmed(channel, message: amqp.Message, exchange: str, routing_key: str, mandatory: bool,
                       meanwhile=None) -> None:
    """``basic.publish`` on *channel* (in confirm mode), then wait for the broker's ``basic.ack``;
    :class:`amqp.exceptions.MessageNacked` on ``basic.nack``. *meanwhile* is called between the two.

    py-amqp's ``basic_publish_confirm`` waits for the reply as a one-shot, which a reply read
    before the wait (by a wait of *meanwhile*'s, on another channel) would miss; listeners set
    before the publish catch it here wherever it is read, and only one publish waits for its
    confirm on the channel at a time, so the next reply is this one's. It is waited for even
    if *meanwhile* raises: left unread, it would be taken for the next publish's.
    """
    if meanwhile is None:
        channel.basic_publish(message, exchange=exchange, routing_key=routing_key, mandatory=mandatory)
        return
    replies = []
    acked, nacked = (lambda *_: replies.append(True)), (lambda *_: replies.append(False))
    channel.events["basic_ack"].add(acked)
    channel.events["basic_nack"].add(nacked)
    try:
        if not channel._confirm_selected:  # py-amqp selects confirm mode at a channel's first publish
            channel._confirm_selected = True
            channel.confirm_select()
        channel._basic_publish(message, exchange=exchange, routing_key=routing_key, mandatory=mandatory)
        try:
            meanwhile()
        finally:
            if not replies:  # not read meanwhile: wait for it, as py-amqp does
                channel.wait([amqp.spec.Basic.Ack, amqp.spec.Basic.Nack])
    finally:
        channel.events["basic_ack"].discard(acked)
        channel.events["basic_nack"].discard(nacked)
    if not replies[0]:
        raise amqp.exceptions.MessageNacked()


def _where(connection):
    """Host and port of *connection* (an IPv6 address in brackets), never its credentials."""
    host = connection.hostname
    return f"[{host}]:{connection.port}" if ":" in host else f"{host}:{connection.port}"


def _settle(message, ack: bool) -> None:
    """Acknowledge *message*, or hand it back to its queue with ``basic.nack`` (requeue).

    A nack, not a reject: RabbitMQ 4.3 and later count a rejected message's
    delivery against a quorum queue's delivery limit (20 by default), and
    drop it at the limit; a nacked one is not counted, as the message did not
    fail, the worker just did not take it.
    """
    if ack:
        message.channel.basic_ack(message.delivery_tag)
    else:
        message.channel.send_method(amqp.spec.Basic.Nack, "Lbb", (message.delivery_tag, False, True))


def _refuses_global_qos(exc) -> bool:
    """True if *exc* is the broker refusing a shared (global) prefetch.

    RabbitMQ 3.x refuses to consume a quorum queue on a channel with one
    (540 NOT_IMPLEMENTED "... does not support global qos"); 4.3 refuses
    ``basic.qos`` itself (the deprecated feature ``global_qos``).
    """
    text = (getattr(exc, "reply_text", None) or str(exc)).lower()
    return "global qos" in text or "global_qos" in text


def _queue_of(consumer, message) -> str:
    """The name of the queue that *message* came from, among those *consumer* consumes.

    kombu records each queue's consumer tag; a delivery names its tag.
    """
    tag = message.delivery_info["consumer_tag"]
    return next(name for name, active in consumer._active_tags.items() if active == tag)


def _cancel_unanswered(consumer) -> None:
    """``basic.cancel`` every queue *consumer* consumes without waiting for ``cancel_ok``, and forget them.

    py-amqp drops a consumer's callbacks only when its ``cancel_ok`` comes,
    which a cancel sent with ``nowait`` never gets: without this, each cancel
    would leave one callback per queue on the channel for as long as it is
    open. kombu's record of the active tags is emptied as its own cancel()
    empties it.
    """
    channel = consumer.channel
    for tag in consumer._active_tags.values():
        channel.basic_cancel(tag, nowait=True)  # also drops it from channel.no_ack_consumers
        _forget_tag(channel, tag)
    consumer._active_tags.clear()
    getattr(consumer, "_active_queue_no_ack", {}).clear()  # kombu 5.5 and later


def _forget_consumer(consumer) -> None:
    """Drop *consumer*'s callbacks from its channel, which no longer has its consumers (closed by the broker)."""
    for tag in consumer._active_tags.values():
        _forget_tag(consumer.channel, tag)


def _forget_tag(channel, tag) -> None:
    """What py-amqp forgets of a consumer at its ``cancel_ok``."""
    channel.callbacks.pop(tag, None)
    channel.cancel_callbacks.pop(tag, None)
    channel.no_ack_consumers.discard(tag)


class Batch:
    """Messages taken by :meth:`~rbit.broker.Broker.take`; closing it returns the unacknowledged ones."""

    def __init__(self, messages, channel):
        self.messages = messages
        self._channel = channel

    def close(self):
        _close_quietly(self._channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _close_quietly(channel):
    try:
        channel.close()
    except Exception:  # the broker may have closed it already (after NotFound, say)
        pass


def _short(exc):
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
