"""The hello-world runner: the smallest complete python! runner."""

import logging

log = logging.getLogger(__name__)


def hello(message, set_status, settings):
    """Greet ``settings['name']`` (default ``World``) for the requested package."""
    request = message.request
    log.info(
        "Hello, %s! Job %s asks for %s %s on %s (queue %s).",
        settings.get("name", "World"),
        request.get_job_id(),
        request.get_package(),
        request.get_version(),
        request.get_arch(),
        message.queue,
    )
