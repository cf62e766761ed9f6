"""An in-memory broker with the interface of :class:`rbit.broker.Broker`, to drive the worker's loop in tests.

A :class:`MemoryServer` holds the queues, PyBit's direct exchange and its
bindings; each :class:`MemoryBroker` is one connection (with one channel) to
it, so two workers can share a server. It behaves as RabbitMQ does where the
worker depends on it:

- the server pushes a message to a consumer as soon as the channel's prefetch
  allows (``qos(n)`` counts the channel's unacknowledged deliveries across
  all its consumers); the worker's callback sees it in :meth:`~MemoryBroker.drain`,
  and :meth:`~MemoryBroker.fileno` is readable while one waits there;
- a message requeued, or unacknowledged when its connection ends, goes back
  to the head of its queue, marked redelivered; one that arrives for a
  consumer just cancelled is requeued (as py-amqp does), and
  ``cancel(key, before_ack=True)``, which the real broker sends without
  waiting, fails the test if such a message exists;
- an exclusive queue belongs to the connection that declared it
  (:class:`~rbit.errors.QueueLocked` for any other) and goes with it;
- unknown queues are :class:`~rbit.errors.QueueMissing`; str bodies are
  stored as UTF-8 with ``content_encoding`` set, as py-amqp sends them;
- a purge sent without waiting is done at once, and, as for
  :class:`rbit.broker.Broker`, stays in ``unsure_purges`` until a later
  publish is confirmed or a waiting purge answers (or, owed, after the
  connection ends).

What a test adds: :meth:`MemoryBroker.fail` drops a connection (every later
call raises :class:`~rbit.errors.ConnectionLost` until ``connect()``),
:meth:`MemoryBroker.drop_after` drops it just after a given call (for
``purge_nowait``, with the purge on its way: the server never does it),
:meth:`MemoryBroker.refuse` makes connection attempts fail, and
:meth:`MemoryServer.expire` dead-letters a queue's messages as their
``x-message-ttl`` would. Nothing here waits for time to pass.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from rbit.broker import Broker, StopWaiting
from rbit.delivery import Delivery, Outgoing
from rbit.errors import BrokerError, ConnectionLost, QueueLocked, QueueMissing, Unroutable
from rbit.queues import PYBIT_EXCHANGE, QueueSpec

log = logging.getLogger(__name__)

#: Pause between two refused connection attempts (the real broker backs off for seconds).
REFUSED_PAUSE = 0.005

#: Longest :meth:`MemoryBroker.refuse` keeps refusing on a condition: a stuck test fails instead of hanging.
REFUSE_LIMIT = 10.0


@dataclass
class _Queue:
    spec: QueueSpec
    ready: deque = field(default_factory=deque)
    consumers: list = field(default_factory=list)
    #: The connection that owns an exclusive queue.
    owner: MemoryBroker | None = None
    had_consumer: bool = False

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(eq=False)
class _Consumer:
    broker: MemoryBroker
    key: str
    queue: str
    callback: Callable
    no_ack: bool


@dataclass
class _Unacked:
    queue: str
    message: Delivery
    #: True for a consumer's delivery (counted against the prefetch); False for get() and take().
    counted: bool


class MemoryServer:
    """The broker's side: queues, PyBit's exchange and its bindings, shared by any number of connections."""

    def __init__(self):
        self.queues: dict[str, _Queue] = {}
        #: PyBit's exchange, once a queue bound to it is declared: routing key -> queue names.
        self.bindings: dict[str, list[str]] | None = None
        #: Connections now open.
        self.brokers: list[MemoryBroker] = []
        self._made: list[MemoryBroker] = []

    # -- What a test looks at ------------------------------------------------

    def messages(self, queue: str) -> list[Delivery]:
        """The messages ready on *queue*, head first (not those delivered and unacknowledged)."""
        return list(self._queue(queue).ready)

    def depth(self, queue: str) -> int:
        """How many messages are ready on *queue*."""
        return len(self._queue(queue).ready)

    def unacked(self, queue: str | None = None) -> list[Delivery]:
        """Messages delivered (to any connection) and not yet settled, from *queue* or any queue."""
        return [entry.message for broker in self.brokers for _, entry in sorted(broker._unacked.items())
                if queue is None or entry.queue == queue]

    def exists(self, queue: str) -> bool:
        return queue in self.queues

    def consumers(self, queue: str) -> int:
        return len(self._queue(queue).consumers)

    # -- What a test does --------------------------------------------------------

    def publish(self, body, routing_key: str, exchange: str = PYBIT_EXCHANGE, headers=None, properties=None) -> None:
        """Publish as another client would (PyBit's controller: to ``pybit``, no content type)."""
        self._publish(Outgoing(body, dict(headers or {}), dict(properties or {})), exchange, routing_key)

    def expire(self, queue: str) -> int:
        """Every message on *queue* reaches its ``x-message-ttl`` now: dead-letter them as RabbitMQ does.

        They go to the queue's ``x-dead-letter-exchange`` with its
        ``x-dead-letter-routing-key``, with an ``x-death`` header; returns how many.
        """
        source = self._queue(queue)
        arguments = source.spec.arguments
        if "x-message-ttl" not in arguments:
            raise AssertionError(f"{queue} has no x-message-ttl")
        exchange = arguments.get("x-dead-letter-exchange")
        count = 0
        while source.ready:
            message = source.ready.popleft()
            count += 1
            if exchange is None:
                continue
            routing_key = arguments.get("x-dead-letter-routing-key", "")
            headers = dict(message.headers)
            deaths = [dict(d) for d in headers.get("x-death", [])]
            for death in deaths:
                if death.get("queue") == queue and death.get("reason") == "expired":
                    death["count"] += 1
                    break
            else:
                deaths.insert(0, {"count": 1, "reason": "expired", "queue": queue,
                                  "exchange": "", "routing-keys": [queue]})
            headers["x-death"] = deaths
            for target in self._route(exchange, routing_key):
                target.ready.append(Delivery(message.body, dict(headers), dict(message.properties)))
        self._dispatch()
        return count

    def fail(self) -> None:
        """Drop every connection (a broker restart, as the connections see it)."""
        for broker in list(self.brokers):
            broker.fail()

    def close(self) -> None:
        """Release every connection's wake-up pipe (at the end of a test)."""
        for broker in list(self._made):
            broker.dispose()

    # -- The broker's own work ------------------------------------------------

    def _register(self, broker: MemoryBroker) -> None:
        self._made.append(broker)

    def _queue(self, name: str) -> _Queue:
        try:
            return self.queues[name]
        except KeyError:
            raise QueueMissing(f"NOT_FOUND - no queue '{name}' in vhost 'memory'") from None

    def _route(self, exchange: str, routing_key: str) -> list[_Queue]:
        if exchange == "":
            queue = self.queues.get(routing_key)
            return [queue] if queue is not None else []
        if exchange != PYBIT_EXCHANGE or self.bindings is None:
            raise QueueMissing(f"NOT_FOUND - no exchange '{exchange}' in vhost 'memory'")
        return [self.queues[name] for name in self.bindings.get(routing_key, ()) if name in self.queues]

    def _publish(self, outgoing: Outgoing, exchange: str, routing_key: str, mandatory: bool = False) -> None:
        body, properties = outgoing.body, {**outgoing.properties, "delivery_mode": 2}
        if isinstance(body, str):
            body = body.encode(properties.setdefault("content_encoding", "utf-8"))
        targets = self._route(exchange, routing_key)
        if not targets and mandatory:
            raise Unroutable(f"no queue is bound to {exchange!r} with the key {routing_key!r}")
        for queue in targets:
            queue.ready.append(Delivery(body, dict(outgoing.headers), dict(properties)))
        self._dispatch()

    def _declare(self, spec: QueueSpec, broker: MemoryBroker) -> None:
        queue = self.queues.get(spec.name)
        if queue is not None:
            if queue.owner is not None and queue.owner is not broker:
                raise QueueLocked(f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{spec.name}'")
            old = queue.spec
            if (old.durable, old.auto_delete, old.arguments) != (spec.durable, spec.auto_delete, spec.arguments):
                raise BrokerError(f"the broker refused a queue declaration: PRECONDITION_FAILED - "
                                  f"inequivalent arguments for queue '{spec.name}'")
        else:
            queue = self.queues[spec.name] = _Queue(spec, owner=broker if spec.exclusive else None)
        if spec.routing_key is not None:
            if self.bindings is None:
                self.bindings = {}
            bound = self.bindings.setdefault(spec.routing_key, [])
            if spec.name not in bound:
                bound.append(spec.name)

    def _delete(self, name: str) -> None:
        queue = self.queues.pop(name, None)
        if queue is None:
            return
        for consumer in queue.consumers:
            consumer.broker._forget(consumer)
        for bound in (self.bindings or {}).values():
            if name in bound:
                bound.remove(name)

    def _remove_consumer(self, consumer: _Consumer) -> None:
        queue = self.queues.get(consumer.queue)
        if queue is None or consumer not in queue.consumers:
            return
        queue.consumers.remove(consumer)
        if queue.spec.auto_delete and queue.had_consumer and not queue.consumers:
            self._delete(queue.name)

    def _requeue(self, entries) -> None:
        """Put *entries* (oldest first) back at the head of their queues, redelivered."""
        for entry in reversed(list(entries)):
            queue = self.queues.get(entry.queue)
            if queue is not None:
                queue.ready.appendleft(dataclasses.replace(entry.message, redelivered=True))

    def _dispatch(self) -> None:
        """Push ready messages to consumers whose channel has room, round-robin, as RabbitMQ does."""
        moved = True
        while moved:
            moved = False
            for queue in list(self.queues.values()):
                while queue.ready:
                    for index, consumer in enumerate(queue.consumers):
                        if consumer.no_ack or consumer.broker._room():
                            queue.consumers.append(queue.consumers.pop(index))
                            consumer.broker._push(consumer, queue.ready.popleft())
                            moved = True
                            break
                    else:
                        break


class MemoryBroker:
    """One connection to a :class:`MemoryServer`, with the public interface of :class:`rbit.broker.Broker`."""

    def __init__(self, server: MemoryServer, name: str = "memory"):
        self.server = server
        self.name = name
        self._open = False
        self._failed = False
        self._generation = 0
        self._prefetch = 0
        self._consumers: dict[str, list[_Consumer]] = {}
        self._unacked: dict[int, _Unacked] = {}
        self._inbox: deque = deque()
        self._tags = itertools.count(1)
        self._refusals = 0
        self._refuse_while: Callable[[], bool] | None = None
        self._drop_after: tuple | None = None
        #: As rbit.broker.Broker's: sent and not yet shown done; owed, to be done again waiting.
        self._purges_sent: set[str] = set()
        self._purges_owed: set[str] = set()
        #: How many times connect() succeeded.
        self.connections = 0
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        server._register(self)

    # -- What a test does --------------------------------------------------------

    def fail(self) -> None:
        """The connection drops: calls raise ConnectionLost until connect(); its unacked messages go back."""
        if not self._open or self._failed:
            return
        log.info("memory broker %s: connection dropped", self.name)
        self._failed = True
        self._drop()
        self._signal()  # a dead socket is readable: the worker's selector wakes

    def refuse(self, times: int = 0, *, until: Callable[[], bool] | None = None) -> None:
        """Let the next *times* connection attempts fail, or every attempt until *until()* is true."""
        self._refusals = times
        self._refuse_while = None if until is None else (lambda: not until())

    def drop_after(self, method: str, when: Callable[..., bool] = lambda *args: True, answered: bool = False) -> None:
        """Drop the connection once, right after the server has done the next *method* call whose
        arguments satisfy *when*: with *answered*, the call returns and the next one fails; without,
        its answer is lost too (for ``publish``, a lost publisher confirm) and it raises ConnectionLost.
        """
        self._drop_after = (method, when, answered)

    def dispose(self) -> None:
        """Close the connection and the wake-up pipe."""
        self.close()
        if self._read is not None:
            os.close(self._read)
            os.close(self._write)
            self._read = self._write = None

    # -- rbit.broker.Broker's interface -------------------------------------------

    @property
    def connected(self) -> bool:
        # As with the real broker, a dropped connection still looks connected
        # until a call finds out (ConnectionLost) and the caller closes it.
        return self._open

    @property
    def address(self) -> str:
        return f"memory:{self.name}"

    @property
    def unsure_purges(self) -> frozenset[str]:
        return frozenset(self._purges_sent | self._purges_owed)

    def connect(self, should_stop=lambda: False, idle=lambda: None, max_pause: float = 30.0) -> None:
        self.close()
        deadline = time.monotonic() + REFUSE_LIMIT
        while self._refusals or (self._refuse_while is not None and self._refuse_while()):
            if time.monotonic() > deadline:
                raise AssertionError("MemoryBroker.refuse: the condition never came true")
            self._refusals = max(0, self._refusals - 1)
            log.warning("cannot reach the broker (%s refused the connection); next attempt soon", self.address)
            idle()
            if should_stop():
                raise StopWaiting(f"gave up waiting for the broker at {self.address}")
            time.sleep(REFUSED_PAUSE)
        self._refuse_while = None
        self._open, self._failed, self._prefetch = True, False, 0
        self._generation += 1
        self.connections += 1
        self.server.brokers.append(self)
        log.info("connected to the broker at %s", self.address)

    def fileno(self) -> int:
        return self._read

    def declare(self, spec: QueueSpec, spare: bool = False) -> None:
        self._check()
        self.server._declare(spec, self)

    def qos(self, prefetch: int) -> None:
        self._check()
        self._prefetch = prefetch
        self.server._dispatch()

    def consume(self, key: str, specs, callback, no_ack: bool = False) -> None:
        self._check()
        queues = [self.server._queue(spec.name) for spec in specs]
        for queue in queues:
            self._check_owner(queue)
        consumers = [_Consumer(self, key, queue.name, callback, no_ack) for queue in queues]
        for consumer, queue in zip(consumers, queues):
            queue.consumers.append(consumer)
            queue.had_consumer = True
        self._consumers[key] = consumers
        self.server._dispatch()

    def cancel(self, key: str, before_ack: bool = False) -> None:
        self._check()
        consumers = self._consumers.pop(key, [])
        # Deliveries already on their way to a cancelled consumer find no
        # callback: py-amqp rejects them with requeue.
        kept, late = deque(), []
        for item in self._inbox:
            (late if item[0] in consumers else kept).append(item)
        if before_ack and late:
            # The real broker cancels without waiting then, trusting the prefetch
            # to let nothing else out: a delivery on its way breaks that promise.
            raise AssertionError(f"cancel(before_ack=True) with {len(late)} delivery(ies) on their way")
        self._inbox = kept
        self.server._requeue([self._unacked.pop(tag) for _, tag, _ in late if tag in self._unacked])
        for consumer in consumers:
            self.server._remove_consumer(consumer)
        self.server._dispatch()

    def consuming(self, key: str) -> bool:
        return key in self._consumers

    def publish(self, message: Outgoing, routing_key: str, exchange: str = "", mandatory: bool = False,
                meanwhile=None) -> None:
        self._check()
        self.server._publish(message, exchange, routing_key, mandatory)
        if meanwhile is not None:  # sent, its confirm not yet read
            meanwhile()
        self._done("publish", message, routing_key, exchange, mandatory)
        self._purges_sent.clear()  # the confirm came: every purge sent before it is done

    def purge(self, queue_name: str) -> None:
        self._check()
        queue = self.server._queue(queue_name)
        self._check_owner(queue)
        queue.ready.clear()
        self._done("purge", queue_name)
        self._purges_sent.clear()
        self._purges_owed.discard(queue_name)

    def purge_nowait(self, queue_name: str) -> None:
        self._purges_sent.add(queue_name)
        self._check()
        queue = self.server._queue(queue_name)
        self._check_owner(queue)
        self._done("purge_nowait", queue_name)
        if not self._failed:  # unless the connection dropped with it on its way
            queue.ready.clear()

    def purge_later(self, queue_name: str) -> None:
        self._purges_owed.add(queue_name)

    confirm_purges = Broker.confirm_purges  # in terms of purge and unsure_purges, as the real one

    def get(self, queue_name: str) -> Delivery | None:
        self._check()
        queue = self.server._queue(queue_name)
        self._check_owner(queue)
        if not queue.ready:
            return None
        return self._hand_out(queue.name, queue.ready.popleft(), counted=False)[1]

    def queue_info(self, queue_name: str) -> tuple[int, int]:
        self._check()
        queue = self.server._queue(queue_name)
        self._check_owner(queue)
        return len(queue.ready), len(queue.consumers)

    def claim(self, spec: QueueSpec) -> bool:
        try:
            self.declare(spec)
        except QueueLocked:
            return False
        return True

    def delete(self, queue_name: str) -> None:
        self._check()
        self.server._delete(queue_name)

    exists = Broker.exists  # in terms of queue_info, as the real one

    def take(self, queue_name: str, limit: int) -> MemoryBatch:
        self._check()
        queue = self.server._queue(queue_name)
        self._check_owner(queue)
        taken = []
        while queue.ready and len(taken) < limit:
            taken.append(self._hand_out(queue.name, queue.ready.popleft(), counted=False, requeue=False))
        return MemoryBatch(self, [delivery for _, delivery in taken], [tag for tag, _ in taken])

    def drain(self) -> None:
        self._check()
        self._empty_pipe()
        while self._inbox:
            consumer, tag, message = self._inbox.popleft()
            if consumer.no_ack:
                delivery = Delivery(message.body, dict(message.headers), dict(message.properties),
                                    message.redelivered)
            else:
                delivery = self._delivery(tag, message)
            consumer.callback(consumer.queue, delivery)
            self._check()

    def heartbeat_check(self) -> None:
        self._check()

    def close(self) -> None:
        if self._open and not self._failed:
            self._drop()
        self._open = self._failed = False
        self._purges_owed |= self._purges_sent
        self._purges_sent.clear()
        self._empty_pipe()

    # -- The connection's own work --------------------------------------------------

    def _check(self) -> None:
        if not self._open:
            raise ConnectionLost("not connected")
        if self._failed:
            raise ConnectionLost("ConnectionResetError: the memory broker dropped the connection")

    def _done(self, method: str, *args) -> None:
        """The server has done *method*: drop the connection now if the test asked for it."""
        if self._drop_after is None or self._drop_after[0] != method or not self._drop_after[1](*args):
            return
        answered = self._drop_after[2]
        self._drop_after = None
        self.fail()
        if not answered:
            self._check()

    def _check_owner(self, queue: _Queue) -> None:
        if queue.owner is not None and queue.owner is not self:
            raise QueueLocked(f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{queue.name}'")

    def _room(self) -> bool:
        if not self._open or self._failed:
            return False
        counted = sum(1 for entry in self._unacked.values() if entry.counted)
        return self._prefetch == 0 or counted < self._prefetch

    def _push(self, consumer: _Consumer, message: Delivery) -> None:
        """The server sends *message* to *consumer*: it waits in drain(), unacknowledged."""
        tag = next(self._tags)
        if not consumer.no_ack:
            self._unacked[tag] = _Unacked(consumer.queue, message, counted=True)
        self._inbox.append((consumer, tag, message))
        self._signal()

    def _hand_out(self, queue: str, message: Delivery, counted: bool, requeue: bool = True) -> tuple[int, Delivery]:
        """*message* goes to this connection unacknowledged (get, take): (its tag, the delivery)."""
        tag = next(self._tags)
        self._unacked[tag] = _Unacked(queue, message, counted)
        return tag, self._delivery(tag, message, requeue)

    def _delivery(self, tag: int, message: Delivery, requeue: bool = True) -> Delivery:
        generation = self._generation

        def settle(ack: bool) -> None:
            self._check()
            if generation != self._generation or tag not in self._unacked:
                raise ConnectionLost(f"PRECONDITION_FAILED - unknown delivery tag {tag}")
            if ack:
                del self._unacked[tag]
            elif requeue:
                self.server._requeue([self._unacked.pop(tag)])
            else:
                return  # a taken message not acknowledged: it goes back when its batch closes
            self.server._dispatch()

        return Delivery(message.body, dict(message.headers), dict(message.properties), message.redelivered, settle)

    def _requeue_tags(self, tags) -> None:
        self.server._requeue([self._unacked.pop(tag) for tag in sorted(tags) if tag in self._unacked])
        self.server._dispatch()

    def _forget(self, consumer: _Consumer) -> None:
        """The server deleted the queue *consumer* consumed."""
        for consumers in self._consumers.values():
            if consumer in consumers:
                consumers.remove(consumer)

    def _drop(self) -> None:
        """The server's side of a connection that ends: what it held goes back, what it owned goes."""
        unacked, self._unacked = self._unacked, {}
        self._inbox.clear()
        for consumers in self._consumers.values():
            for consumer in consumers:
                self.server._remove_consumer(consumer)
        self._consumers.clear()
        for name, queue in list(self.server.queues.items()):
            if queue.owner is self:
                self.server._delete(name)
        if self in self.server.brokers:
            self.server.brokers.remove(self)
        self.server._requeue(entry for _, entry in sorted(unacked.items()))
        self.server._dispatch()

    def _signal(self) -> None:
        try:
            os.write(self._write, b"!")
        except (OSError, TypeError):  # full (it is readable anyway), or disposed
            pass

    def _empty_pipe(self) -> None:
        try:
            while os.read(self._read, 512):
                pass
        except (OSError, TypeError):  # empty, or disposed
            pass


class MemoryBatch:
    """Messages taken by :meth:`MemoryBroker.take`; closing it puts the unacknowledged ones back, in order."""

    def __init__(self, broker: MemoryBroker, messages: list[Delivery], tags: list[int]):
        self.messages = messages
        self._broker = broker
        self._tags = tags

    def close(self):
        self._broker._requeue_tags(self._tags)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
