"""Reclaiming through the broker: announcements, the registry of workers, and putting a silent worker's jobs back.

Only plain AMQP on the worker's own vhost (no other server, no management
plugin). The queues (named in :mod:`rbit.queues`):

``rbit.alive.NAME`` (durable; ``x-max-length: 1``, overflow ``drop-head``)
    NAME's latest announcement, published persistent and confirmed every
    ``reclaim_after/10`` seconds (see :mod:`rbit.lease`), as JSON:
    ``{"name", "run", "seq", "reclaim_after", "concurrency", "jobs", "sent"}``.
    ``run`` is random for each process and ``seq`` counts up, so every
    announcement differs from the one before; ``sent`` (wall clock) is only
    shown by ``rbit status``. Readers take the messages on a spare channel and
    let them go back: RabbitMQ puts a message it gets back in its place (or
    nearer the head), so the last one read is the newest.
``rbit.workers`` (durable)
    one message ``{"name"}`` per worker: how a peer started later learns of a
    worker that died before. A worker adds its own when it joins, and again
    whenever it finds it missing; readers let the messages go back and drop
    duplicates.
``rbit.reclaim.NAME`` (exclusive)
    the lock: only the connection that holds it moves NAME's in-progress
    copies. A peer reclaiming NAME holds it, and so does NAME itself while it
    joins (at its start, after each reconnection and after a fence), before
    it takes any job. So a peer never empties the in-progress queues of a
    worker that is filling them again.

A peer that has seen no new announcement of NAME for NAME's own
``reclaim_after`` (:class:`rbit.lease.Watch`) calls :func:`reclaim`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field

from . import queues
from .delivery import Outgoing
from .errors import QueueLocked, QueueMissing

log = logging.getLogger(__name__)

#: Most registry entries or announcements read at once.
READ_LIMIT = 1000

LOG_RECLAIMED = ("worker %s has been silent for %.0f s (its reclaim_after is %g s): "
                 "put back %d job(s) it had in progress")
LOG_GONE = "worker %s has been silent for %.0f s with no job in progress: no longer watched"
LOG_STILL_CONNECTED = ("worker %s is silent but its connection is still open (a frozen host?); "
                       "its lease has run out, so its jobs are stopped: reclaiming them")


@dataclass(frozen=True)
class Announcement:
    """What a worker says about itself each time it announces that it is alive."""

    name: str
    run: str
    seq: int
    reclaim_after: float
    concurrency: int = 1
    #: Ids of the jobs it is running (for ``rbit status``).
    jobs: tuple = field(default_factory=tuple)
    #: Wall-clock time it was sent, by the worker's own clock (for ``rbit status`` only).
    sent: float = 0.0

    @property
    def key(self) -> tuple:
        """What tells one announcement from the next."""
        return (self.run, self.seq)

    def outgoing(self) -> Outgoing:
        body = json.dumps({**asdict(self), "jobs": list(self.jobs)}, separators=(",", ":"))
        return Outgoing(body, properties={"content_type": "application/json"})


def decode(body, name: str) -> Announcement | None:
    """The announcement in *body*, if it is a well-formed one of worker *name*."""
    try:
        data = json.loads(body)
        ok = (isinstance(data, dict) and data.get("name") == name and isinstance(data.get("run"), str)
              and isinstance(data.get("seq"), int) and _seconds(data.get("reclaim_after"))
              and isinstance(data.get("concurrency", 1), int) and data.get("concurrency", 1) >= 1
              and _seconds(data.get("sent", 0.0)))
        if not ok:
            return None
        jobs = tuple(job for job in data.get("jobs") or () if isinstance(job, int))
        return Announcement(name, data["run"], data["seq"], float(data["reclaim_after"]),
                            data.get("concurrency", 1), jobs, float(data.get("sent", 0.0)))
    except (ValueError, TypeError):
        return None


def _seconds(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def announce(broker, announcement: Announcement) -> None:
    """Publish *announcement* to its worker's own queue, and wait for the broker's confirm."""
    broker.publish(announcement.outgoing(), queues.alive_queue(announcement.name).name)


def latest(broker, name: str) -> Announcement | None:
    """*name*'s newest announcement, left in place; None if there is none or it cannot be read."""
    try:
        with broker.take(queues.alive_queue(name).name, READ_LIMIT) as batch:
            if not batch.messages:
                return None
            return decode(batch.messages[-1].body, name)
    except QueueMissing:
        return None


def registry(broker, me: str | None = None) -> list[str]:
    """The names in the registry, in order. With *me*: also drop duplicates, and add *me* if missing."""
    names = []
    try:
        batch = broker.take(queues.REGISTRY, READ_LIMIT)
    except QueueMissing:
        return names  # no worker has joined on this vhost yet
    with batch:
        for message in batch.messages:
            name = _registered_name(message.body)
            if name is None or name in names:
                if me is not None:
                    message.ack()  # a duplicate (two readers added one each) or garbage
                continue
            names.append(name)
        if me is not None and me not in names:
            broker.publish(Outgoing(json.dumps({"name": me}), properties={"content_type": "application/json"}),
                           queues.REGISTRY)
            names.append(me)
    return names


def _registered_name(body) -> str | None:
    try:
        data = json.loads(body)
    except (ValueError, TypeError):
        return None
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) and name else None


def join(broker, name: str, queue_type: str = queues.CLASSIC) -> None:
    """Declare *name*'s announcement queue and the registry (of ``[amqp] queue_type``), and make
    sure *name* is registered."""
    broker.declare(queues.alive_queue(name, queue_type))
    broker.declare(queues.registry_queue(queue_type))
    registry(broker, me=name)


def deregister(broker, name: str) -> None:
    """Take *name* out of the registry: nobody watches it until it joins again."""
    try:
        batch = broker.take(queues.REGISTRY, READ_LIMIT)
    except QueueMissing:
        return
    with batch:
        for message in batch.messages:
            if _registered_name(message.body) == name:
                message.ack()


def reclaim(broker, name: str, seen: Announcement, silent_for: float, rejected: str) -> int | None:
    """Put back the jobs of *name*, silent since announcement *seen*; how many (None: not now).

    None when another connection holds *name*'s lock (a peer reclaiming it, or
    *name* joining again) or when *name* has announced itself since *seen*.
    Each copy is published on its queue, marked recovered from *name*
    (:func:`rbit.queues.put_back`), with a confirm, before it is acknowledged.
    """
    lock = queues.reclaim_lock(name)
    if not broker.claim(lock):
        return None
    try:
        now = latest(broker, name)
        if now is None or now.key != seen.key:
            return None  # it spoke (or its queue was emptied): not silent after all
        try:
            broker.queue_info(queues.cancel_queue(name).name)
        except QueueLocked:
            log.warning(LOG_STILL_CONNECTED, name)
        except QueueMissing:
            pass
        count = queues.recover(broker, name, seen.concurrency, rejected)
        deregister(broker, name)
    finally:
        broker.delete(lock.name)
    if count:
        log.warning(LOG_RECLAIMED, name, silent_for, seen.reclaim_after, count)
    else:
        log.info(LOG_GONE, name, silent_for)
    return count


def claim_own(broker, name: str) -> bool:
    """Take *name*'s own lock (False while a peer is putting its jobs back)."""
    return broker.claim(queues.reclaim_lock(name))


def release_own(broker, name: str) -> None:
    broker.delete(queues.reclaim_lock(name).name)
