"""``rbit status``: what the broker holds for a worker: its queues, jobs in progress, rejects."""

import amqp

from . import broker as amqp_side
from .pybit import decode_build_request
from .errors import BadMessage


def peek(broker, queue_name, limit=20):
    """Up to *limit* messages of *queue_name*, left in place."""
    try:
        channel, messages = broker.take(queue_name, limit)
    except amqp.exceptions.NotFound:
        return []
    channel.close()  # the messages go back, in their order
    return messages


def describe_job(message):
    """``job 42: hello 1.0`` for a message, or why it cannot be read."""
    try:
        request = decode_build_request(message.body)
    except BadMessage as exc:
        return f"unreadable: {exc.reason}"
    return f"job {request.get_job_id()}: {request.get_package()} {request.get_version()}"


def queue_rows(broker, config):
    """(kind, queue, messages, consumers, note) for every queue the configuration involves."""
    settings = config.worker
    rows = []

    def add(kind, name, note=""):
        try:
            messages, consumers = broker.queue_info(name)
        except amqp.exceptions.NotFound:
            rows.append((kind, name, None, None, "not declared yet"))
            return
        rows.append((kind, name, messages, consumers, note))

    for section in config.runners:
        add("build", section.queue, section.routing_key)
        add("blocked", amqp_side.delay_queue(section.queue, settings.blocked_delay).name,
            f"back to {section.queue} after {settings.blocked_delay:g} s")
    slot = 0
    while slot < settings.concurrency or broker.exists(amqp_side.in_progress_name(settings.name, slot)):
        name = amqp_side.in_progress_name(settings.name, slot)
        jobs = "; ".join(describe_job(m) for m in peek(broker, name)) or "idle"
        add("in progress", name, jobs)
        slot += 1
    add("rejected", settings.rejected_queue, "see: rbit rejected CONFIG")
    return rows


def format_rows(rows):
    lines = [f"{'KIND':<12} {'QUEUE':<44} {'MESSAGES':>8} {'CONSUMERS':>9}  NOTE"]
    for kind, name, messages, consumers, note in rows:
        shown = lambda n: "-" if n is None else str(n)  # noqa: E731
        lines.append(f"{kind:<12} {name:<44} {shown(messages):>8} {shown(consumers):>9}  {note}")
    return "\n".join(lines)
