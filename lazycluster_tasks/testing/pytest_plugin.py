"""pytest fixtures over TestHosts.

Load with `pytest_plugins = ["lazycluster_tasks.testing.pytest_plugin"]` (root conftest or module).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from lazycluster_tasks.testing.hosts import SSHD, TestHosts

MULTIHOST_SKIP = (
    "multi-host tests need root to build network-namespace hosts (running in loopback mode)"
)


@pytest.fixture(scope="session")
def test_hosts() -> Iterator[TestHosts]:
    """The session's SSH test hosts (LCT_TEST_HOST_COUNT, default 4; 1 in loopback mode)."""
    if not os.path.exists(SSHD):
        pytest.skip(f"{SSHD} not installed (apt-get install openssh-server)")
    hosts = TestHosts(count=int(os.environ.get("LCT_TEST_HOST_COUNT", "4")))
    with hosts:
        yield hosts
        left = hosts.leftovers()  # the whole session must leave nothing on any host
        if left:
            hosts.kill_leftovers()
            pytest.fail(f"left on test hosts at the end of the session: {left}")


@pytest.fixture
def multi_hosts(test_hosts: TestHosts) -> TestHosts:
    """test_hosts, or skip when they are a single loopback host."""
    if not test_hosts.namespaced:
        pytest.skip(MULTIHOST_SKIP)
    if len(test_hosts.hosts) < 2:
        pytest.skip("multi-host tests need LCT_TEST_HOST_COUNT >= 2")
    return test_hosts


@pytest.fixture
def ssh_only(multi_hosts: TestHosts) -> Iterator[TestHosts]:
    """Hosts accept and open only SSH for the duration of the test."""
    multi_hosts.ssh_only(True)
    try:
        yield multi_hosts
    finally:
        multi_hosts.ssh_only(False)


@pytest.fixture
def no_leftovers(test_hosts: TestHosts) -> Iterator[TestHosts]:
    """Fail the test if it leaves any process on a test host (they are killed either way)."""
    yield test_hosts
    deadline = time.monotonic() + 3  # let closing sessions finish exiting
    left = test_hosts.leftovers()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = test_hosts.leftovers()
    if left:
        test_hosts.kill_leftovers()
        lines = "\n".join(f"  {name}: {proc}" for name, procs in left.items() for proc in procs)
        pytest.fail(f"left on test hosts (now removed):\n{lines}", pytrace=False)
