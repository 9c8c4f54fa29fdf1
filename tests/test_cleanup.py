"""Cleanup is honest and complete; bad input is refused; a dead scheduler shows at once."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from lazycluster_tasks import GroupError, Runtime, RuntimeGroup, processes
from lazycluster_tasks.dask import DaskCluster, teardown
from lazycluster_tasks.startup import first_error, retriable
from lazycluster_tasks.testing.helpers import local_leftovers, wait_until
from lazycluster_tasks.testing.hosts import TestHosts

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

HOSTS = ["host1", "host2"]


def cluster_on(hosts: TestHosts, names: list[str] = HOSTS, **options) -> DaskCluster:
    group = RuntimeGroup(hosts=names, ssh_config_path=str(hosts.ssh_config_path))
    return DaskCluster(group, threads_per_worker=1, nanny=False, **options)


def test_cleanup_releases_every_connection(
    multi_hosts: TestHosts, no_leftovers: TestHosts, no_local_leaks: None
) -> None:
    cluster = cluster_on(multi_hosts, network_mode="tunnelled")
    cluster.start()
    assert all(multi_hosts.sessions(h) >= 1 for h in HOSTS)
    cluster.cleanup()
    assert wait_until(lambda: all(multi_hosts.sessions(h) == 0 for h in HOSTS), timeout=5), {
        h: multi_hosts.sessions(h) for h in HOSTS
    }
    assert cluster.state == "stopped"


def test_cleanup_also_stops_a_process_whose_start_was_never_answered(
    multi_hosts: TestHosts, no_leftovers: TestHosts
) -> None:
    """A start whose answer was lost (a path cut while it ran) leaves a process of the cluster
    that is on no record: the cleanup finds it by its pid file in the cluster folder."""
    cluster = cluster_on(multi_hosts)
    cluster.start()
    try:
        host1 = cluster.engine.group.runtimes[0]
        folder = cluster.engine.folder(host1)
        argv = ["sh", "-c", "sleep 300; :", processes.folder_marker(folder)]
        (stray,) = processes.start_processes(host1, folder, [processes.ProcessSpec("stray", argv)])
        assert "stray" not in {p.name for p in cluster.record().processes}
        assert stray.pid in {p.pid for p in multi_hosts.processes("host1")}
    finally:
        cluster.cleanup()
    assert multi_hosts.processes("host1") == []  # no_leftovers checks it again, after a wait


def test_cleanup_stops_a_process_of_the_folder_that_leads_no_group_yet(
    multi_hosts: TestHosts, no_leftovers: TestHosts
) -> None:
    """A start's process between its fork and its ``setsid`` has no process group of its own:
    a cleanup right after the start's answer (a busy host) signals it alone. The old stop sent
    its signals to the group only, took the failure for a process gone and left it running."""
    cluster = cluster_on(multi_hosts)
    cluster.start()
    try:
        host1 = cluster.engine.group.runtimes[0]
        folder = cluster.engine.folder(host1)
        sleeper = shlex.join(["python3", "-c", "import time; time.sleep(300)"])
        marker = shlex.quote(processes.folder_marker(folder))
        pid, group = map(
            int,
            host1.connection.check(  # its pid and its group, as host1 sees them
                f"cd {shlex.quote(folder)} && {{ {sleeper} {marker} </dev/null >/dev/null 2>&1 "
                '& p=$!; echo "$p" >stray.pid; echo "$p" $(ps -o pgid= -p "$p"); }'
            ).split(),
        )
        assert group != pid  # a member of its starter's group only
    finally:
        cluster.cleanup()
    assert multi_hosts.processes("host1") == []


EXIT_WITHOUT_CLEANUP = """
import json, sys
from lazycluster_tasks import LazySSHCluster, RuntimeGroup
from lazycluster_tasks.dask import DaskCluster
kind, hosts, config = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
if kind == "DaskCluster":
    group = RuntimeGroup(hosts=hosts, ssh_config_path=config)
    cluster = DaskCluster(group, threads_per_worker=1)
    cluster.start()
    cluster_id = cluster.cluster_id
else:
    cluster = LazySSHCluster(hosts, ssh_config_path=config, threads_per_worker=1)
    cluster_id = cluster.engine.cluster_id
