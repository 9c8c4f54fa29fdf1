"""Clusters in networks built as sites build them: which paths are open x how closed ports
answer. In each, ``auto`` must pick a mode that works end to end and leave nothing behind."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from lazycluster_tasks import LazyclusterError, RuntimeGroup, commands
from lazycluster_tasks.dask import DaskCluster, teardown
from lazycluster_tasks.testing.hosts import TestHosts
from tests.conftest import wait_until
from tests.test_dask_cluster import CONTROLLER, local_leftovers

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

HOSTS = ["host1", "host2"]
# Every topology and every way a closed port answers, end to end (the probe alone meets the
# whole cross product in test_network.py, at a fraction of a cluster start each).
SHAPES = [
    ("open", "icmp"),
    ("isolated", "reset"),
    ("ssh-only", "drop"),
    ("ssh-only", "icmp"),
    ("no-connect-back", "reset"),
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
        assert cluster.record().network_paths, "the record says which paths were measured"
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


@pytest.mark.parametrize("allowed", ["no", "local", "remote"])
def test_a_host_whose_sshd_refuses_forwarding_is_named_when_only_ssh_is_open(
    multi_hosts: TestHosts, allowed: str, no_leftovers: TestHosts, no_local_leaks: None
) -> None:
    # hardened sites set AllowTcpForwarding: where only SSH is open the cluster needs both -L
    # and -R on every host, so the start fails, naming the host and the setting, in bounded time
    multi_hosts.set_network("ssh-only", "drop")
    multi_hosts.tcp_forwarding("host2", allowed)
    group = RuntimeGroup(hosts=HOSTS, ssh_config_path=str(multi_hosts.ssh_config_path))
    cluster = DaskCluster(group, threads_per_worker=1, nanny=False)
    try:
        began = time.monotonic()
        with pytest.raises(LazyclusterError) as info:
            cluster.start()
        assert time.monotonic() - began < 90
        # the host named with what its sshd did, not only a hint to check every host
        assert re.search(r"host2: .*(forbids|refused).*AllowTcpForwarding", str(info.value)), (
            info.value
        )
    finally:
        try:
            cluster.cleanup()
        finally:
            multi_hosts.tcp_forwarding("host2", "yes")
            multi_hosts.set_network("open")
    assert local_leftovers(cluster.cluster_id) == []


# open and isolated: the same paths as the direct and SSH-only cases for what this tests (which
# processes notice the controller is gone); their starts run in test_auto_mode_works_end_to_end
@pytest.mark.parametrize("topology", ["ssh-only", "no-connect-back"])
def test_killed_controller_leaves_nothing_in_any_topology(
    multi_hosts: TestHosts, topology: str, no_leftovers: TestHosts
) -> None:
    """Scheduler idle timeout 2 s, worker death timeout 8 s: everything gone within their sum
    and a few seconds, however the network is shaped."""
    multi_hosts.set_network(topology, "reset")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", CONTROLLER, str(multi_hosts.ssh_config_path), "auto", *HOSTS],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            record = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
            assert all(multi_hosts.processes(h) for h in HOSTS)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        start = time.monotonic()
        gone = wait_until(  # the processes leave by themselves; the folders wait for teardown
            lambda: (
                not local_leftovers(record["cluster_id"]) and not multi_hosts.leftover_processes()
            ),
            timeout=30,
        )
        elapsed = time.monotonic() - start
    finally:
        multi_hosts.set_network("open")
    print(f"{topology} ({record['network_mode']}): all gone {elapsed:.1f} s after SIGKILL")
    assert gone, (local_leftovers(record["cluster_id"]), multi_hosts.leftover_processes())
    assert elapsed < 2 + 8 + 6
    teardown(record)  # the processes are gone; their folders (and link key) go with the record
    marker = commands.peer_marker(record["cluster_id"])
    assert not any(marker in multi_hosts.authorized_keys(h) for h in HOSTS)
