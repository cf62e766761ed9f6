"""Test helpers for the real RabbitMQ on localhost: a vhost of the test session's own."""

import os
import shutil
import subprocess
import time
import uuid

import amqp
import pytest
from kombu import Connection

#: Where the tests find RabbitMQ.
AMQP_HOST = os.environ.get("RBIT_TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("RBIT_TEST_AMQP_PORT", "5672"))


def rabbitmqctl(*args, check=True, timeout=60):
    """Run rabbitmqctl; the tests need it (as root) for vhosts and broker restarts."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is not installed: the broker tests need RabbitMQ on localhost")
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], check=check, capture_output=True, text=True, timeout=timeout
    )


def broker_reachable():
    try:
        with Connection(f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}//", connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
        return True
    except Exception:
        return False


def wait_for_broker(timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if broker_reachable():
            return True
        time.sleep(0.5)
    return False


def require_broker():
    """Fail (never skip) when RabbitMQ is not there: CI must not pass without it."""
    if not broker_reachable():
        pytest.fail(f"RabbitMQ is not reachable at {AMQP_HOST}:{AMQP_PORT}; start it with `rabbitmq-server -detached`")


class Vhost:
    """A RabbitMQ virtual host made for the tests, with helpers to look inside it."""

    def __init__(self, name):
        self.name = name

    def url(self):
        return f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{self.name}"

    def connection(self):
        return Connection(self.url(), connect_timeout=5, transport_options={"confirm_publish": True})

    def publish_build(self, body, routing_key, **properties):
        """Publish *body* exactly as PyBit's controller does: exchange pybit, persistent, mandatory."""
        with self.connection() as conn:
            channel = conn.channel()
            channel.exchange_declare("pybit", "direct", durable=True, auto_delete=False)
            message = amqp.Message(body, delivery_mode=2, **properties)
            channel.basic_publish(message, exchange="pybit", routing_key=routing_key, mandatory=True)

    def publish_to_queue(self, body, queue, **properties):
        with self.connection() as conn:
            channel = conn.channel()
            channel.basic_publish(amqp.Message(body, delivery_mode=2, **properties), exchange="", routing_key=queue)

    def declare_build_queue(self, queue, routing_key):
        """Declare a build queue as PyBit does (so a publish before the worker starts is kept)."""
        with self.connection() as conn:
            channel = conn.channel()
            channel.exchange_declare("pybit", "direct", durable=True, auto_delete=False)
            channel.queue_declare(queue, durable=True, exclusive=False, auto_delete=False)
            channel.queue_bind(queue, "pybit", routing_key)

    def queue_info(self, queue):
        """(messages, consumers) of *queue*, or None if it does not exist."""
        with self.connection() as conn:
            channel = conn.channel()
            try:
                ok = channel.queue_declare(queue, passive=True)
            except amqp.exceptions.NotFound:
                return None
            return ok.message_count, ok.consumer_count

    def depth(self, queue):
        info = self.queue_info(queue)
        return 0 if info is None else info[0]

    def get(self, queue):
        """Take one message off *queue* (acknowledged), or None."""
        with self.connection() as conn:
            channel = conn.channel()
            message = channel.basic_get(queue, no_ack=True)
            return message

    def wait_depth(self, queue, depth, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.depth(queue) == depth:
                return True
            time.sleep(0.1)
        return False

    def wait_consumers(self, queue, consumers, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.queue_info(queue)
            if info is not None and info[1] == consumers:
                return True
            time.sleep(0.1)
        return False


def make_vhost():
    require_broker()
    name = f"rbit-test-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return Vhost(name)


def drop_vhost(vhost):
    rabbitmqctl("delete_vhost", vhost.name, check=False)
