"""The worker's side of reclaiming: its lease, its announcements, and its watch over silent peers.

The loop calls :meth:`Liveness.check` before it reads any job's news, so that
a worker whose lease ran out (:mod:`rbit.lease`) stops its jobs and reports
nothing more for them; :meth:`Liveness.join` once it has (re)connected; and
:meth:`Liveness.tick` on every turn while connected, which announces, looks
at the peers and reclaims the silent ones (:mod:`rbit.reclaim`), and joins
again after a fence.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Callable

from . import lease as timing
from . import queues, reclaim
from .lease import Lease, Watch

log = logging.getLogger(__name__)

#: Seconds between two attempts at this worker's own lock while a peer holds it.
LOCK_PAUSE = 0.5
#: Seconds between two log lines while waiting for that lock.
LOCK_LOG_EVERY = 30.0

LOG_FENCED = ("could not renew this worker's lease for %.1f s (a peer may put its jobs back after %g s): "
              "fenced; stopping %d job(s) and reporting nothing more for them")
LOG_LOCK_WAIT = "a peer is putting back this worker's jobs (%s is held); waiting for it to finish"
LOG_JOINED = "announced to peers: reclaim_after %g s%s"


class Liveness:
    """This worker's lease, announcements and watch, driven by the worker's loop."""

    def __init__(self, settings, jobs, clock: Callable[[], float] = timing.clock,
                 idle: Callable[[], None] = lambda: None, should_stop: Callable[[], bool] = lambda: False,
                 queue_type: str = "classic"):
        self.settings = settings
        self.queue_type = queue_type
        self.jobs = jobs
        self.clock = clock
        self.idle = idle
        self.should_stop = should_stop
        self.lease = Lease(settings.reclaim_after)
        self.watch = Watch()
        #: Tells this process's announcements from those of an earlier run under the same name.
        self.run = uuid.uuid4().hex[:12]
        self.seq = 0
        #: True once this worker has announced itself on the current connection (and is not fenced).
        self.joined = False
        #: Whether the next join puts back what is left in this worker's in-progress queues:
        #: at the first start (an earlier run may have died), and after a fence.
        self.recover = False
        self.next_announce = 0.0
        self.next_watch = 0.0
        #: The latest announcement of each peer watched.
        self.seen: dict[str, reclaim.Announcement] = {}

    @property
    def reclaim_after(self) -> float:
        return self.settings.reclaim_after

    @property
    def fenced(self) -> bool:
        return self.lease.fenced

    @property
    def interval(self) -> float:
        return timing.interval(self.reclaim_after)

    @property
    def max_pause(self) -> float:
        """Longest pause between two connection attempts: back well within the lease."""
        return self.interval if self.reclaim_after > 0 else float("inf")

    # -- the lease ----------------------------------------------------------------

    def check(self, now: float | None = None) -> bool:
        """Fence this worker if its lease has run out; True if it did just now."""
        now = self.clock() if now is None else now
        if not self.lease.runs_out(now):
            return False
        self.joined = False
        self.recover = True
        self.watch.stop()
        stopped = self.jobs.fence()
        log.warning(LOG_FENCED, now - self.lease.renewed_at, self.reclaim_after, stopped)
        return True

    def disconnected(self) -> None:
        """The connection is gone: stop watching (silence seen through a gap does not count)."""
        self.joined = False
        self.watch.stop()

    # -- joining ----------------------------------------------------------------------

    def join(self, broker, first: bool = False) -> bool:
        """Announce this worker on a new connection, or after a fence; False if not yet possible.

        Under this worker's own lock: end the slots of jobs lost to a fence
        (one log line each, nothing on the broker), put back what is left in
        its in-progress queues at the *first* start or after a fence, register,
        and announce (which renews the lease). A fenced worker joins only once
        its stopped jobs have ended.
        """
        self.recover = self.recover or first
        self.check()
        if self.fenced and self.jobs.running():
            return False
        name = self.settings.name
        warned = None
        while not reclaim.claim_own(broker, name):
            if self.should_stop():
                return False
            if warned is None or self.clock() - warned >= LOCK_LOG_EVERY:
                warned = self.clock()
                log.warning(LOG_LOCK_WAIT, queues.reclaim_lock(name).name)
            self.idle()
            time.sleep(LOCK_PAUSE)
        try:
            self.check()  # waiting for the lock may have taken the rest of the lease
            if self.fenced and self.jobs.running():
                return False
            self.jobs.finish(broker)
            if self.recover:
                queues.recover(broker, name, self.settings.concurrency, self.settings.rejected_queue)
                self.recover = False
            reclaim.join(broker, name, self.queue_type)
            if not self._announce(broker):
                return False
        finally:
            reclaim.release_own(broker, name)
        self.joined = True
        now = self.clock()
        self.watch.restart(now)
        self.next_watch = now
        log.debug(LOG_JOINED, self.reclaim_after, "" if self.reclaim_after else " (off: never reclaimed)")
        return True

    # -- each turn ----------------------------------------------------------------------

    def tick(self, broker) -> None:
        """Announce when due, look at the peers when due; join again if not joined."""
        self.check(self.clock())
        if not self.joined:
            self.join(broker)
            return
        if self.clock() >= self.next_announce and not self._announce(broker):
            return
        if self.reclaim_after > 0 and self.clock() >= self.next_watch:
            self._look_around(broker)

    def waits(self) -> list[float]:
        """Seconds until the loop must wake for this: the lease's end, the next announcement or look."""
        found = []
        if self.lease.deadline is not None and not self.fenced:
            found.append(self.lease.deadline)
        if self.joined:
            found.append(self.next_announce)
            if self.reclaim_after > 0:
                found.append(self.next_watch)
        else:
            found.append(self.clock() + timing.MIN_INTERVAL)
        now = self.clock()
        return [max(0.0, moment - now) for moment in found]

    def _announce(self, broker) -> bool:
        """Say this worker is alive; renew the lease (and its jobs') from the moment it was sent."""
        sent = self.clock()
        if self.check(sent):
            return False
        self.seq += 1
        reclaim.announce(broker, reclaim.Announcement(
            self.settings.name, self.run, self.seq, self.reclaim_after, self.settings.concurrency,
            tuple(job.job_id for job in self.jobs.running()), time.time()))
        if self.check(self.clock()):
            return False  # the lease ran out while the broker confirmed: the jobs may have stopped themselves
        deadline = self.lease.renew(sent)
        if deadline is not None:
            self.jobs.renew(deadline)
        self.next_announce = sent + self.interval
        return True

    def _look_around(self, broker) -> None:
        """Read every registered peer's latest announcement; reclaim those silent for their reclaim_after."""
        me = self.settings.name
        peers = [name for name in reclaim.registry(broker, me=me) if name != me]
        for name in peers:
            seen = reclaim.latest(broker, name)
            if seen is None:
                self.seen.pop(name, None)
                self.watch.saw(name, None, 0.0, self.clock())
            else:
                self.seen[name] = seen
                self.watch.saw(name, seen.key, seen.reclaim_after, self.clock())
        self.watch.keep(peers)
        self.seen = {name: seen for name, seen in self.seen.items() if name in peers}
        for name, _, quiet in self.watch.silent(self.clock()):
            if reclaim.reclaim(broker, name, self.seen[name], quiet, self.settings.rejected_queue) is not None:
                self.watch.forget(name)
                self.seen.pop(name, None)
        self.next_watch = self.clock() + self.interval

    def leave(self, broker) -> None:
        """A clean stop with no job left in progress: out of the registry (nobody need watch it)."""
        if self.joined and not self.jobs.slots:
            reclaim.deregister(broker, self.settings.name)
