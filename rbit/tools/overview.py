"""``rbit status``: what the broker holds for a worker (its queues, jobs in progress, rejects), and its peers."""

from __future__ import annotations

import time

from .. import queues, reclaim
from ..errors import BadMessage, QueueMissing
from ..lease import OFF_INTERVAL
from ..pybit import decode_build_request


def peek(broker, queue_name: str, limit: int = 20) -> list:
    """Up to *limit* messages of *queue_name*, left in place."""
    try:
        with broker.take(queue_name, limit) as batch:  # closing it puts them back, in their order
            return batch.messages
    except QueueMissing:
        return []


def describe_job(message) -> str:
    """``job 42: hello 1.0`` for a message, or why it cannot be read."""
    try:
        request = decode_build_request(message.body)
    except BadMessage as exc:
        return f"unreadable: {exc.reason}"
    return f"job {request.get_job_id()}: {request.get_package()} {request.get_version()}"


def queue_rows(broker, config) -> list[tuple]:
    """(kind, queue, messages, consumers, note) for every queue the configuration involves."""
    settings = config.worker
    rows = []

    def add(kind, name, note=""):
        try:
            messages, consumers = broker.queue_info(name)
        except QueueMissing:
            rows.append((kind, name, None, None, "not declared yet"))
            return
        rows.append((kind, name, messages, consumers, note))

    for section in config.runners:
        add("build", section.queue, section.routing_key)
        add("blocked", queues.delay_queue(section.queue, settings.blocked_delay).name,
            f"back to {section.queue} after {settings.blocked_delay:g} s")
    for slot in queues.slots(broker, settings.name, settings.concurrency):
        name = queues.in_progress_name(settings.name, slot)
        jobs = "; ".join(describe_job(m) for m in peek(broker, name)) or "idle"
        add("in progress", name, jobs)
    add("rejected", settings.rejected_queue, "see: rbit rejected CONFIG")
    return rows


def format_rows(rows: list[tuple]) -> str:
    lines = [f"{'KIND':<12} {'QUEUE':<44} {'MESSAGES':>8} {'CONSUMERS':>9}  NOTE"]
    for kind, name, messages, consumers, note in rows:
        shown = lambda n: "-" if n is None else str(n)  # noqa: E731
        lines.append(f"{kind:<12} {name:<44} {shown(messages):>8} {shown(consumers):>9}  {note}")
    return "\n".join(lines)


def worker_rows(broker, now: float | None = None) -> list[tuple]:
    """(worker, last sign of life, state, jobs in progress) for each worker registered on the vhost.

    The age is the announcement's own wall-clock stamp against this host's clock
    (peers judge silence on their own monotonic clocks, never like this).
    """
    now = time.time() if now is None else now
    rows = []
    for name in reclaim.registry(broker):
        seen = reclaim.latest(broker, name)
        jobs = [describe_job(message)
                for slot in queues.slots(broker, name, seen.concurrency if seen else 1)
                for message in peek(broker, queues.in_progress_name(name, slot))]
        if seen is None:
            age, state = "never", "unknown"
        else:
            quiet = max(0.0, now - seen.sent)
            age = f"{quiet:.0f} s ago"
            limit = seen.reclaim_after or 2 * OFF_INTERVAL
            state = ("alive" if quiet < limit else "silent") + (
                f", reclaim after {seen.reclaim_after:g} s" if seen.reclaim_after else ", reclaim off")
        rows.append((name, age, state, "; ".join(jobs) or "idle"))
    return rows


def format_workers(rows: list[tuple]) -> str:
    lines = [f"{'WORKER':<28} {'LAST SEEN':>10}  {'STATE':<30} IN PROGRESS"]
    for name, age, state, jobs in rows:
        lines.append(f"{name:<28} {age:>10}  {state:<30} {jobs}")
    if not rows:
        lines.append("(no worker has announced itself on this vhost)")
    return "\n".join(lines)
