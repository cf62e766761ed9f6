"""The broker side: PyBit's exchange and queues, rbit's own queues, confirmed publishing.

Queue names rbit adds beside PyBit's (``NAME`` is ``[rbit] name``):

``rbit.inprogress.NAME.SLOT``
    one durable queue per job slot, holding a copy of the message whose job
    runs in that slot (see :mod:`rbit.worker` for why);
``rbit.delay.QUEUE.MSms``
    a durable queue without consumers whose messages expire after the blocked
    delay and are dead-lettered straight back to QUEUE;
``[rbit] rejected_queue``
    durable; messages that are not valid build requests, unchanged, with
    headers saying why and where they came from;
``NAME``
    exclusive and auto-delete, bound to ``pybit`` with the key NAME, like
    PyBit's reference client: cancel requests arrive here. Being exclusive,
    it also stops two workers with the same name from running at once.
"""

import functools
import logging
import ssl
from urllib.parse import quote

import amqp
from kombu import Connection, Consumer, Exchange, Queue

from .errors import BrokerError, NameInUse

log = logging.getLogger(__name__)

#: PyBit's exchange, declared exactly as PyBit declares it.
PYBIT_EXCHANGE = Exchange("pybit", type="direct", durable=True, auto_delete=False)

#: Header naming the queue a message came from (on in-progress, rejected and recovered copies).
HEADER_QUEUE = "x-rbit-queue"
#: Header saying why a message was rejected.
HEADER_REASON = "x-rbit-reason"
#: Header on a message put back after its worker stopped or died mid-job; its
#: value is that worker's name (PyBit's history may show that name building it).
HEADER_RECOVERED = "x-rbit-recovered"

#: Reconnection backoff: first wait, step and cap, in seconds.
RECONNECT_START, RECONNECT_STEP, RECONNECT_MAX = 1.0, 2.0, 30.0

LOG_CONNECT_FAILED = "cannot reach the broker (%s); next attempt in %.0f s"


def build_queue(name, routing_key):
    """A PyBit build queue, declared exactly as PyBit declares it."""
    return Queue(
        name,
        PYBIT_EXCHANGE,
        routing_key=routing_key,
        durable=True,
        exclusive=False,
        auto_delete=False,
    )


def in_progress_name(worker_name, slot):
    return f"rbit.inprogress.{worker_name}.{slot}"


def in_progress_queue(worker_name, slot):
    return Queue(in_progress_name(worker_name, slot), durable=True, auto_delete=False)


def delay_queue(queue, delay):
    """The queue that holds a Blocked message of *queue* for *delay* seconds, then returns it."""
    ms = max(1, int(round(delay * 1000)))
    return Queue(
        f"rbit.delay.{queue}.{ms}ms",
        durable=True,
        auto_delete=False,
        queue_arguments={
            "x-message-ttl": ms,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue,
        },
    )


def rejected_queue(name):
    return Queue(name, durable=True, auto_delete=False)


def cancel_queue(worker_name):
    return Queue(
        worker_name,
        PYBIT_EXCHANGE,
        routing_key=worker_name,
        durable=False,
        exclusive=True,
        auto_delete=True,
    )


def connection_for(settings):
    """A kombu Connection (not yet connected) to every host of ``[amqp]``, for failover."""
    credentials = f"{quote(settings.user, safe='')}:{quote(settings.password, safe='')}@"
    vhost = quote(settings.virtual_host, safe="")
    urls = [f"amqp://{credentials}{host}:{settings.port}/{vhost}" for host in settings.hosts]
    ssl_options = False
    if settings.ssl:
        ssl_options = {"cert_reqs": ssl.CERT_REQUIRED if settings.verify else ssl.CERT_NONE}
        if settings.ca_file:
            ssl_options["ca_certs"] = settings.ca_file
        if settings.cert_file:
            ssl_options["certfile"] = settings.cert_file
        if settings.key_file:
            ssl_options["keyfile"] = settings.key_file
        if settings.verify and len(settings.hosts) == 1:
            # The name is checked against the certificate. kombu keeps one set
            # of TLS options for all failover hosts, so with several hosts only
            # the certificate chain is verified (the README says so).
            ssl_options["server_hostname"] = settings.hosts[0]
    return Connection(
        urls,
        heartbeat=settings.heartbeat or None,
        ssl=ssl_options,
        connect_timeout=5,
        failover_strategy="round-robin",
        transport_options={"confirm_publish": True},
    )


def describe(connection):
    """Host and port of *connection*, never its credentials."""
    return f"{connection.hostname}:{connection.port}"


def copy_message(message, extra_headers=None, drop=()):
    """A persistent amqp message with *message*'s body and properties, plus
    *extra_headers*, less the headers named in *drop*."""
    properties = dict(message.properties)
    headers = dict(properties.pop("application_headers", None) or {})
    headers.update(extra_headers or {})
    for name in drop:
        headers.pop(name, None)
    properties["delivery_mode"] = 2
    return amqp.Message(message.body, application_headers=headers, **properties)


