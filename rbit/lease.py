"""The timing of reclaiming: when a worker says it is alive, when it must stop its jobs, when a peer may take them.

A worker with ``[rbit] reclaim_after = R`` (R > 0):

- announces that it is alive every R/10 seconds (at least :data:`MIN_INTERVAL`
  apart), through the broker (see :mod:`rbit.reclaim`);
- holds a *lease* that each confirmed announcement renews until
  ``SENT + FENCE_FRACTION × R``, SENT being when it sent that announcement
  (before the broker confirmed it). Its job processes hold the same deadline.
  When the lease runs out the worker is *fenced*: it stops its jobs and
  reports nothing more for them, and each job process stops its own group at
  that moment even if the worker is frozen.

A peer counts a worker silent from the moment it first saw that worker's
latest announcement, on the peer's own clock (no two hosts' clocks are ever
compared), and never from before the peer itself was connected and
watching: a connection loss alone starts nobody's silence. After R seconds of
silence the peer may put the worker's jobs back.

Why 4/5. A peer's R starts no earlier than the silent worker's last SENT, so
the fence comes at least R/5 before any peer may reclaim: 60 s at the default
300 s, 2 s at 10 s. That margin covers clock rates (hosts kept by NTP differ
by less than 0.05 %, 0.15 s over 300 s), a lifeline thread or worker loop that
the scheduler wakes late, and a killed process group's exit. Fencing no
earlier than 4/5 lets a worker ride out broker outages of up to 4/5 R, less
one announcement interval and its reconnection (whose backoff is capped at
R/10 for this reason).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

#: Part of ``reclaim_after`` after which a worker that could not renew its lease stops its jobs.
FENCE_FRACTION = 0.8
#: Part of ``reclaim_after`` between two announcements.
ANNOUNCE_FRACTION = 0.1
#: Shortest time between two announcements, and the longest reconnection pause while reclaiming is on.
MIN_INTERVAL = 1.0
#: Smallest ``reclaim_after`` other than 0: four announcements fit before the fence.
MIN_RECLAIM_AFTER = 5.0
#: Seconds between announcements of a worker with reclaiming off: it still tells its peers
#: (who then never reclaim it), and ``rbit status`` shows it.
OFF_INTERVAL = 30.0


#: CLOCK_BOOTTIME counts the time a host spends suspended (CLOCK_MONOTONIC does not, so a thawed
#: host would think its lease still good); both are the same for every process of a host.
_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def clock() -> float:
    """Now, on the clock of leases and silences (seconds; only differences mean anything)."""
    return time.clock_gettime(_CLOCK)


def interval(reclaim_after: float) -> float:
    """Seconds between two announcements of a worker with this ``reclaim_after``."""
    if not reclaim_after:
        return OFF_INTERVAL
    return max(MIN_INTERVAL, reclaim_after * ANNOUNCE_FRACTION)


class Lease:
    """This worker's own lease: renewed by each confirmed announcement, fenced when it runs out."""

    def __init__(self, reclaim_after: float):
        self.reclaim_after = reclaim_after
        #: Monotonic time the lease runs out; None without one (reclaiming off, or never renewed).
        self.deadline: float | None = None
        self.fenced = False
        #: Monotonic time of the last renewal (the announcement's SENT).
        self.renewed_at: float | None = None

    def renew(self, sent: float) -> float | None:
        """An announcement sent at *sent* was confirmed: the new deadline (None: no lease)."""
        self.renewed_at = sent
        self.fenced = False
        if self.reclaim_after > 0:
            self.deadline = sent + FENCE_FRACTION * self.reclaim_after
        return self.deadline

    def runs_out(self, now: float) -> bool:
        """True when the lease has just run out: the caller fences (once; :meth:`renew` ends it)."""
        if self.fenced or self.deadline is None or now < self.deadline:
            return False
        self.fenced = True
        return True


@dataclass
class Peer:
    """The latest announcement seen of one peer, and when it was first seen."""

    #: What identifies the announcement (a new one always differs); None when it cannot be read.
    key: object
    reclaim_after: float
    #: Monotonic time this worker first saw *key*.
    since: float


class Watch:
    """What this worker has seen of its peers' announcements, and which of them are silent."""

    def __init__(self):
        self.peers: dict[str, Peer] = {}
        #: Since when this worker has been watching without a break; None while it is not.
        self.start: float | None = None

    def restart(self, now: float) -> None:
        """Watching (again) from *now*: silence before this moment does not count."""
        self.start = now

    def stop(self) -> None:
        self.start = None

    def saw(self, name: str, key, reclaim_after: float, now: float) -> None:
        """A look at *name*'s latest announcement gave *key* (None: unreadable or missing)."""
        peer = self.peers.get(name)
        if peer is None or key is None or peer.key != key:
            self.peers[name] = Peer(key, reclaim_after, now)
        else:
            peer.reclaim_after = reclaim_after

    def keep(self, names) -> None:
        """Forget every peer not in *names*."""
        for name in set(self.peers) - set(names):
            del self.peers[name]

    def forget(self, name: str) -> None:
        self.peers.pop(name, None)

    def silence(self, name: str, now: float) -> float:
        """Seconds *name* has been silent as far as this worker can tell (0 if it cannot)."""
        peer = self.peers.get(name)
        if peer is None or peer.key is None or self.start is None:
            return 0.0
        return max(0.0, now - max(peer.since, self.start))

    def silent(self, now: float) -> list[tuple[str, Peer, float]]:
        """(name, peer, seconds) of each peer silent for its own ``reclaim_after`` (never one with 0)."""
        found = []
        for name, peer in self.peers.items():
            quiet = self.silence(name, now)
            if peer.reclaim_after > 0 and quiet >= peer.reclaim_after:
                found.append((name, peer, quiet))
        return found
