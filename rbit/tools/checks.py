"""``rbit --check``: the configuration, its runners and, if asked, its connections."""

import click

from ..broker import Broker
from ..errors import BrokerError


def run_checks(config, connections=False):
    """Print what the configuration serves; with *connections*, try the broker and PyBit. Return the exit status."""
    click.echo(f"{config.path}: configuration OK")
    for section in config.runners:
        timeout = f", timeout {section.timeout:g} s" if section.timeout else ""
        click.echo(f"  queue {section.queue} (key {section.routing_key}): {section.runner!r}{timeout}")
    if not connections:
        return 0
    ok = _check_broker(config) & _check_pybit(config)
    return 0 if ok else 1


def _check_broker(config):
    broker = Broker(config.amqp)
    try:
        broker.connect_once()
    except BrokerError as exc:
        click.echo(f"  {exc}", err=True)
        return False
    click.echo(f"  broker {broker.address}: connected")
    broker.close()
    return True


def _check_pybit(config):
    if config.pybit is None:
        click.echo("  PyBit: no [pybit] section; statuses are only logged")
        return True
    if config.pybit.url is None:
        click.echo("  PyBit: statuses go to each request's web_host; nothing to try")
        return True
    import requests

    from ..pybit_http import safe_url

    shown = safe_url(config.pybit.url)
    try:
        requests.get(config.pybit.url, timeout=config.pybit.timeout)
    except requests.RequestException as exc:
        click.echo(f"  PyBit {shown}: cannot connect: {type(exc).__name__}", err=True)
        return False
    click.echo(f"  PyBit {shown}: reachable")
    return True