class Broker:
    """One connection to the broker and the channel the worker uses on it.

    Nothing is sent before :meth:`connect`. The errors that mean "reconnect"
    are in :attr:`errors` once connected.
    """

    def __init__(self, settings):
        self.settings = settings
        self.connection = None
        self.channel = None
        self.consumers = {}

    @property
    def errors(self):
        """The library's exceptions that a reconnection cures."""
        conn = self.connection or connection_for(self.settings)
        return tuple(conn.connection_errors) + tuple(conn.channel_errors) + (OSError,)

    @property
    def connected(self):
        return self.channel is not None

    def connect(self, should_stop=lambda: False, idle=lambda: None):
        """Connect, retrying with a capped backoff; each failed attempt is logged.

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
                raise StopWaiting(f"gave up waiting for the broker at {describe(connection)}{reason}")

        try:
            connection.ensure_connection(
                errback=on_error,
                max_retries=None,
                interval_start=RECONNECT_START,
                interval_step=RECONNECT_STEP,
                interval_max=RECONNECT_MAX,
                callback=on_tick,
            )
        except amqp.exceptions.AccessRefused as exc:
            raise BrokerError(
                f"the broker at {describe(connection)} refused the login of user "
                f"{self.settings.user!r} on vhost {self.settings.virtual_host!r} (ACCESS_REFUSED): "
                "check [amqp] user and password"
            ) from exc
        self._opened(connection)

    def connect_once(self):
        """One attempt, for the command-line tools: BrokerError says why it failed."""
        self.close()
        connection = connection_for(self.settings)
        try:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=10)
        except amqp.exceptions.AccessRefused as exc:
            raise BrokerError(
                f"the broker at {describe(connection)} refused the login of user "
                f"{self.settings.user!r} (ACCESS_REFUSED)"
            ) from exc
        except Exception as exc:
            raise BrokerError(f"cannot reach the broker at {describe(connection)}: {_short(exc)}") from exc
        self._opened(connection)

    def _opened(self, connection):
        self.connection = connection
        self.channel = connection.channel()
        log.info("connected to the broker at %s", describe(connection))

    def fileno(self):
        return self.connection.connection.sock.fileno()

    def declare(self, worker_name, runner_sections, blocked_delay, rejected, slots):
        """Declare everything the worker uses; claim the worker's name first."""
        try:
            cancel_queue(worker_name)(self.channel).declare()
        except amqp.exceptions.ResourceLocked as exc:
            raise NameInUse(
                f"another worker named {worker_name!r} is connected to this broker"
            ) from exc
        try:
            for section in runner_sections:
                build_queue(section.queue, section.routing_key)(self.channel).declare()
                delay_queue(section.queue, blocked_delay)(self.channel).declare()
            rejected_queue(rejected)(self.channel).declare()
            for slot in range(slots):
                in_progress_queue(worker_name, slot)(self.channel).declare()
        except amqp.exceptions.PreconditionFailed as exc:
            raise BrokerError(f"the broker refused a queue declaration: {exc.reply_text}") from exc

    def qos(self, prefetch):
        # global=True: the limit counts the channel's unacknowledged messages
        # across all its consumers, so the worker holds at most one message
        # that has not become a running job, whatever number of queues it serves.
        self.channel.basic_qos(prefetch_size=0, prefetch_count=prefetch, a_global=True)

    def consume(self, key, queues, callback, no_ack=False):
        """Consume *queues* (kombu Queues), remembered under *key*; ``callback(queue_name, message)``."""
        consumers = [
            Consumer(
                self.channel,
                queues=[queue],
                on_message=functools.partial(callback, queue.name),
                no_ack=no_ack,
                auto_declare=False,
            )
            for queue in queues
        ]
        for consumer in consumers:
            consumer.consume()
        self.consumers[key] = consumers

    def cancel(self, key):
        """Stop the consumers under *key*; the broker sends none of their messages after this."""
        for consumer in self.consumers.pop(key, ()):
            consumer.cancel()

    def consuming(self, key):
        return key in self.consumers

    def publish(self, message, routing_key, exchange=""):
        """Publish an ``amqp.Message`` and wait for the broker's confirm."""
        self.channel.basic_publish(message, exchange=exchange, routing_key=routing_key)

    def purge(self, queue_name):
        self.channel.queue_purge(queue_name)

    def get(self, queue_name):
        """One message from *queue_name* (to be acked by the caller), or None."""
        return self.channel.basic_get(queue_name, no_ack=False)

    def queue_info(self, queue_name):
        """(message count, consumer count) of *queue_name*; NotFound if it does not exist.

        A failed passive declare costs a channel, so this uses a spare one.
        """
        channel = self.connection.channel()
        try:
            ok = channel.queue_declare(queue_name, passive=True)
            return ok.message_count, ok.consumer_count
        finally:
            _close_quietly(channel)

    def exists(self, queue_name):
        """True if *queue_name* exists."""
        try:
            self.queue_info(queue_name)
        except amqp.exceptions.NotFound:
            return False
        return True

    def take(self, queue_name, limit):
        """Up to *limit* messages of *queue_name*, unacknowledged, on a spare channel.

        Returns (channel, messages): ack on that channel what is done with;
        closing it puts the rest back, in their order.
        """
        channel = self.connection.channel()
        messages = []
        while len(messages) < limit:
            message = channel.basic_get(queue_name, no_ack=False)
            if message is None:
                break
            messages.append(message)
        return channel, messages

    def drain(self):
        """Handle every frame the broker has sent so far, without blocking."""
        while True:
            try:
                self.connection.drain_events(timeout=0)
            except TimeoutError:
                return

    def heartbeat_check(self):
        self.connection.heartbeat_check()

    def close(self):
        """Drop the connection, quietly: it may be dead already."""
        self.consumers.clear()
        connection, self.connection, self.channel = self.connection, None, None
        if connection is not None:
            try:
                connection.release()
            except Exception as exc:
                log.debug("closing the broker connection: %s", exc)


class StopWaiting(BrokerError):
    """Waiting for the broker ended because the worker was asked to stop."""


def _close_quietly(channel):
    try:
        channel.close()
    except Exception:  # the broker may have closed it already (after NotFound, say)
        pass


def _short(exc):
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
