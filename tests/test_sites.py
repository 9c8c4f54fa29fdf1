"""Clusters in networks built as sites build them: which paths are open x how closed ports
answer. In each, ``auto`` must pick a mode that works end to end and leave nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from lazycluster_tasks import LazyclusterError, RuntimeGroup, link_commands
from lazycluster_tasks.dask import DaskCluster, teardown
from lazycluster_tasks.record import CONTROLLER_KEY
from lazycluster_tasks.testing.helpers import DASK_CONTROLLER, local_leftovers, wait_until
from lazycluster_tasks.testing.hosts import TestHosts

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


def _folder_exists(multi_hosts: TestHosts, key: str, path: str) -> bool:
    """Whether a cluster folder is there, asked of the host that has it (this machine's here)."""
    if key == CONTROLLER_KEY:
        return os.path.exists(path)
    return multi_hosts.run_in(key, ["test", "-e", path]).wait() == 0


def _gone_after_kill(
    multi_hosts: TestHosts,
    hosts: list[str],
    cluster_id: str,
    folders: dict[str, str],
    marker: str,
) -> dict[str, float]:
    """Seconds from now until the cluster's processes, its folders (keyed as in its record)
    and the lines letting its links' keys into ``hosts`` were all gone; fails when anything
    is left after 40 s."""
    assert all(_folder_exists(multi_hosts, k, f) for k, f in folders.items())
    start = time.monotonic()
    gone: dict[str, float] = {}

    def everything_gone() -> bool:
        checks = {
            "processes": not local_leftovers(cluster_id) and not multi_hosts.leftover_processes(),
            "folders": not any(_folder_exists(multi_hosts, k, f) for k, f in folders.items()),
            "keys": not any(marker in multi_hosts.authorized_keys(h) for h in hosts),
        }
        for what, done in checks.items():
            if done:
                gone.setdefault(what, time.monotonic() - start)
        return all(checks.values())

    assert wait_until(everything_gone, timeout=40, interval=0.2), (gone, folders)
    return gone


# open: direct; ssh-only and no-connect-back: tunnelled, with host-to-host links (isolated has
# the same paths as those for what this tests: which processes notice the controller is gone)
@pytest.mark.parametrize("topology", ["open", "ssh-only", "no-connect-back"])
def test_killed_controller_leaves_nothing_in_any_topology(
    multi_hosts: TestHosts, topology: str, no_leftovers: TestHosts
) -> None:
    """Scheduler idle timeout 2 s, worker death timeout 8 s: without any teardown, every
    process, every cluster folder (TLS keys, env files, the links' keys) and every line the
    links added to authorized_keys are gone within their sum and the guards' few seconds."""
    multi_hosts.set_network(topology, "reset")
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                DASK_CONTROLLER,
                str(multi_hosts.ssh_config_path),
                "auto",
                *HOSTS,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            record = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
            marker = link_commands.peer_marker(record["cluster_id"])
            assert all(multi_hosts.processes(h) for h in HOSTS)
            if record["network_mode"] == "tunnelled":  # the link lets its key into one host
                assert wait_until(
                    lambda: any(marker in multi_hosts.authorized_keys(h) for h in HOSTS), 20
                )
            # its client has connected (until then the scheduler waits 30 s for a first one)
            time.sleep(1.5)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        folders = {key: f["folder"] for key, f in record["folders"].items()}
        gone = _gone_after_kill(multi_hosts, HOSTS, record["cluster_id"], folders, marker)
    finally:
        multi_hosts.set_network("open")
    print(f"{topology} ({record['network_mode']}): gone after SIGKILL: {gone}")
    assert max(gone.values()) < 2 + 8 + 8, gone
    assert set(teardown(record).values()) == {f"{k}: stopped" for k in record["folders"]}


#: A controller of its own with a plain LazySSHCluster (argv: ssh config, hosts), tunnelled,
#: its links up: prints its id, folders and the link marker as one JSON line (nothing saved
#: anywhere) and sleeps, to be killed.
LAZY_CONTROLLER = """
import json, sys, time
from distributed import Client
from lazycluster_tasks import LazySSHCluster, link_commands
hosts = sys.argv[2:]
cluster = LazySSHCluster(hosts, ssh_config_path=sys.argv[1], network_mode="tunnelled",
                         threads_per_worker=1, nanny=False, death_timeout=8, idle_timeout=2)
client = Client(cluster)
client.wait_for_workers(len(hosts), timeout=60)
links = cluster.engine.routing.links
links.wait()
record = cluster.record()
print(json.dumps({"cluster_id": record.cluster_id, "links_up": len(links.up),
                  "folders": {k: f.folder for k, f in record.folders.items()}}), flush=True)
time.sleep(600)
"""


def test_a_killed_lazysshcluster_controller_leaves_nothing_on_any_host(
    multi_hosts: TestHosts, no_leftovers: TestHosts
) -> None:
    """A plain LazySSHCluster, tunnelled, whose record nobody saved: after a SIGKILL of its
    controller every host ends its processes, removes its folder (the links' keys with it) and
    revokes the lines that let the links' keys in, by itself, within the timeouts' sum and the
    guards' few seconds."""
    hosts = ["host1", "host2", "host3"]
    proc = subprocess.Popen(
        [sys.executable, "-c", LAZY_CONTROLLER, str(multi_hosts.ssh_config_path), *hosts],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
        marker = link_commands.peer_marker(started["cluster_id"])
        assert started["links_up"] == 6
        assert all(marker in multi_hosts.authorized_keys(h) for h in hosts)
        time.sleep(1.5)  # the scheduler has seen its client
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    folders = started["folders"]
    assert set(folders) >= set(hosts)
    gone = _gone_after_kill(multi_hosts, hosts, started["cluster_id"], folders, marker)
    print(f"LazySSHCluster (tunnelled): gone after SIGKILL: {gone}")
    assert max(gone.values()) < 2 + 8 + 8, gone
