"""``rbit publish``: a build request published exactly as PyBit's web controller does."""

from __future__ import annotations

from .. import queues
from ..broker import Broker
from ..delivery import Outgoing
from ..pybit import BuildRequest, encode, make_request


def publish_request(amqp_settings, routing_key: str, request: BuildRequest) -> str:
    """Publish *request* through ``pybit`` with *routing_key*, persistent and mandatory.

    Like PyBit's controller, it first declares the build queue
    ``dist_arch_suite_format`` and binds it with *routing_key*, so a request
    sent before any worker has started is kept; and, like it, it sets no
    content type. Returns the body sent. Raises BrokerError when the broker
    cannot take it (Unroutable if it returns the message).
    """
    body = encode(request)
    parts = (request.get_dist(), request.get_arch(), request.get_suite(), request.get_format())
    broker = Broker(amqp_settings)
    try:
        broker.connect_once()
        broker.declare(queues.build_queue("_".join(parts), routing_key))
        broker.publish(Outgoing(body), routing_key, exchange=queues.PYBIT_EXCHANGE, mandatory=True)
    finally:
        broker.close()
    return body


def request_from_fields(fields: dict) -> BuildRequest:
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
