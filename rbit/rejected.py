"""``rbit rejected``: looking at the rejected queue and putting messages back where they came from."""

from . import broker as amqp_side


def headers_of(message):
    return dict(message.properties.get("application_headers") or {})


def put_back(broker, message):
    """Publish a rejected message, without rbit's headers, to the queue it came from (confirmed)."""
    queue = headers_of(message).get(amqp_side.HEADER_QUEUE)
    if not queue:
        return None
    copy = amqp_side.copy_message(message, drop=(amqp_side.HEADER_QUEUE, amqp_side.HEADER_REASON))
    broker.publish(copy, str(queue))
    return str(queue)


def preview(body, width=70):
    text = body if isinstance(body, str) else body.decode("utf-8", errors="replace")
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"
