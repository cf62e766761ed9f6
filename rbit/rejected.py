"""``rbit rejected``: looking at the rejected queue and putting messages back where they came from."""

import amqp

from . import broker as amqp_side


def take(broker, queue_name, limit):
    """Up to *limit* messages of the rejected queue, unacknowledged, on a channel of their own."""
    channel = broker.connection.channel()
    messages = []
    while len(messages) < limit:
        message = channel.basic_get(queue_name, no_ack=False)
        if message is None:
            break
        messages.append(message)
    return channel, messages


def headers_of(message):
    return dict(message.properties.get("application_headers") or {})


def put_back(broker, message):
    """Publish a rejected message, without rbit's headers, to the queue it came from (confirmed)."""
    headers = headers_of(message)
    queue = headers.pop(amqp_side.HEADER_QUEUE, None)
    headers.pop(amqp_side.HEADER_REASON, None)
    if not queue:
        return None
    properties = {k: v for k, v in message.properties.items() if k != "application_headers"}
    broker.publish(amqp.Message(message.body, application_headers=headers, **properties), str(queue))
    return str(queue)


def preview(body, width=70):
    text = body if isinstance(body, str) else body.decode("utf-8", errors="replace")
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"
