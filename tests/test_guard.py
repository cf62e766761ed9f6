"""The guard: the lifeline of job processes that became their program (shell! jobs)."""

import os
import signal
import subprocess

import pytest

from rbit import jobs
from rbit.guard import Guard
from rbit.lease import clock as lease_clock

from .harness import alive, wait_until


@pytest.fixture(scope="module")
def forks():
    server = jobs.fork_server()
    yield server
    server.close()


@pytest.fixture
def group():
    """A process group of two sleepers, as a program that started a child leaves it: (leader, child)."""
    leader = subprocess.Popen(["/bin/sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE,
                              start_new_session=True, text=True)
    child = int(leader.stdout.readline())
    yield leader, child
    try:
        os.killpg(leader.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    leader.wait(5)


def gone(leader, child):
    return leader.poll() is not None and not alive(child)


@pytest.fixture
def guard(forks, group):
    """A guard watching *group*."""
    started = Guard(forks)
    started.start()
    started.watch(group[0].pid)
    yield started
    started.close()


def worker_gone(guard):
    """What the kernel does to the guard's pipe when the worker dies."""
    guard.conn.close()
    guard.conn = None


def test_the_guard_kills_every_group_it_watches_when_the_worker_goes(guard, group):
    """The worker's end of the pipe closes (as when the worker is killed): the guard kills each
    watched group, leader and children, and ends."""
    process = guard.process
    worker_gone(guard)
    assert wait_until(lambda: gone(*group), 5), "the group outlived its worker"
    assert wait_until(lambda: process.exitcode is not None, 5)


def test_the_guard_spares_a_group_it_was_told_to_forget(guard, group):
    guard.forget(group[0].pid)
    guard.close()
    assert not wait_until(lambda: gone(*group), 1), "a forgotten group was killed"


def test_the_guard_kills_its_groups_when_the_lease_runs_out_and_not_while_it_is_renewed(guard, group):
    """While the worker renews its lease the group runs; once it stops, the group dies within
    the lease and a tick."""
    for _ in range(8):
        guard.renew(lease_clock() + 0.5)
        assert not wait_until(lambda: gone(*group), 0.2), "the group died while its lease was renewed"
    stopped = lease_clock()
    assert wait_until(lambda: gone(*group), 3), "the group outlived the lease"
    assert lease_clock() - stopped < 0.5 + 0.6
    assert guard.process.exitcode is None, "the guard waits for a new lease"


def test_a_guard_that_died_is_started_again_and_knows_every_group(guard, group):
    guard.process.kill()
    guard.process.join(5)
    guard.renew(None)  # the next word to it finds it gone: a new one starts, with what the last knew
    assert guard.process.exitcode is None
    worker_gone(guard)
    assert wait_until(lambda: gone(*group), 5), "the new guard did not know the group"
