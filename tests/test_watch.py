"""A cluster lost after start becomes a clear error within a bounded time, never a hang."""

from __future__ import annotations

import os
import signal
import time

import pytest

from lazycluster_tasks import ClusterLostError, RuntimeGroup
from lazycluster_tasks.dask import DaskCluster
from lazycluster_tasks.prefect import cluster_lifecycle
from lazycluster_tasks.testing.helpers import local_leftovers
from lazycluster_tasks.testing.hosts import TestHosts
from lazycluster_tasks.watch import ClusterWatch

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

HOSTS = ["host1", "host2"]


@pytest.mark.parametrize("closed", ["drop", "reset"])
def test_a_path_cut_mid_run_ends_the_computation_with_the_reason(
    multi_hosts: TestHosts, closed: str, no_leftovers: TestHosts, no_local_leaks: None
) -> None:
    group = RuntimeGroup(hosts=HOSTS, ssh_config_path=str(multi_hosts.ssh_config_path))
    cluster = DaskCluster(group, threads_per_worker=1, nanny=False, network_mode="direct")
    try:
        cluster.start()
        client = cluster.get_client(timeout=10)
        work = client.map(lambda x: time.sleep(0.5) or x, range(200), pure=False)
        lost: list[str] = []
        with ClusterWatch(cluster, on_lost=lambda why: (lost.append(why), cluster.stop_master())):
            time.sleep(1)
            multi_hosts.set_network("ssh-only", closed, cut_established=True)
            start = time.monotonic()
            with pytest.raises(Exception):  # noqa: B017 - Dask's own cancellation error
                client.gather(work)
            elapsed = time.monotonic() - start
        assert lost and any(w in lost[0] for w in ("heartbeat", "cannot reach", "gone")), lost
        assert "host" in lost[0]
        print(f"{closed}: computation ended {elapsed:.1f} s after the cut: {lost[0]}")
        assert elapsed < 30
    finally:
        multi_hosts.set_network("open")
        cluster.cleanup()
    assert local_leftovers(cluster.cluster_id) == []


def test_the_watch_finds_nothing_on_a_healthy_cluster_and_a_lost_scheduler(
    multi_hosts: TestHosts, no_leftovers: TestHosts, no_local_leaks: None
) -> None:
    group = RuntimeGroup(hosts=HOSTS, ssh_config_path=str(multi_hosts.ssh_config_path))
    cluster = DaskCluster(group, threads_per_worker=1, nanny=False)
    try:
        cluster.start()
        watch = ClusterWatch(cluster)
        assert watch.check() is None
        watch.deadline = time.monotonic() - 1
        assert watch.check() == "the job ran past its timeout"
        watch.deadline = None
        # a scheduler that answers nothing for a while (here: stopped) is busy, not lost,
        # until the limit has passed; then it is lost
        busy = ClusterWatch(cluster, unanswered_limit=4)
        info = cluster.engine.scheduler_process
        assert info is not None
        scheduler = info.pid
        os.killpg(scheduler, signal.SIGSTOP)
        try:
            assert busy.check() is None  # took the question's 5 s
            assert "does not answer" in (busy.check() or "")
        finally:
            os.killpg(scheduler, signal.SIGCONT)
        assert busy.check() is None  # answers again
        cluster.stop_master()
        assert "scheduler" in (watch.check() or "")
    finally:
        cluster.cleanup()


def slow_job(cluster, seconds: float) -> int:
    client = cluster.client
    return sum(client.gather(client.map(lambda x: time.sleep(seconds) or x, range(100))))


def test_lifecycle_timeout_fails_the_run_with_the_reason(
    multi_hosts: TestHosts, prefect_api: str, no_leftovers: TestHosts
) -> None:
    start = time.monotonic()
    state = cluster_lifecycle(
        job=slow_job,
        hosts=HOSTS,
        ssh_config_path=str(multi_hosts.ssh_config_path),
        job_parameters={"seconds": 2.0},
        timeout_seconds=3,
        return_state=True,
    )
    assert time.monotonic() - start < 60
    assert state.is_failed()
    with pytest.raises(ClusterLostError, match="timeout"):
        state.result()
    assert multi_hosts.leftovers() == {}
