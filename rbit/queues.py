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

Nothing else in rbit spells a queue name or a header.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

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

LOG_REJECTED = "rejected a message from %s: %s"
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


def build_queue(name: str, routing_key: str) -> QueueSpec:
    """A PyBit build queue, declared exactly as PyBit declares it (no arguments)."""
    return QueueSpec(name, routing_key)


def build_queue_for(dist: str, arch: str, suite: str, fmt: str) -> QueueSpec:
    """PyBit's build queue ``dist_arch_suite_format``, bound with ``dist.arch.suite.format``."""
    parts = (dist, arch, suite, fmt)
    return build_queue("_".join(parts), ".".join(parts))


def in_progress_name(worker_name: str, slot: int) -> str:
    return f"rbit.inprogress.{worker_name}.{slot}"


def in_progress_queue(worker_name: str, slot: int) -> QueueSpec:
    return QueueSpec(in_progress_name(worker_name, slot))


def delay_queue(queue: str, delay: float) -> QueueSpec:
    """The queue that holds a Blocked message of *queue* for *delay* seconds, then returns it."""
    ms = max(1, int(round(delay * 1000)))
    return QueueSpec(
        f"rbit.delay.{queue}.{ms}ms",
        arguments={
            "x-message-ttl": ms,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue,
        },
    )


def rejected_queue(name: str) -> QueueSpec:
    return QueueSpec(name)


def cancel_queue(worker_name: str) -> QueueSpec:
    """The worker's own queue for PyBit's CancelRequests, bound with its name."""
    return QueueSpec(worker_name, routing_key=worker_name, durable=False, exclusive=True, auto_delete=True)


#: Durable registry: one message per worker name, so that a peer learns of workers it never heard.
REGISTRY = "rbit.workers"


def alive_queue(worker_name: str) -> QueueSpec:
    """Where *worker_name* keeps its latest announcement: a publish drops the one before."""
    return QueueSpec(f"rbit.alive.{worker_name}", arguments={"x-max-length": 1, "x-overflow": "drop-head"})


def registry_queue() -> QueueSpec:
    return QueueSpec(REGISTRY)


def reclaim_lock(worker_name: str) -> QueueSpec:
    """Exclusive: only the connection holding it may move *worker_name*'s in-progress copies."""
    return QueueSpec(f"rbit.reclaim.{worker_name}", durable=False, exclusive=True)


def declare_worker(broker: Broker, settings, sections) -> None:
    """Declare everything a worker uses; its name queue first, which claims the name
    (:class:`~rbit.errors.QueueLocked` if another worker holds it)."""
    broker.declare(cancel_queue(settings.name))
    for section in sections:
        broker.declare(build_queue(section.queue, section.routing_key))
        broker.declare(delay_queue(section.queue, settings.blocked_delay))
    broker.declare(rejected_queue(settings.rejected_queue))
    for slot in range(settings.concurrency):
        broker.declare(in_progress_queue(settings.name, slot))


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


def hold(broker: Broker, message: Delivery, queue: str, worker_name: str, slot: int) -> None:
    """Copy *message* (from *queue*) to the worker's in-progress queue for *slot*, confirmed."""
    broker.publish(message.copy({HEADER_QUEUE: queue}), in_progress_name(worker_name, slot))


def release(broker: Broker, worker_name: str, slot: int) -> None:
    """Remove the in-progress copy of *slot*: its job has had its end."""
    broker.purge(in_progress_name(worker_name, slot))


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
    ``rbit recover`` for a worker that will not come back.
    """
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
