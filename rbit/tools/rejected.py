"""``rbit rejected``: looking at the rejected queue and putting messages back where they came from."""

from __future__ import annotations

from .. import queues


def describe(message) -> str:
    """``from QUEUE: REASON`` of a rejected message."""
    reason = message.headers.get(queues.HEADER_REASON, "?")
    if isinstance(reason, bytes):
        reason = reason.decode("utf-8", "replace")
    return f"from {queues.origin(message) or '?'}: {reason}"


def preview(body, width: int = 70) -> str:
    text = body if isinstance(body, str) else body.decode("utf-8", errors="replace")
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"
