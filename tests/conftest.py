"""Shared fixtures: real SSH test hosts (lazycluster_tasks.testing) and local leak checks."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from lazycluster_tasks import Environment, Runtime, RuntimeGroup
from lazycluster_tasks.testing.hosts import TestHosts

pytest_plugins = ["lazycluster_tasks.testing.pytest_plugin"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET_ENV = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
os.environ.update(QUIET_ENV)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Prefect API for the whole session (a test server: ~15 s to start)."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


TEMP_PATTERNS = ("lazycluster-*", "lct-*")


def _temp_entries() -> set[str]:
    import glob
    import tempfile

    base = tempfile.gettempdir()
    return {p for pattern in TEMP_PATTERNS for p in glob.glob(os.path.join(base, pattern))}


@pytest.fixture(scope="session", autouse=True)
def _no_temp_folders_left() -> Iterator[None]:
    """The whole session must leave no folder of ours in the temp dir (hosts share it)."""
    before = _temp_entries()
    yield
    deadline = time.monotonic() + 5
    left = _temp_entries() - before
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _temp_entries() - before
    if left:
        import shutil

        for path in left:
            shutil.rmtree(path, ignore_errors=True)
        pytest.fail(f"temp folders left by the session (now removed): {sorted(left)}")


@pytest.fixture(scope="session", autouse=True)
def _execution_logs_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    Environment.set_main_directory(str(tmp_path_factory.mktemp("lazycluster-main")))


def _listening_ports() -> set[int]:
    me = psutil.Process()
    return {c.laddr.port for c in me.net_connections("tcp") if c.status == psutil.CONN_LISTEN}


@pytest.fixture
def no_local_leaks() -> Iterator[None]:
    """Fail when a test leaves threads, listening sockets or file descriptors behind locally."""
    me = psutil.Process()
    threads, fds, ports = set(threading.enumerate()), me.num_fds(), _listening_ports()
    yield
    deadline = time.monotonic() + 5
    while True:
        extra_threads = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
        extra_ports = _listening_ports() - ports
        extra_fds = me.num_fds() - fds
        if not (extra_threads or extra_ports or extra_fds > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not extra_threads, f"threads left running: {[t.name for t in extra_threads]}"
    assert not extra_ports, f"sockets left listening: {sorted(extra_ports)}"
    assert extra_fds <= 0, f"{extra_fds} file descriptors leaked"


def ssh_runtime(hosts: TestHosts, name: str = "host1", **kwargs) -> Runtime:
    return Runtime(name, ssh_config_path=str(hosts.ssh_config_path), **kwargs)


@pytest.fixture
def host1(
    test_hosts: TestHosts, no_leftovers: TestHosts, no_local_leaks: None
) -> Iterator[Runtime]:
    """A Runtime on test host 1, cleaned up after the test."""
    runtime = ssh_runtime(test_hosts)
    try:
        yield runtime
    finally:
        runtime.cleanup()


@pytest.fixture
def group(multi_hosts, no_leftovers, no_local_leaks):
    """A RuntimeGroup of every test host, cleaned up after the test."""
    g = RuntimeGroup(runtimes=[ssh_runtime(multi_hosts, h.name) for h in multi_hosts.hosts])
    try:
        yield g
    finally:
        g.cleanup()


@pytest.fixture(params=["local", "ssh"])
def any_runtime(request: pytest.FixtureRequest) -> Iterator[Runtime]:
    """The same test on the local runtime and on an SSH test host."""
    request.getfixturevalue("no_local_leaks")
    if request.param == "local":
        runtime = Runtime("localhost")
    else:
        hosts = request.getfixturevalue("test_hosts")
        request.getfixturevalue("no_leftovers")
        runtime = ssh_runtime(hosts)
    try:
        yield runtime
    finally:
        runtime.cleanup()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


os.environ.setdefault("LCT_TEST_HOST_COUNT", "4")
