"""Publishing a build request exactly as PyBit's web controller does, to try a worker without PyBit."""

import amqp

from .broker import PYBIT_EXCHANGE, Broker
from .errors import BrokerError
from .pybit import encode, make_request


def publish_request(amqp_settings, routing_key, request):
    """Publish *request* through ``pybit`` with *routing_key*, persistent and mandatory.

    Returns the body sent. Raises BrokerError when no queue is bound to the key
    (the broker returns a mandatory message it cannot route).
    """
    body = encode(request)
    broker = Broker(amqp_settings)
    returned = []
    try:
        broker.connect_once()
        PYBIT_EXCHANGE(broker.channel).declare()
        broker.channel.events["basic_return"].add(lambda *args: returned.append(args))
        broker.channel.basic_publish(
            amqp.Message(body, delivery_mode=2, content_type="application/json"),
            exchange=PYBIT_EXCHANGE.name,
            routing_key=routing_key,
            mandatory=True,
        )
    finally:
        broker.close()
    if returned:
        raise BrokerError(f"no queue is bound to pybit with the key {routing_key!r}; nothing was queued")
    return body


def request_from_fields(fields):
    """A BuildRequest from the command line's fields (a dict)."""
    return make_request(
        job_id=fields["job_id"],
        package=fields["package"],
        version=fields["version"],
        distribution=fields["dist"],
        architecture=fields["arch"],
        suite=fields["suite"],
        format=fields["format"],
        method=fields["method"],
        uri=fields["uri"],
        vcs_id=fields["vcs_id"],
        web_host=fields["web_host"],
    )
