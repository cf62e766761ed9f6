"""rbit's queues and headers on the broker: their names, and moving messages between them.

Beside PyBit's exchange and build queues, rbit keeps (``NAME`` is ``[rbit] name``):

``rbit.inprogress.NAME.SLOT``
    one durable queue per job slot, holding a copy of the message whose job
    runs in that slot, so that the original can be acknowledged at once (see
    :mod:`rbit.worker`);
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
``rbit.alive.NAME``, ``rbit.workers``, ``rbit.reclaim.NAME``
    the worker's latest announcement that it is alive (one message at most),
    the registry of every worker that announces itself, and the lock held
    while NAME's jobs are put back (see :mod:`rbit.reclaim`).

The first three are declared by ``[amqp] queue_type``. ``classic`` declares
them as rbit always has, with no queue type: they take the vhost's default.
``quorum`` makes them quorum queues, replicated over a cluster's nodes (see
:func:`owned`). The cancel queue is always a classic one: a quorum queue can be
neither exclusive nor auto-delete, and this one holds nothing that must
outlive its connection. Build queues are declared exactly as PyBit declares
them, with no arguments, so that a vhost whose default queue type is quorum
makes them quorum queues for PyBit and rbit alike.

Nothing else in rbit spells a queue name or a header.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from .errors import QueueMismatch, QueueUnavailable

if TYPE_CHECKING:
    from .broker import Broker
    from .delivery import Delivery

log = logging.getLogger(__name__)

#: PyBit's exchange (direct, durable, not auto-delete, as PyBit declares it).
PYBIT_EXCHANGE = "pybit"

#: Header naming the queue a message came from (on in-progress, rejected and recovered copies).
HEADER_QUEUE = "x-rbit-queue"
#: Header saying why a message was rejected.
HEADER_REASON = "x-rbit-reason"
#: Header on a message put back after its worker stopped or died mid-job; its
#: value is that worker's name (PyBit's history may show that name building it).
HEADER_RECOVERED = "x-rbit-recovered"

#: ``[amqp] queue_type`` values.
CLASSIC, QUORUM = "classic", "quorum"

#: The delivery limit of rbit's own quorum queues: never reached. RabbitMQ 4
#: gives quorum queues a limit of 20 by default and drops a message returned
#: more often; ``rbit status`` returns the in-progress copies it shows, and
#: ``rbit rejected`` the messages it lists, so without this a copy could be
#: dropped by looking at it. The value is part of the queue's declaration.
QUORUM_DELIVERY_LIMIT = 1_000_000

LOG_REJECTED = "rejected a message from %s: %s"
LOG_UNAVAILABLE = "not serving %s while its node is down (%s); trying again"
LOG_PUT_BACK = "put back a job that %s did not finish, on %s"


@dataclass(frozen=True)
class QueueSpec:
    """How a queue is declared; bound to :data:`PYBIT_EXCHANGE` when it has a routing key."""

    name: str
    routing_key: str | None = None
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    arguments: dict = field(default_factory=dict)


def owned(name: str, queue_type: str = CLASSIC, **arguments) -> QueueSpec:
    """A durable queue of rbit's own, of *queue_type*, with *arguments*.

    A quorum queue must be durable, not exclusive and not auto-delete; those
    are rbit's own queues' flags anyway.
    """
    if queue_type == QUORUM:
        arguments = {"x-queue-type": QUORUM, "x-delivery-limit": QUORUM_DELIVERY_LIMIT, **arguments}
    return QueueSpec(name, arguments=arguments)


def build_queue(name: str, routing_key: str) -> QueueSpec:
    """A PyBit build queue, declared exactly as PyBit declares it (no arguments)."""
    return QueueSpec(name, routing_key)


def build_queue_for(dist: str, arch: str, suite: str, fmt: str) -> QueueSpec:
    """PyBit's build queue ``dist_arch_suite_format``, bound with ``dist.arch.suite.format``."""
    parts = (dist, arch, suite, fmt)
    return build_queue("_".join(parts), ".".join(parts))


def in_progress_name(worker_name: str, slot: int) -> str:
    return f"rbit.inprogress.{worker_name}.{slot}"


def in_progress_queue(worker_name: str, slot: int, queue_type: str = CLASSIC) -> QueueSpec:
    return owned(in_progress_name(worker_name, slot), queue_type)


