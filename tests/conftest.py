"""Fixtures shared by the tests: a RabbitMQ vhost, a PyBit web front end, unique names."""

import uuid

import pytest

from .broker import drop_vhost, make_vhost
from .pybit_web import pybit_web  # noqa: F401  (a fixture)


@pytest.fixture(scope="session")
def vhost():
    """A vhost of this test session's own on the real broker; tests add unique queue names."""
    made = make_vhost()
    yield made
    drop_vhost(made)


@pytest.fixture
def unique():
    """A short token that makes this test's worker name and queue names its own."""
    return uuid.uuid4().hex[:8]
