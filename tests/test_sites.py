"""Clusters in networks built as sites build them: which paths are open x how closed ports
answer. In each, ``auto`` must pick a mode that works end to end and leave nothing behind."""

from __future__ import annotations

import socket

import pytest

from lazycluster_tasks import RuntimeGroup
from lazycluster_tasks.dask import DaskCluster
from lazycluster_tasks.testing.hosts import TestHosts
from tests.test_dask_cluster import local_leftovers

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

HOSTS = ["host1", "host2", "host3"]
SHAPES = [("open", "icmp")] + [
    (topology, closed)
    for topology in ("isolated", "ssh-only", "no-connect-back")
    for closed in ("drop", "reset", "icmp")
]


@pytest.mark.parametrize(("topology", "closed"), SHAPES, ids=[f"{t}-{c}" for t, c in SHAPES])
def test_auto_mode_works_end_to_end(
    multi_hosts: TestHosts,
    topology: str,
    closed: str,
    no_leftovers: TestHosts,
    no_local_leaks: None,
) -> None:
    multi_hosts.set_network(topology, closed)
    group = RuntimeGroup(hosts=HOSTS, ssh_config_path=str(multi_hosts.ssh_config_path))
    cluster = DaskCluster(group, threads_per_worker=1, nanny=False)
    try:
        cluster.start()
        assert cluster.network_mode == ("direct" if topology == "open" else "tunnelled")
        assert cluster.record()["network_paths"], "the record says which paths were measured"
        workers = cluster.workers
        at = {w["host"]: w["address"] for w in workers.values()}
        client = cluster.get_client(timeout=10)
        # made on host1, moved to host2 and checked there, then carried back here
        data = client.submit(lambda n: bytes(range(256)) * n, 4096, workers=[at["host1"]])
        seen = client.submit(
            lambda b: (socket.gethostname(), len(b), sum(b[:256])),
            data,
            workers=[at["host2"]],
            allow_other_workers=False,
        )
        assert seen.result(timeout=60) == ("host2", 256 * 4096, sum(range(256)))
        assert len(data.result(timeout=60)) == 256 * 4096
    finally:
        try:
            cluster.cleanup()
        finally:
            multi_hosts.set_network("open")
    assert local_leftovers(cluster.cluster_id) == []