def delay_queue(queue: str, delay: float, queue_type: str = CLASSIC) -> QueueSpec:
    """The queue that holds a Blocked message of *queue* for *delay* seconds, then returns it.

    A quorum delay queue dead-letters at least once: the message stays in it
    until the build queue has confirmed it, so that a node lost in between
    loses nothing (RabbitMQ 3.10 and later; it needs ``x-overflow:
    reject-publish``, which never applies here: the queue has no length limit).
    """
    ms = max(1, int(round(delay * 1000)))
    arguments = {"x-message-ttl": ms, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue}
    if queue_type == QUORUM:
        arguments.update({"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
    return owned(f"rbit.delay.{queue}.{ms}ms", queue_type, **arguments)


def rejected_queue(name: str, queue_type: str = CLASSIC) -> QueueSpec:
    return owned(name, queue_type)


def cancel_queue(worker_name: str) -> QueueSpec:
    """The worker's own queue for PyBit's CancelRequests, bound with its name.

    Classic whatever the vhost's default queue type (a quorum queue cannot be
    exclusive); it lives on the node the worker is connected to, and is made
    again on the next one when that node goes.
    """
    return QueueSpec(worker_name, routing_key=worker_name, durable=False, exclusive=True, auto_delete=True,
                     arguments={"x-queue-type": CLASSIC})


#: Durable registry: one message per worker name, so that a peer learns of workers it never heard.
REGISTRY = "rbit.workers"


def alive_queue(worker_name: str, queue_type: str = CLASSIC) -> QueueSpec:
    """Where *worker_name* keeps its latest announcement: a publish drops the one before."""
    return owned(f"rbit.alive.{worker_name}", queue_type, **{"x-max-length": 1, "x-overflow": "drop-head"})


def registry_queue(queue_type: str = CLASSIC) -> QueueSpec:
    return owned(REGISTRY, queue_type)


def reclaim_lock(worker_name: str) -> QueueSpec:
    """Exclusive: only the connection holding it may move *worker_name*'s in-progress copies.

    Classic whatever the vhost's default (a quorum queue cannot be exclusive).
    """
    return QueueSpec(f"rbit.reclaim.{worker_name}", durable=False, exclusive=True,
                     arguments={"x-queue-type": CLASSIC})


def declare_worker(broker: Broker, settings, sections, queue_type: str = CLASSIC) -> list[str]:
    """Declare everything a worker uses; its name queue first, which claims the name
    (:class:`~rbit.errors.QueueLocked` if another worker holds it). Return the served
    queues that cannot be declared now (see :func:`declare_served`).

    A queue that exists with other arguments is refused by the broker:
    :class:`~rbit.errors.QueueMismatch`, saying what to do.
    """
    broker.declare(cancel_queue(settings.name))
    unavailable = []
    for section in sections:
        try:
            declare_served(broker, settings, section, queue_type)
        except QueueUnavailable as exc:
            log.warning(LOG_UNAVAILABLE, section.queue, exc)
            unavailable.append(section.queue)
    _declare(broker, rejected_queue(settings.rejected_queue, queue_type), MISMATCH_OWN)
    for slot in range(settings.concurrency):
        _declare(broker, in_progress_queue(settings.name, slot, queue_type), MISMATCH_OWN)
    return unavailable


def declare_served(broker: Broker, settings, section, queue_type: str = CLASSIC, spare: bool = False) -> None:
    """Declare a served build queue and its delay queue.

    :class:`~rbit.errors.QueueUnavailable` while a classic one is out of reach
    (its cluster node is down): the worker serves its other queues meanwhile.
    """
    _declare(broker, build_queue(section.queue, section.routing_key), MISMATCH_BUILD, spare)
    _declare(broker, delay_queue(section.queue, settings.blocked_delay, queue_type), MISMATCH_OWN, spare)


#: What to do about an rbit queue that exists with other arguments.
MISMATCH_OWN = ("it was declared with another [amqp] queue_type; stop the workers using it, "
                "let it empty and delete it (README: Changing queue_type)")
#: What to do about a build queue that exists with other arguments than PyBit's.
MISMATCH_BUILD = ("it was not declared as PyBit declares it (no arguments), so PyBit's own declaration "
                  "fails too; for quorum build queues use a vhost whose default queue type is quorum "
                  "(README: Clusters)")


def _declare(broker: Broker, spec: QueueSpec, advice: str, spare: bool = False) -> None:
    try:
        broker.declare(spec, spare=spare)
    except QueueMismatch as exc:
        raise QueueMismatch(f"{exc}: {advice}") from exc


def origin(message: Delivery) -> str | None:
    """The queue a copy says its message came from."""
    queue = message.headers.get(HEADER_QUEUE)
    if isinstance(queue, bytes):
        queue = queue.decode("utf-8", "replace")
    return str(queue) if queue else None


def recovered_from(message: Delivery) -> str | None:
    """The worker that left this message's job unfinished, if it was put back."""
    value = message.headers.get(HEADER_RECOVERED)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def hold(broker: Broker, message: Delivery, queue: str, worker_name: str, slot: int, meanwhile=None) -> None:
    """Copy *message* (from *queue*) to the worker's in-progress queue for *slot*, confirmed;
    *meanwhile* is called while the broker confirms it (see :meth:`rbit.broker.Broker.publish`)."""
    broker.publish(message.copy({HEADER_QUEUE: queue}), in_progress_name(worker_name, slot), meanwhile=meanwhile)


def release(broker: Broker, worker_name: str, slot: int, wait: bool = True) -> None:
    """Remove the in-progress copy of *slot*: its job has had its end.

    With *wait*, the copy is gone once this returns. Without, the purge goes
    out and the slot may take its next job at once: the broker does the purge
    before that job's copy arrives, and the purge stays unsure until the
    broker is seen to do it (see :meth:`rbit.broker.Broker.purge_nowait`).
    """
    name = in_progress_name(worker_name, slot)
    if wait:
        broker.purge(name)
    else:
        broker.purge_nowait(name)


def delay(broker: Broker, message: Delivery, queue: str, seconds: float) -> None:
    """Send a Blocked job's message to wait *seconds* before it returns to *queue*."""
    broker.publish(message.copy(), delay_queue(queue, seconds).name)


def put_back(broker: Broker, message: Delivery, queue: str, worker_name: str) -> None:
    """Put a message whose job *worker_name* did not finish back on *queue*."""
    broker.publish(message.copy({HEADER_RECOVERED: worker_name}), queue)


def reject(broker: Broker, message: Delivery, queue: str, reason: str, rejected: str) -> None:
    """Move a bad message, unchanged, to the rejected queue (confirmed first), then ack it."""
    log.warning(LOG_REJECTED, queue, reason)
    broker.publish(message.copy({HEADER_REASON: reason, HEADER_QUEUE: queue}), rejected)
    message.ack()


def unreject(broker: Broker, message: Delivery) -> str | None:
    """Publish a rejected message, without rbit's headers, to the queue it came from (confirmed)."""
    queue = origin(message)
    if queue is None:
        return None
    broker.publish(message.copy(drop=(HEADER_QUEUE, HEADER_REASON)), queue)
    return queue


def slots(broker: Broker, worker_name: str, concurrency: int) -> Iterator[int]:
    """The worker's slots: its *concurrency* ones, and any left by an earlier, larger concurrency."""
    slot = 0
    while slot < concurrency or broker.exists(in_progress_name(worker_name, slot)):
        yield slot
        slot += 1


def recover(broker: Broker, worker_name: str, concurrency: int, rejected: str) -> int:
    """Put every in-progress copy of *worker_name* back on its queue; return how many.

    Used when a worker starts (its previous run may have died mid-job) and by
    ``rbit recover`` for a worker that will not come back. The copies are read
    on another channel than the purges go on: a purge this connection sent
    without waiting is waited for first, so that the copy of a job that has
    had its end is never put back.
    """
    broker.confirm_purges()
    count = 0
    for slot in slots(broker, worker_name, concurrency):
        name = in_progress_name(worker_name, slot)
        while (message := broker.get(name)) is not None:
            queue = origin(message)
            if queue is None:
                broker.publish(message.copy({HEADER_REASON: "in-progress copy without its queue"}), rejected)
            else:
                put_back(broker, message, queue, worker_name)
                log.warning(LOG_PUT_BACK, worker_name, queue)
            message.ack()
            count += 1
    return count
