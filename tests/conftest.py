"""Shared fixtures: real SSH test hosts (lazycluster_tasks.testing), the session's Prefect server,
and local leak checks (the checks themselves in lazycluster_tasks.testing.leaks)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lazycluster_tasks import Environment, Runtime, RuntimeGroup
from lazycluster_tasks.dask import DaskCluster
from lazycluster_tasks.dask_launchers import RemoteMasterLauncher
from lazycluster_tasks.testing.helpers import (
    QUIET_ENV,
    cluster_on,
    fill_test_defaults,
    local_leftovers,
    ssh_runtime,
)
from lazycluster_tasks.testing.hosts import TestHosts
from lazycluster_tasks.testing.leaks import LocalState, tmp_entries, wait_tmp_clean
from lazycluster_tasks.testing.prefect_server import PrefectServer

if TYPE_CHECKING:
    from lazycluster_tasks.ssh_cluster import LazySSHCluster

pytest_plugins = ["lazycluster_tasks.testing.pytest_plugin"]

#: The session's temp dir: this process and every process it starts (TMPDIR) use it, so what a
#: test leaves is seen, and nothing of anyone else's in /tmp is ever looked at or removed.
#: Made when pytest starts (processes that import this module, e.g. to unpickle, make none).
SESSION_TMP = ""


def pytest_configure(config: pytest.Config) -> None:
    global SESSION_TMP
    # pytest-xdist workers inherit the controller's TMPDIR: each makes its own next to it (not
    # inside: socket paths below it must stay short)
    base = os.environ.setdefault("LCT_SESSION_BASE_TMP", tempfile.gettempdir())
    if not hasattr(config, "workerinput"):  # one cache of packed environments for the run
        os.environ["LAZYCLUSTER_CACHE_DIR"] = tempfile.mkdtemp(prefix="lctc", dir=base)
    SESSION_TMP = tempfile.mkdtemp(prefix="lcts", dir=base)
    os.environ["TMPDIR"] = SESSION_TMP
    tempfile.tempdir = SESSION_TMP
    # one Prefect server for the run, launched here: pytest-xdist's sessions, started after
    # this, find its port in their environment (three servers cost about 60 CPU-s more)
    controller = not hasattr(config, "workerinput") and not config.option.collectonly
    if controller and _selection_uses_prefect(config.args):
        os.environ[SHARED_PREFECT] = str(_launch_prefect().port)


def pytest_unconfigure(config: pytest.Config) -> None:
    # also after an internal error, which skips the session fixtures' teardown (seen: a
    # crashed run left its Prefect server running)
    _stop_prefect()
    if SESSION_TMP:
        shutil.rmtree(SESSION_TMP, ignore_errors=True)
    if not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ.get("LAZYCLUSTER_CACHE_DIR", ""), ignore_errors=True)


os.environ.update(QUIET_ENV)
# Clusters start without the scheduler's dashboard unless a test asks for it (the tests of the
# dashboard do): its bokeh import costs about 1 s of CPU at every start, on 2 shared cores.
os.environ.setdefault("LAZYCLUSTER_DASHBOARD", "false")
# Under pytest-xdist two sessions start clusters on this machine at once: each takes its own
# default ports (in tunnelled mode a worker's port is also bound here, for its forward).
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    _first = 63000 + 200 * int(os.environ["PYTEST_XDIST_WORKER"][2:])
    os.environ["LAZYCLUSTER_PORTS"] = f"{_first}-{_first + 199}"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


#: Fixtures of the session's Prefect server.
PREFECT_FIXTURES = {"prefect_api", "prefect_server"}
#: The run's Prefect server: launched by the pytest process when the tests it was given name
#: one of its fixtures, else by a session once its collection shows a test of it. It boots
#: (about 20 s, most of it migrating its database) while the tests before the first one run.
_prefect: PrefectServer | None = None
#: The port of the server the pytest process launched, for the pytest-xdist sessions.
SHARED_PREFECT = "LCT_PREFECT_SERVER_PORT"


def _selection_uses_prefect(args: Sequence[str]) -> bool:
    """Whether a test file among the paths pytest was given names a Prefect fixture (its text
    is read: a session whose tests were missed here launches a server of its own)."""
    for arg in args:
        path = Path(arg.split("::")[0])
        files = sorted(path.rglob("test_*.py")) if path.is_dir() else [path]
        for file in files:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                if any(name in file.read_text() for name in PREFECT_FIXTURES):
                    return True
    return False


def _launch_prefect() -> PrefectServer:
    global _prefect
    if _prefect is None:
        if os.environ.get(SHARED_PREFECT):
            _prefect = PrefectServer.at(int(os.environ[SHARED_PREFECT]))
        else:
            _prefect = PrefectServer(tempfile.mkdtemp(prefix="prefect-server", dir=SESSION_TMP))
            _prefect.launch()
    return _prefect


def _stop_prefect() -> None:
    """The server and its home (database, log) go before the session's temp dir is checked
    (a session leaves the run's shared server to the pytest process that launched it)."""
    global _prefect
    server, _prefect = _prefect, None
    if server is not None and server.owned:
        server.stop()
        shutil.rmtree(server.home, ignore_errors=True)


def pytest_collection_finish(session: pytest.Session) -> None:
    config = session.config
    runs_tests = hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("dsession")
    if not runs_tests or config.option.collectonly:
        return
    if any(PREFECT_FIXTURES & set(getattr(item, "fixturenames", ())) for item in session.items):
        _launch_prefect()


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[PrefectServer]:
    """One real `prefect server start` (API, services, UI) for the whole session."""
    try:
        yield _launch_prefect().wait_healthy()
    finally:
        _stop_prefect()


@pytest.fixture(scope="session")
def prefect_api(
    prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The session server's API URL, set for this process and for the processes it starts."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ["PREFECT_API_URL"] = prefect_server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
            yield prefect_server.api_url
            _drain_prefect_workers()
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def _drain_prefect_workers() -> None:
    """Send the logs and events still queued in this process before the server stops."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=10)


@pytest.fixture(scope="session", autouse=True)
def _no_temp_files_left() -> Iterator[None]:
    """Whatever this session's processes put in the temp dir (``SESSION_TMP``) must be gone by
    its end; pytest's own tmp_path folders are the only exception. (Test hosts have a temp dir
    of their own, checked with their processes.)"""
    yield
    _stop_prefect()  # launched for tests that this session did not run, perhaps
    left = wait_tmp_clean(SESSION_TMP, set())
    if left:
        pytest.fail(f"left in the temp dir by the session: {left}")


@pytest.fixture(autouse=True)
def _no_temp_files_left_by_the_test() -> Iterator[None]:
    """The same, test by test, so a leak names its test (test hosts made by a session fixture
    during a test are that fixture's: their own stop removes them, the session checks it)."""
    before = set(tmp_entries(SESSION_TMP))
    yield
    left = wait_tmp_clean(SESSION_TMP, before, ignore="lcth")
    if left:
        pytest.fail(f"left in the temp dir by this test: {left}")


@pytest.fixture(scope="session", autouse=True)
def _execution_logs_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    Environment.set_main_directory(str(tmp_path_factory.mktemp("lazycluster-main")))
    # running clusters' entries (client certificates) go to a folder of the session, never
    # the user's; processes the tests start inherit it
    os.environ.setdefault("LAZYCLUSTER_STATE_DIR", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def no_local_leaks() -> Iterator[None]:
    """Fail when a test leaves threads, listening sockets or file descriptors behind locally."""
    before = LocalState.take()
    yield
    before.assert_none_left()


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


#: The hosts a cluster of ``make_cluster`` runs on unless it is given others.
CLUSTER_HOSTS = ("host1", "host2", "host3")


@pytest.fixture
def make_cluster(
    multi_hosts: TestHosts, no_leftovers: TestHosts, no_local_leaks: None
) -> Iterator[Callable[..., Any]]:
    """``make_cluster(hosts=CLUSTER_HOSTS, **options)``: a cluster on the multi-host test hosts
    (one thread per worker and no nanny unless the options say otherwise: fill_test_defaults),
    closed at the end of the test.

    A LazySSHCluster; with ``cls=DaskCluster`` a DaskCluster on a RuntimeGroup of the hosts
    (``master_host``: its scheduler on that host), whose cleanup must leave no process of it on
    this machine and no tunnel on any runtime."""
    from lazycluster_tasks.ssh_cluster import LazySSHCluster  # pulls in distributed.deploy

    clusters: list[LazySSHCluster | DaskCluster] = []

    def make(
        hosts: Sequence[str] = CLUSTER_HOSTS,
        *,
        cls: type[LazySSHCluster] | type[DaskCluster] = LazySSHCluster,
        **options: Any,
    ) -> Any:
        fill_test_defaults(options)
        cluster: LazySSHCluster | DaskCluster
        if issubclass(cls, DaskCluster):
            group = RuntimeGroup(
                hosts=list(hosts), ssh_config_path=str(multi_hosts.ssh_config_path)
            )
            master_host = options.pop("master_host", None)
            if master_host:
                options["master_launcher"] = RemoteMasterLauncher(group, master_host)
            cluster = cls(group, **options)
        else:
            cluster = cluster_on(multi_hosts, hosts, cls, **options)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        if isinstance(cluster, DaskCluster):
            cluster.cleanup()
            assert local_leftovers(cluster.cluster_id) == []
            assert all(rt.tunnels == [] for rt in cluster.runtime_group.runtimes)
        else:
            cluster.close()


os.environ.setdefault("LCT_TEST_HOST_COUNT", "4")
