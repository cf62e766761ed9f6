"""Telling systemd how the service is doing (``Type=notify``), in the few lines the protocol needs."""

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state, environ=None):
    """Send *state* (like ``READY=1``) to ``$NOTIFY_SOCKET``; False when not under systemd."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address.lstrip("\0"), exc)
        return False
    return True