print(json.dumps(cluster_id), flush=True)
"""


@pytest.mark.parametrize("kind", ["DaskCluster", "LazySSHCluster"])
def test_a_program_that_exits_without_cleanup_leaves_nothing_behind(
    multi_hosts: TestHosts, no_leftovers: TestHosts, kind: str
) -> None:
    """The cleanup at exit (ours for DaskCluster, distributed's for a SpecCluster) runs while
    the interpreter exits, when executors take no more work: it fans out on threads of its
    own, and every host is clean once the program has ended, with no wait."""
    argv = [sys.executable, "-c", EXIT_WITHOUT_CLEANUP, kind, ",".join(HOSTS)]
    ran = subprocess.run(
        [*argv, str(multi_hosts.ssh_config_path)], capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    cluster_id = json.loads(ran.stdout.splitlines()[-1])
    assert "failed" not in ran.stderr and "cannot schedule" not in ran.stderr, ran.stderr[-3000:]
    assert multi_hosts.leftovers() == {}
    assert local_leftovers(cluster_id) == []


def test_a_host_that_cannot_be_cleaned_keeps_its_processes_on_record(
    multi_hosts: TestHosts, no_leftovers: TestHosts
) -> None:
    cluster = cluster_on(multi_hosts, workers_per_host=2)
    cluster.start()
    on_host2 = {p.name for p in cluster.record().processes if p.host == "host2"}
    assert len(on_host2) == 2
    # frozen, host2's workers cannot notice the scheduler going away and leave by themselves
    for pid in [p.pid for p in cluster.record().processes if p.host == "host2"]:
        assert multi_hosts.run_in("host2", ["kill", "-STOP", "--", f"-{pid}"]).wait() == 0
    assert multi_hosts.kill_sessions("host2") >= 1  # the cluster's connection is cut
    multi_hosts.stop_sshd("host2")  # and cannot come back
    try:
        with pytest.raises(GroupError) as info:
            cluster.cleanup()
        assert list(info.value.errors) == ["host2"]
        assert cluster.state == "cleanup failed"
        kept = cluster.record().core()
        assert {p["name"] for p in kept["processes"]} == on_host2  # host1's are verified gone
        assert multi_hosts.processes("host1") == []
        frozen = [p for p in multi_hosts.processes("host2") if p.status() == "stopped"]
        assert len(frozen) == 2  # really still there (its guard too, waiting for them)
        with pytest.raises(GroupError):  # the record alone cannot claim success either
            teardown(kept)
    finally:
        multi_hosts.start_sshd("host2")
    cluster.cleanup()  # now it can: the processes it kept are stopped and verified
    assert cluster.state == "stopped"
    assert multi_hosts.processes("host2") == []
    assert local_leftovers(cluster.cluster_id) == []
    folders = [f["working_dir"] for f in kept["folders"].values() if f["temporary"]]
    assert folders and not any(os.path.exists(f) for f in folders)


def test_a_cleanup_that_cannot_remove_a_folder_names_the_host_and_a_retry_ends_it(
    multi_hosts: TestHosts, no_leftovers: TestHosts
) -> None:
    """The processes stop, but the folder stays (read-only there): the cleanup is an error for
    that host, not a success, and keeps its record; once it can, a retry removes the folder."""
    cluster = cluster_on(multi_hosts)
    cluster.start()
    host2 = cluster.engine.group.get_runtime("host2")
    working_dir = host2.working_dir  # temporary: the cleanup removes all of it
    readonly = ["mount", "--bind", "-o", "ro", working_dir, working_dir]
    assert multi_hosts.run_in("host2", readonly).wait() == 0
    try:
        with pytest.raises(GroupError, match="Read-only file system") as info:
            cluster.cleanup()
        assert list(info.value.errors) == ["host2"]
        assert cluster.state == "cleanup failed"
        assert multi_hosts.processes("host2") == []  # stopped all the same
        assert multi_hosts.run_in("host2", ["test", "-d", working_dir]).wait() == 0
    finally:
        assert multi_hosts.run_in("host2", ["umount", working_dir]).wait() == 0
    cluster.cleanup()
    assert cluster.state == "stopped"
    assert multi_hosts.run_in("host2", ["test", "-e", working_dir]).wait() != 0


def test_a_dead_scheduler_shows_within_seconds(
    multi_hosts: TestHosts, no_leftovers: TestHosts
) -> None:
    cluster = cluster_on(multi_hosts)
    try:
        cluster.start()
        assert cluster.state == "running" and len(cluster.workers) == 2
        scheduler = next(p for p in cluster.record().processes if p.name == "scheduler")
        os.killpg(scheduler.pid, 9)
        start = time.monotonic()
        assert wait_until(lambda: cluster.state == "failed", timeout=10)
        assert cluster.workers == {}
        assert time.monotonic() - start < 10
        assert "scheduler" in (cluster.failure or "")
    finally:
        cluster.cleanup()


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"workers_per_host": 0}, "workers_per_host"),
        ({"workers_per_host": -1}, "workers_per_host"),
        ({"workers_per_host": 1.5}, "workers_per_host"),
        ({"threads_per_worker": 0}, "threads_per_worker"),
        ({"death_timeout": 0}, "death_timeout"),
        ({"network_mode": "fast"}, "network_mode"),
        ({"env": {"A\nB": "x"}}, "env name"),
    ],
)
def test_bad_options_are_refused_by_name(options: dict, name: str) -> None:
    group = RuntimeGroup(runtimes=[Runtime("localhost")])
    with pytest.raises(ValueError, match=name):
        DaskCluster(group, **options)


def test_bad_counts_and_paths_are_refused_by_name(no_local_leaks: None) -> None:
    cluster = DaskCluster(RuntimeGroup(runtimes=[Runtime("localhost")]))
    with pytest.raises(ValueError, match="worker_count"):
        cluster.start(worker_count=-1)
    with pytest.raises(ValueError, match="n must be"):
        cluster.scale(-2)
    with pytest.raises(ValueError, match="control character"):
        Runtime("localhost", working_dir="/tmp/a\nb")
    with pytest.raises(ValueError, match="control character"):
        RuntimeGroup(runtimes=[Runtime("localhost")], working_dir="/tmp/x\ty")
    cluster.cleanup()


def test_a_failed_worker_reports_its_first_error() -> None:
    log = (
        "2026-11-29 INFO - Start Nanny at: 'tcp://10.0.0.2:60002'\n"
        "Traceback (most recent call last):\n"
        "OSError: Timed out trying to connect to tcp://127.0.0.1:8786 after 30 s\n"
        "The above exception was the direct cause of the following exception:\n"
        "RuntimeError: Nanny failed to start.\n"
    )
    assert first_error(log) == (
        "OSError: Timed out trying to connect to tcp://127.0.0.1:8786 after 30 s"
    )
    assert first_error("all fine\n") is None


def test_workers_that_lost_their_first_connection_are_started_again() -> None:
    dropped = "INFO - Start worker\ntornado.iostream.StreamClosedError: Stream is closed\n"
    raced = "INFO - x\nOSError: [Errno 98] Address already in use\n"
    broken = "ModuleNotFoundError: No module named 'distributed'\n"
    assert retriable(dropped) and retriable(raced) and not retriable(broken)
    tls = "ssl.SSLEOFError: [SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation\n"
    assert retriable("INFO - Start worker\n" + tls)  # the TLS handshake's end of a drop
    assert retriable("INFO - Start Nanny\nAssertionError: Status.starting\n")


def test_a_client_whose_scheduler_connection_failed_is_still_closed(
    no_local_leaks: None, tmp_path
) -> None:
    """distributed's close() re-raises the error that ended a client's reader of the
    scheduler's messages (seen in a full run: a TLS reconnect, "IOStream is not idle"); the
    client stayed half open with its IO thread, and its __del__ later closed it again."""
    import dask
    from distributed import LocalCluster

    from lazycluster_tasks.clients import Clients

    with (
        dask.config.set({"temporary-directory": str(tmp_path)}),
        LocalCluster(n_workers=0, processes=False, dashboard_address=None) as local,
    ):
        clients = Clients(lambda: local.scheduler_address)
        client = clients.new(timeout=10)

        async def reader_failed() -> None:
            raise ValueError("IOStream is not idle; cannot convert to SSL")

        async def replace_reader() -> None:
            import asyncio

            task = asyncio.ensure_future(reader_failed())
            await asyncio.wait([task])
            client._handle_report_task = task

        client.sync(replace_reader)
        with pytest.raises(ValueError, match="not idle"):
            client.close(timeout=2)  # what distributed does alone
        clients.close()
        assert client.status == "closed"
