"""Fixtures shared by the tests: a RabbitMQ vhost, a PyBit web front end, unique names."""

import os
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


@pytest.fixture(scope="session", autouse=True)
def job_logs_of_the_session(tmp_path_factory):
    """Workers the tests start write their job logs under the session's tmp dir, not the user's
    ~/.local/state (tests.harness.WorkerProcess gives each test a directory of its own)."""
    saved = {name: os.environ.get(name) for name in ("XDG_STATE_HOME", "LOGS_DIRECTORY")}
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    os.environ.pop("LOGS_DIRECTORY", None)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
