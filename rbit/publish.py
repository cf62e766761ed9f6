"""Publishing a build request exactly as PyBit's web controller does, to try a worker without PyBit."""

import amqp

from .broker import PYBIT_EXCHANGE, Broker, build_queue
from .errors import BrokerError
from .pybit import encode, make_request


def publish_request(amqp_settings, routing_key, request):
    """Publish *request* through ``pybit`` with *routing_key*, persistent and mandatory.

    Like PyBit's controller, it first declares the build queue
    ``dist_arch_suite_format`` and binds it with *routing_key*, so a request
    sent before any worker has started is kept; and, like it, it sets no
    content type. Returns the body sent. Raises BrokerError when the broker
    returns the message anyway (it could not route it).
    """
    body = encode(request)
    parts = (request.get_dist(), request.get_arch(), request.get_suite(), request.get_format())
    queue = build_queue("_".join(parts), routing_key)
    broker = Broker(amqp_settings)
    returned = []
    try:
        broker.connect_once()
        queue(broker.channel).declare()
        broker.channel.events["basic_return"].add(lambda *args: returned.append(args))
        broker.channel.basic_publish(
            amqp.Message(body, delivery_mode=2),
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
