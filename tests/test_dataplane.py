"""The tunnelled data plane: worker traffic between hosts over host-to-host SSH links where a
host reaches another's sshd, through this machine where it does not; forwards grow with the
workers, not with workers x hosts; nothing (no process, no authorized key) left after."""

from __future__ import annotations

import calendar
import contextlib
import functools
import logging
import posixpath
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
from distributed import Client

from lazycluster_tasks import link_commands, processes
from lazycluster_tasks import links as links_module
from lazycluster_tasks.group import RuntimeGroup
from lazycluster_tasks.hostside import authorized_keys
from lazycluster_tasks.runtime import Runtime
from lazycluster_tasks.ssh_cluster import LazySSHCluster
from lazycluster_tasks.testing.helpers import links_set_up, wait_until
from lazycluster_tasks.testing.hosts import TestHosts

pytestmark = [pytest.mark.multihost]

HOSTS = ["host1", "host2", "host3"]
MIB = 16


# lambdas: pickled by value (a module function would be imported by name on the workers)
_block = lambda n: __import__("random").Random(7).randbytes(n)  # noqa: E731
_sha = lambda data: __import__("hashlib").sha256(data).hexdigest()  # noqa: E731


def _link_master(cluster: LazySSHCluster, name: str | None) -> psutil.Process:
    """The ssh process of link process ``name`` (the hosts share our PID space)."""
    assert name is not None
    master = psutil.Process(cluster.engine.table[name].pid)
    assert master.name() == "ssh"
    return master


def _tunnelled(hosts: TestHosts, names: list[str], **options: Any) -> LazySSHCluster:
    """A tunnelled cluster of one single-threaded worker per host."""
    return LazySSHCluster(
        names,
        ssh_config_path=str(hosts.ssh_config_path),
        network_mode="tunnelled",
        threads_per_worker=1,
        **options,
    )


def _bytes_through(cluster: LazySSHCluster, name: str | None) -> int:
    """Bytes the ssh process of link ``name`` has moved (its read + write counters)."""
    io = _link_master(cluster, name).io_counters()
    return int(io.read_chars + io.write_chars)


@pytest.mark.parametrize("site", ["links", "blocked", "central-keys"])
def test_worker_traffic_takes_host_to_host_links_where_hosts_reach_each_others_sshd(
    multi_hosts: TestHosts,
    no_leftovers: TestHosts,
    no_local_leaks: None,
    site: str,
    caplog,
    monkeypatch,
) -> None:
    caplog.set_level(logging.INFO, logger="lazycluster_tasks.links")
    # checks and tries to reopen a lost link every second (5 s by default)
    monkeypatch.setattr(links_module, "CHECK_INTERVAL", 1.0)
    monkeypatch.setattr(links_module, "REOPEN_PAUSE", (1.0, 60.0))
    multi_hosts.set_network("ssh-only", "drop")
    if site == "blocked":  # only this machine may open SSH to the hosts
        for h in HOSTS:
            multi_hosts.restrict_ssh(h, ["controller"])
    if site == "central-keys":  # sshd reads no ~/.ssh/authorized_keys: the link key is refused
        multi_hosts.user_keys(False)
    hosts_reach_sshd = site == "links"
    cluster = LazySSHCluster(
        HOSTS,
        ssh_config_path=str(multi_hosts.ssh_config_path),
        network_mode="tunnelled",
        threads_per_worker=1,
    )
    marker = link_commands.peer_marker(cluster.engine.cluster_id)
    try:
        with Client(cluster) as client:
            links = links_set_up(cluster, client, 3, timeout=30)
            pairs = {(a, b) for a in HOSTS for b in HOSTS if a != b}
            workers = client.scheduler_info(n_workers=-1)["workers"]
            on = {str(w["name"]).split("-")[0]: a for a, w in workers.items()}  # host -> worker
            runtimes = cluster.engine.group.runtimes
            kinds = [t.kind for rt in runtimes for t in rt.tunnels]
            if hosts_reach_sshd:
                assert set(links.up) == pairs and not links.down, links.down
                assert all(marker in multi_hosts.authorized_keys(h) for h in HOSTS)
                # this machine: -L per worker and nanny, -R of the scheduler per host; no -R of
                # a worker port (those are the links' -L on the hosts, one per worker per host)
                assert kinds.count("-L") == 2 * len(on) and kinds.count("-R") == len(HOSTS)
                assert links.summary()["link_forwards"] == len(pairs)
                # one link per pair of hosts: host2's traffic to host1 takes the link host1
                # dialled (a -R forward on it)
                pair = ("host2", "host1")
                dialler, far = links.link_of(pair) or pair
                assert links.link_of(pair[::-1]) == (dialler, far)
                first = links.process(pair)
                assert first == f"link-{dialler}-{far}"
                before = _bytes_through(cluster, first)
            else:  # no link can log in (port closed, key not read): every pair named and
                # routed through here
                assert set(links.down) == pairs and not links.up
                assert "link host1 -> host2 not up" in caplog.text
                assert kinds.count("-R") == len(HOSTS) + len(pairs), (
                    [rt.tunnels for rt in runtimes],
                    sorted(str(w["name"]) for w in workers.values()),
                )
            data = client.submit(_block, MIB << 20, workers=[on["host1"]], pure=False)
            seen = [
                client.submit(_sha, data, workers=[on[h]], allow_other_workers=False, pure=False)
                for h in ("host2", "host3")
            ]
            assert client.gather(seen) == [_sha(_block(MIB << 20))] * 2
            if hosts_reach_sshd:  # the bytes crossed the link of host1 and host2
                assert _bytes_through(cluster, first) - before >= MIB << 20
                # that link's master ends while running, and its host cannot dial the other
                # for a while: the health check finds it, its routes go through this machine
                # again and the link is dialled again, in vain until the path is back
                third_host = ({"host1", "host2", "host3"} - {dialler, far}).pop()
                multi_hosts.restrict_ssh(far, ["controller", third_host])
                _link_master(cluster, first).kill()
                assert wait_until(lambda: pair in links.down, timeout=20)
                assert links.down[pair].startswith("link lost")
                assert links.down[pair[::-1]].startswith("link lost")  # one link, both ways
                # logged right after the state changes (as "up again" below)
                lost = f"link {dialler} -> {far} lost"
                assert wait_until(lambda: lost in caplog.text, 10), caplog.text[-2000:]
                again = client.submit(_block, MIB << 20, workers=[on["host1"]], pure=False)
                moved = client.submit(
                    _sha, again, workers=[on["host2"]], allow_other_workers=False, pure=False
                )
                assert moved.result(timeout=60) == _sha(_block(MIB << 20))
                reopened = f"{dialler} -> {far} not reopened"
                assert wait_until(lambda: reopened in caplog.text, 20)
                # the path is back: the link is up again and carries the route once more
                multi_hosts.restrict_ssh(far, None)
                assert wait_until(lambda: pair in links.up, timeout=30), links.down.get(pair)
                # said right after the state changes: the log line may follow a moment later
                upped = f"link {dialler} -> {far} up again"
                assert wait_until(lambda: upped in caplog.text, 10), caplog.text[-2000:]
                name = links.process(pair)
                assert name != first  # a new master
                _fetch_crosses(cluster, client, on, name)
    finally:
        try:
            cluster.close()
        finally:
            for h in HOSTS:
                multi_hosts.restrict_ssh(h, None)
            multi_hosts.set_network("open")
            if site == "central-keys":
                multi_hosts.user_keys(True)
    assert not any(marker in multi_hosts.authorized_keys(h) for h in HOSTS)
    assert not [t for t in threading.enumerate() if t.name == "lct-links"]


def test_the_links_are_set_up_after_the_starts_readiness_check(
    multi_hosts: TestHosts, no_leftovers: TestHosts, monkeypatch
) -> None:
    """A start's readiness check runs before the links' set-up begins (their handshakes would
    take the hosts' CPUs from it; its paths go through this machine meanwhile), and the links
    come up right after it."""
    from lazycluster_tasks.engine import Engine

    multi_hosts.set_network("ssh-only", "drop")
    events: list[str] = []
    real_verify, real_start = Engine.verify_paths, links_module.Links.start

    def verify(engine: Engine, timeout: float | None = None) -> None:
        events.append("check")
        real_verify(engine, timeout)
        events.append("checked")

    def start(links: links_module.Links) -> None:
        events.append("links")
        real_start(links)

    monkeypatch.setattr(Engine, "verify_paths", verify)
    monkeypatch.setattr(links_module.Links, "start", start)
    cluster = _tunnelled(multi_hosts, HOSTS)
    try:
        assert events[:3] == ["check", "checked", "links"], events
        links = cluster.engine.routing.links
        assert links is not None
        links.wait()
        assert len(links.up) == len(HOSTS) * (len(HOSTS) - 1), links.down
    finally:
        cluster.close()


def test_on_demand_a_pairs_link_is_dialled_when_its_workers_first_talk(
    multi_hosts: TestHosts, no_leftovers: TestHosts, no_local_leaks: None, caplog
) -> None:
    """With many hosts (or host_links="on-demand") no link is dialled at the set-up: the
    first connection between two hosts' workers, through this machine's relay, dials their
    link, the later ones take it, and the other pairs stay unlinked."""
    caplog.set_level(logging.INFO, logger="lazycluster_tasks.links")
    multi_hosts.set_network("ssh-only", "drop")
    cluster = _tunnelled(multi_hosts, HOSTS, host_links="on-demand")
    marker = link_commands.peer_marker(cluster.engine.cluster_id)
    try:
        with Client(cluster) as client:
            links = links_set_up(cluster, client, 3, timeout=30)
            assert not links.up and set(links.down.values()) == {"not needed yet"}
            assert not any(marker in multi_hosts.authorized_keys(h) for h in HOSTS)
            workers = client.scheduler_info(n_workers=-1)["workers"]
            on = {str(w["name"]).split("-")[0]: a for a, w in workers.items()}
            data = client.submit(_block, MIB << 20, workers=[on["host1"]], pure=False)
            seen = client.submit(
                _sha, data, workers=[on["host2"]], allow_other_workers=False, pure=False
            )
            assert seen.result(timeout=60) == _sha(_block(MIB << 20))  # through the relay
            pair = ("host1", "host2")
            assert wait_until(lambda: pair in links.up and pair[::-1] in links.up, 30), links.down
            assert set(links.up) == {pair, pair[::-1]}  # host3's pairs: nobody talked
            assert "dialled: its hosts' workers talk" in caplog.text
            assert marker in multi_hosts.authorized_keys(links.link_of(pair)[1])
            # the next fetch between them crosses the link
            assert wait_until(lambda: links.summary()["link_forwards"] >= 1, 10)
            _fetch_crosses(cluster, client, on, links.process(pair))
    finally:
        try:
            cluster.close()
        finally:
            multi_hosts.set_network("open")
    assert not any(marker in multi_hosts.authorized_keys(h) for h in HOSTS)


def _slow_to_send(n: int, pause: float) -> Any:
    """``n`` bytes that take ``pause`` seconds to send (their pickling waits, on the sending
    worker, while the fetch's connection is in use), made on a worker that notes each time it
    made them (event "made"). The fetching worker gets the bytes."""
    import os
    import time

    from distributed import get_worker

    class SlowToSend:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def __reduce__(self) -> Any:
            time.sleep(pause)
            return (bytes, (self.data,))

    get_worker().log_event("made", n)
    return SlowToSend(os.urandom(n))


def test_a_fetch_under_way_when_its_link_comes_up_finishes_and_the_next_takes_the_link(
    multi_hosts: TestHosts, no_leftovers: TestHosts, no_local_leaks: None, caplog
) -> None:
    """On demand, the first fetch between two hosts' workers goes through this machine's
    relay and dials their link, which comes up while it runs. Its connection goes on through
    the relay to its end (it was cut when the routes moved: Dask took the data for lost and
    fetched it again), then the worker closes it, and the next fetch takes the link."""
    caplog.set_level(logging.INFO, logger="lazycluster_tasks.links")
    multi_hosts.set_network("ssh-only", "drop")
    cluster = _tunnelled(multi_hosts, HOSTS, host_links="on-demand")
    try:
        with Client(cluster) as client:
            links = links_set_up(cluster, client, 3, timeout=30)
            workers = client.scheduler_info(n_workers=-1)["workers"]
            on = {str(w["name"]).split("-")[0]: a for a, w in workers.items()}
            # the link is dialled as the fetch connects, and up within about a second
            data = client.submit(_slow_to_send, MIB << 20, 5.0, workers=[on["host1"]], pure=False)
            got = client.submit(len, data, workers=[on["host2"]], allow_other_workers=False)
            assert got.result(timeout=60) == MIB << 20
            pair = ("host1", "host2")
            assert pair in links.up, links.down
            upped = [
                r.created for r in caplog.records if "link host1 -> host2 up" in r.getMessage()
            ]
            log = client.run(
                lambda dask_worker: [dict(t) for t in dask_worker.transfer_incoming_log],
                workers=[on["host2"]],
            )[on["host2"]]
            (fetch,) = [t for t in log if data.key in t["keys"]]
            assert upped and fetch["start"] < upped[0] < fetch["stop"], (upped, fetch)
            assert len(client.get_events("made")) == 1  # made once: never taken for lost
            _fetch_crosses(cluster, client, on, links.process(pair))
    finally:
        try:
            cluster.close()
        finally:
            multi_hosts.set_network("open")


def test_each_dialling_host_has_its_own_key_let_in_from_its_own_addresses_and_logged(
    multi_hosts: TestHosts, no_leftovers: TestHosts, no_local_leaks: None, caplog
) -> None:
    """Every cluster line in a host's authorized_keys lets in the key of the one host that
    dials it (its private half in that host's folder only), from that host's address only; one
    log line per host names the file and the keys' comments when they are added, and again
    when they are removed."""
    caplog.set_level(logging.INFO, logger="lazycluster_tasks")
    cluster = LazySSHCluster(
        HOSTS,
        ssh_config_path=str(multi_hosts.ssh_config_path),
        network_mode="tunnelled",
        threads_per_worker=1,
        nanny=False,
    )
    marker = link_commands.peer_marker(cluster.engine.cluster_id)
    address = {h: multi_hosts.host(h).address for h in HOSTS}
    try:
        with Client(cluster) as client:
            links = links_set_up(cluster, client, 3)
            assert len(links.up) == 6, links.down
            keys: dict[str, set[str]] = {}  # dialling host -> the public keys let in for it
            comments: dict[str, list[str]] = {}  # host -> the comments of its lines
            for host in HOSTS:
                for line in multi_hosts.authorized_keys(host).splitlines():
                    if marker not in line:
                        continue
                    options, _, blob, comment = line.split()
                    dialler = comment.split("/", 1)[1].split("@")[0]
                    assert comment == link_commands.key_comment(marker, dialler, host)
                    assert links.link_of((dialler, host)) == (dialler, host)
                    sources = options.split('from="', 1)[1].split('"')[0].split(",")
                    assert sources == [address[dialler]], (host, line)
                    keys.setdefault(dialler, set()).add(blob)
                    comments.setdefault(host, []).append(comment)
            assert sorted(keys) == HOSTS  # each host dials one other here (a ring of 3)
            assert all(len(blobs) == 1 for blobs in keys.values()), keys
            assert len(set().union(*keys.values())) == len(HOSTS)  # one key per dialling host
            for rt in cluster.engine.group.runtimes:  # its own key, in its own folder
                path = posixpath.join(cluster.engine.folder(rt), links_module.KEY_FILE)
                public = rt.connection.check(f"ssh-keygen -y -f {shlex.quote(path)}").split()
                assert {public[1]} == keys[rt.host]
    finally:
        cluster.close()
    assert not any(marker in multi_hosts.authorized_keys(h) for h in HOSTS)
    for host, named in comments.items():
        said = ", ".join(sorted(named))
        added = [r for r in caplog.messages if r.startswith(f"{host}: added ")]
        removed = [r for r in caplog.messages if r.startswith(f"{host}: removed ")]
        assert len(added) == 1 and len(removed) == 1, (added, removed)
        assert added[0].startswith(f"{host}: added {said} to /")
        assert added[0].split(" (")[0].endswith("/.ssh/authorized_keys"), added
        path = added[0].split(" to ")[1].split(" (")[0]
        # by the host's guard, on the stop's TERM (no interpreter started for the edit)
        assert removed[0] == f"{host}: removed {said} from {path} (by its guard)"


#: Host -> the ports bare links' keys may carry to it (a cluster's: its workers' and the next
#: ones there), ten each.
LINK_PORTS = {f"host{i}": range(29290 + 10 * i, 29300 + 10 * i) for i in range(1, 9)}
HOST1_PORT, HOST2_PORT = LINK_PORTS["host1"][5], LINK_PORTS["host2"][5]


@contextlib.contextmanager
def _bare_links(
    hosts: TestHosts,
    group: RuntimeGroup,
    folder: Callable[[Runtime], str],
    marker: str,
    guarded: bool = False,
    key_lifetime: float = links_module.KEY_LIFETIME,
) -> Iterator[links_module.Links]:
    """Links over ``group`` without a cluster (``guarded``: each host's guard starts with its
    masters); on exit their masters are stopped, the keys revoked and the group cleaned up."""
    guard = processes.Guard(sys.executable, marker) if guarded else None
    links = links_module.Links(
        group.runtimes,
        {h.name: h.address for h in hosts.hosts},
        folder,
        marker,
        lambda *_: None,
        python=lambda rt: sys.executable,
        guard=(lambda rt: guard) if guard is not None else None,
        ports=lambda: LINK_PORTS,
        key_lifetime=key_lifetime,
    )
    for rt in group.runtimes:  # as a cluster's: the keys are let in while its folders exist
        rt.connection.check(f"mkdir -p {shlex.quote(folder(rt))}")
    try:
        yield links
    finally:
        links.close()
        revoke = processes.Revoke(sys.executable, marker)
        for rt in group.runtimes:  # as a cluster's cleanup: every pid file in the folder
            assert processes.stop_folder(rt, folder(rt), 0.3, folder(rt), revoke) == []
        group.cleanup()


def test_links_come_up_under_a_folder_deeper_than_a_socket_path_allows(
    multi_hosts: TestHosts, no_leftovers: TestHosts
) -> None:
    """A cluster folder longer than a socket address (108 bytes): the control sockets are
    named relative to it, so the links still come up."""
    group = RuntimeGroup(hosts=["host1", "host2"], ssh_config_path=str(multi_hosts.ssh_config_path))

    def deep(rt: Runtime) -> str:
        return posixpath.join(rt.working_dir, "d" * 60, "e" * 60, "lazycluster-deep")

    marker = link_commands.peer_marker("deep")
    with _bare_links(multi_hosts, group, deep, marker) as links:
        links.start()
        links.wait()
        assert all(len(deep(rt)) > 108 for rt in group.runtimes)
        assert set(links.up) == {("host1", "host2"), ("host2", "host1")}, links.down
        assert links.check() == {}  # and they answer on their sockets
    assert not any(marker in multi_hosts.authorized_keys(h) for h in ("host1", "host2"))


@contextlib.contextmanager
def _two_hosts_linked(
    hosts: TestHosts, name: str, **options: Any
) -> Iterator[tuple[RuntimeGroup, Callable[[Runtime], str], links_module.Links]]:
    """host1 and host2 with their links set up (no cluster), under ``lazycluster-<name>``."""
    group = RuntimeGroup(hosts=["host1", "host2"], ssh_config_path=str(hosts.ssh_config_path))

    def folder(rt: Runtime) -> str:
        return posixpath.join(rt.working_dir, f"lazycluster-{name}")

    with _bare_links(hosts, group, folder, link_commands.peer_marker(name), **options) as links:
        links.start()
        links.wait()
        yield group, folder, links


def test_a_link_key_opens_only_the_clusters_ports_from_its_own_host_until_it_expires(
    multi_hosts: TestHosts, no_leftovers: TestHosts
) -> None:
    """Whoever reads host1's link key from its folder can, from host1, reach host2's 127.0.0.1
    ports of the cluster through host2's sshd (as the links do) and listen on them, and nothing
    else: no other port there (a database's, sshd's own), no other address, no command, no
    listener outside the cluster's ports; not from another host; not after its expiry."""
    lifetime = 10.0
    secret = "db-contents"
    service = [sys.executable, "-c", GREETER, "29399", secret]  # not a cluster port
    cluster_port = [sys.executable, "-c", GREETER, str(HOST2_PORT), "worker"]
    procs = [multi_hosts.run_in("host2", argv) for argv in (service, cluster_port)]
    try:
        with _two_hosts_linked(multi_hosts, "keyuse", key_lifetime=lifetime) as (
            group,
            folder,
            links,
        ):
            assert set(links.up) == {("host1", "host2"), ("host2", "host1")}, links.down
            assert links.link_of(("host1", "host2")) == ("host1", "host2")  # host1's key
            key = posixpath.join(folder(group.runtimes[0]), links_module.KEY_FILE)
            host2 = multi_hosts.host("host2").address

            def ssh(where: str, *args: str) -> subprocess.CompletedProcess:
                argv = ["ssh", "-F", "/dev/null", "-i", key, "-o", "IdentitiesOnly=yes",
                        "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                        "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5",
                        "-o", "ExitOnForwardFailure=yes", "-l", "root", *args]  # fmt: skip
                proc = multi_hosts.run_in(
                    where, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True,
                )  # fmt: skip
                out, err = proc.communicate(timeout=20)
                return subprocess.CompletedProcess(argv, proc.returncode, out, err)

            # what a link does: a cluster port on host2's loopback
            assert wait_until(
                lambda: "worker" in ssh("host1", "-W", f"127.0.0.1:{HOST2_PORT}", host2).stdout
            )
            # another service there, sshd's own port, and a port of host1's own processes
            for port in (29399, 22, HOST1_PORT):
                other = ssh("host1", "-W", f"127.0.0.1:{port}", host2)
                assert secret not in other.stdout and "prohibited" in other.stderr, other.stderr
            elsewhere = ssh("host1", "-W", f"{multi_hosts.host('host1').address}:22", host2)
            assert not elsewhere.stdout and "prohibited" in elsewhere.stderr, elsewhere.stderr
            command = ssh("host1", host2, "echo ran-$((6*7))")
            assert "ran-42" not in command.stdout and command.returncode != 0
            # outside the grant: another port, another address, a port of host2's processes
            for bind in ("127.0.0.1:29398", f"0.0.0.0:{HOST1_PORT}", f"127.0.0.1:{HOST2_PORT + 1}"):
                listen = ssh("host1", "-N", "-R", f"{bind}:127.0.0.1:22", host2)
                assert listen.returncode != 0 and "forwarding failed" in listen.stderr
            # the same key from a host outside the cluster is refused
            stolen = ssh("host3", "-W", f"127.0.0.1:{HOST2_PORT}", host2)
            assert "worker" not in stolen.stdout and "Permission denied" in stolen.stderr
            line = next(
                line
                for line in multi_hosts.authorized_keys("host2").splitlines()
                if "keyuse" in line
            )
            assert f'from="{multi_hosts.host("host1").address}"' in line
            # it opens host2's ports and listens on host1's: two hosts' ports, not the cluster's
            opens = {int(p) for p in re.findall(r'permitopen="127\.0\.0\.1:(\d+)"', line)}
            listens = {int(p) for p in re.findall(r'permitlisten="127\.0\.0\.1:(\d+)"', line)}
            assert (opens, listens) == (set(LINK_PORTS["host2"]), set(LINK_PORTS["host1"]))
            links.close()  # nothing renews the key from here on
            # a renewal under way is not waited for by the close: its line is the last one
            # (asked of host2 itself, whose files need not be this machine's)
            host2_rt = group.runtimes[1]
            edits = posixpath.join(folder(host2_rt), authorized_keys.EDIT_PREFIX)
            pending = f"ls -d {shlex.quote(edits)}* 2>/dev/null || true"
            assert wait_until(lambda: not host2_rt.run(pending).strip(), timeout=30)
            line = next(
                line
                for line in multi_hosts.authorized_keys("host2").splitlines()
                if "keyuse" in line
            )
            expiry = line.split('expiry-time="', 1)[1][:14]
            left = time.mktime(time.strptime(expiry, "%Y%m%d%H%M%S")) - time.mktime(time.gmtime())
            assert 0 < left <= lifetime + 1
            time.sleep(left + 1.5)
            late = ssh("host1", "-W", f"127.0.0.1:{HOST2_PORT}", host2)
            assert "worker" not in late.stdout and "Permission denied" in late.stderr, late.stderr
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


#: An interpreter whose start takes SLOW_EDIT seconds: the links' edits of authorized_keys
#: are still under way when the links close.
SLOW_EDIT = 4.0
SLOW_PYTHON = f'#!/bin/sh\nsleep {SLOW_EDIT:g}\nexec {shlex.quote(sys.executable)} "$@"\n'


def test_links_closed_while_their_keys_are_being_let_in_leave_no_line_on_any_host(
    multi_hosts: TestHosts, no_leftovers: TestHosts
) -> None:
    """Closed while each host is still letting the keys in (a slow interpreter), the links do
    not wait for those edits; the cleanup's stop on each host marks the cluster as stopping
    before its revoke, and the edits that come after it let no line in (before they were
    waited for, up to 35 s; without either, their lines stayed until they expired)."""
    group = RuntimeGroup(hosts=HOSTS, ssh_config_path=str(multi_hosts.ssh_config_path))
    slow = {rt.host: posixpath.join(rt.working_dir, "slow-python") for rt in group.runtimes}
    for rt in group.runtimes:
        rt.connection.check(
            f"printf %s {shlex.quote(SLOW_PYTHON)} >{slow[rt.host]}; chmod +x {slow[rt.host]}"
        )

    def folder(rt: Runtime) -> str:
        return posixpath.join(rt.working_dir, "lazycluster-closing")

    marker = link_commands.peer_marker("closing")

    def editing(*words: str) -> list[str]:
        """Hosts running the slow interpreter, or an edit of the cluster's lines."""
        found = lambda n: any(w in n for w in words or ("slow-python", marker))  # noqa: E731
        return [h for h in HOSTS if any(map(found, _process_names(multi_hosts, h)))]

    with _bare_links(multi_hosts, group, folder, marker) as links:
        links.python = lambda rt: slow[rt.host]
        links.start()
        # the targets' edits are under way (their interpreters start)
        assert wait_until(lambda: len(editing("slow-python")) >= 2, 10)
        started = time.monotonic()
        links.start_closing()  # as a cleanup: then the stops, then the set-up thread's end
        waited = time.monotonic() - started
        revoke = processes.Revoke(sys.executable, marker)
        for rt in group.runtimes:  # the cleanup's stop, the connections still open
            assert processes.stop_folder(rt, folder(rt), 0.0, folder(rt), revoke) == []
        links.wait_closed()
        # an edit whose interpreter was still starting refuses once it runs: what every host
        # holds when nothing edits any more is what it keeps
        assert wait_until(lambda: not editing(), 2 * SLOW_EDIT + 5), editing()
        left = [h for h in HOSTS if marker in multi_hosts.authorized_keys(h)]
    print(f"the links' close took {waited:.2f} s with the edits under way")
    assert not left, left
    assert waited < SLOW_EDIT / 2
    assert not links.up
    # each edit refused, none wrote a line (its answer reaches the links' thread just after)
    assert wait_until(lambda: not links.touched, 5), links.touched


def _expiry(hosts: TestHosts, host: str, marker: str) -> float:
    """When the cluster's line in ``host``'s authorized_keys expires (seconds since the epoch)."""
    line = next(x for x in hosts.authorized_keys(host).splitlines() if marker in x)
    stamp = line.split('expiry-time="', 1)[1][:14]
    return calendar.timegm(time.strptime(stamp, "%Y%m%d%H%M%S"))


def test_link_keys_are_renewed_and_links_come_up_again_after_their_first_expiry(
    multi_hosts: TestHosts, no_leftovers: TestHosts, monkeypatch, caplog
) -> None:
    """Keys valid for 8 s, renewed at half: past the first expiry the line is valid for longer,
    and a link whose master ended logs in again with it (without the renewal sshd refuses the
    expired key and the pair stays on the route through this machine)."""
    monkeypatch.setattr(links_module, "CHECK_INTERVAL", 1.0)
    monkeypatch.setattr(links_module, "REOPEN_PAUSE", (1.0, 60.0))
    caplog.set_level(logging.DEBUG, logger="lazycluster_tasks.links")
    lifetime = 8.0
    with _two_hosts_linked(multi_hosts, "renew", key_lifetime=lifetime) as (group, folder, links):
        pair = ("host1", "host2")
        assert pair in links.up, links.down
        marker = link_commands.peer_marker("renew")
        first = _expiry(multi_hosts, "host2", marker)
        assert 0 < first - time.time() <= lifetime + 1
        assert wait_until(lambda: time.time() > first + 1, lifetime + 5)  # the first expiry passed
        assert _expiry(multi_hosts, "host2", marker) > time.time()  # renewed meanwhile
        assert "host2: renewed " in caplog.text
        name = links.process(pair)
        assert name is not None
        dialler = group.runtimes[0] if links.link_of(pair) == pair else group.runtimes[1]
        pid_file = posixpath.join(folder(dialler), links_module.pid_file(name))
        dialler.connection.check(f"kill $(cat {shlex.quote(pid_file)})")
        assert wait_until(lambda: pair in links.down, 15)
        assert wait_until(lambda: pair in links.up, 20), links.down.get(pair)
        assert links.process(pair) != name  # a new master logged in, after the first expiry
    assert not any(marker in multi_hosts.authorized_keys(h) for h in ("host1", "host2"))


def test_a_link_that_cannot_be_dialled_one_way_is_dialled_the_other(
    multi_hosts: TestHosts, no_leftovers: TestHosts
) -> None:
    """host1 cannot reach host2's sshd, host2 can reach host1's: the link host1 was to dial
    is dialled by host2, and carries both directions."""
    multi_hosts.restrict_ssh("host2", ["controller"])
    try:
        with _two_hosts_linked(multi_hosts, "oneway") as (_, _, links):
            assert set(links.up) == {("host1", "host2"), ("host2", "host1")}, links.down
            assert links.link_of(("host1", "host2")) == ("host2", "host1")
            assert links.process(("host1", "host2")) == "link-host2-host1"
    finally:
        multi_hosts.restrict_ssh("host2", None)


def test_a_pair_dialled_again_never_reuses_a_pid_file(
    multi_hosts: TestHosts, no_leftovers: TestHosts
) -> None:
    """A start whose answer was lost may have started its master: the pair dialled again gets
    a master of another name, whose pid file does not hide the first's from the cleanup."""
    with _two_hosts_linked(multi_hosts, "redial") as (group, _, links):
        assert ("host1", "host2") in links.up, links.down
        # the state a start whose answer never came leaves: its master runs, on no record
        assert links.link_of(("host2", "host1")) == ("host1", "host2")  # host1 dials
        first = links._names.pop(("host1", "host2"))
        del links.up[("host1", "host2")], links.up[("host2", "host1")]
        links._start(group.runtimes[0], [links._peers["host2"]], {})
        assert links._names[("host1", "host2")] != first
        masters = [n for n in _process_names(multi_hosts, "host1") if n.startswith("ssh ")]
        assert len(masters) == 2, masters
    # the links' exit stops every pid file in the folder; no_leftovers finds none left


def test_a_host_whose_last_worker_is_gone_cleans_up_after_the_cluster_by_itself(
    multi_hosts: TestHosts, no_leftovers: TestHosts
) -> None:
    """What a controller that died leaves: workers that end without a cleanup. Each host's
    guard then ends the masters it dialled, removes the cluster folder (the keys with it) and
    the cluster's lines from its authorized_keys — one host at a time, as its workers end."""
    hosts = ["host1", "host2", "host3"]
    group = RuntimeGroup(hosts=hosts, ssh_config_path=str(multi_hosts.ssh_config_path))

    def folder(rt: Runtime) -> str:
        return posixpath.join(rt.working_dir, "lazycluster-watched")

    marker = link_commands.peer_marker("watched")
    with _bare_links(multi_hosts, group, folder, marker, guarded=True) as links:
        guard = processes.Guard(sys.executable, marker)
        workers = {
            rt.host: processes.start_processes(  # its command line names the folder
                rt,
                folder(rt),
                [processes.ProcessSpec(f"{rt.host}-0", _sleeper(folder(rt)))],
                guard=guard,
            )
            for rt in group.runtimes
        }
        links.start()
        links.wait()
        pairs = {(a, b) for a in hosts for b in hosts if a != b}
        assert set(links.up) == pairs, links.down
        names = [n for rt in group.runtimes for n in _process_names(multi_hosts, rt.host)]
        assert sum(" guard --folder " in n for n in names) == 3  # one per host
        assert sum(n.startswith("ssh ") for n in names) == 3  # one master per pair of hosts
        assert all(marker in multi_hosts.authorized_keys(h) for h in hosts)
        host1 = group.runtimes[0]
        processes.stop_processes(host1, workers["host1"], processes.folder_marker(folder(host1)))
        lost: dict = {}
        assert wait_until(lambda: bool(lost.update(links.check()) or lost), 15)
        # host1 dialled host2: that link ended; host3 dialled host1 and still has its worker
        assert set(lost) == {("host1", "host2"), ("host2", "host1")}
        assert set(links.up) == pairs - set(lost)
        assert not _exists(host1, folder(host1))  # its keys and env files with it
        assert wait_until(lambda: marker not in multi_hosts.authorized_keys("host1"), 5)
        assert marker in multi_hosts.authorized_keys("host2")
        for rt in group.runtimes[1:]:
            processes.stop_processes(rt, workers[rt.host], processes.folder_marker(folder(rt)))
        started = time.monotonic()
        # the guard: 6 s of quiet, then TERM, 2 s, KILL, a 1 s sweep (a loaded machine: more)
        assert wait_until(lambda: not any(_exists(rt, folder(rt)) for rt in group.runtimes), 30)
        assert wait_until(lambda: not multi_hosts.leftover_processes(), 5)
        print(f"hosts clean {time.monotonic() - started:.1f} s after their last worker ended")
        assert not any(marker in multi_hosts.authorized_keys(h) for h in hosts)


def _fetch_crosses(
    cluster: LazySSHCluster, client: Client, on: dict[str, str], name: str | None
) -> None:
    """MIB MiB made by host1's worker and fetched by host2's cross the link process ``name``
    (once host2's route to that worker is on a link: a link up again takes its routes back
    after it is counted up)."""
    assert name is not None, "no link process"
    links = cluster.engine.routing.links  # type: ignore[attr-defined]
    host2 = cluster.engine.group.get_runtime("host2")
    port = int(on["host1"].rsplit(":", 1)[1])
    assert wait_until(lambda: port in links.carried(host2).get("host1", set()), timeout=10)
    before = _bytes_through(cluster, name)
    data = client.submit(_block, MIB << 20, workers=[on["host1"]], pure=False)
    moved = client.submit(_sha, data, workers=[on["host2"]], allow_other_workers=False, pure=False)
    assert moved.result(timeout=60) == _sha(_block(MIB << 20))
    assert _bytes_through(cluster, name) - before >= MIB << 20


def _exists(runtime: Runtime, path: str) -> bool:
    return runtime.connection.run(f"test -e {shlex.quote(path)}").ok


def _sleeper(folder: str) -> list[str]:
    return ["sh", "-c", "sleep 120; :", processes.folder_marker(folder)]


def _process_names(hosts: TestHosts, host: str) -> list[str]:
    names = []
    for proc in hosts.processes(host):
        with contextlib.suppress(psutil.Error):  # ended meanwhile
            names.append(" ".join(proc.cmdline()))
    return names


def test_links_of_a_host_away_at_set_up_come_up_once_it_answers(
    multi_hosts: TestHosts, no_leftovers: TestHosts, monkeypatch, caplog
) -> None:
    """A host cut off while the links are set up: its pairs keep the relay and are named,
    the other pairs come up, and its own are dialled once it answers again (before, they kept
    the relay for the cluster's lifetime)."""
    monkeypatch.setattr(links_module, "CHECK_INTERVAL", 1.0)
    monkeypatch.setattr(links_module, "REOPEN_PAUSE", (1.0, 60.0))
    caplog.set_level(logging.INFO, logger="lazycluster_tasks.links")
    hosts = ["host1", "host2", "host3"]
    group = RuntimeGroup(
        hosts=hosts,
        ssh_config_path=str(multi_hosts.ssh_config_path),
        connection_kwargs={"connect_timeout": 3},  # a cut is noticed within 3 s
    )

    def folder(rt: Runtime) -> str:
        return posixpath.join(rt.working_dir, "lazycluster-away")

    for rt in group.runtimes:
        folder(rt)  # the working dirs exist before the cut
    marker = link_commands.peer_marker("away")
    pairs = {(a, b) for a in hosts for b in hosts if a != b}
    away = {p for p in pairs if "host3" in p}
    with _bare_links(multi_hosts, group, folder, marker) as links:
        multi_hosts.cut_host("host3")
        try:
            links.start()
            links.wait()
            assert set(links.up) == pairs - away, links.down
            assert all("host3 did not answer" in links.down[p] for p in away), links.down
        finally:
            multi_hosts.restore_host("host3")
        assert wait_until(lambda: set(links.up) == pairs, 40), links.down
        assert wait_until(lambda: "host3 -> host1 up again" in caplog.text, 10)
        assert marker in multi_hosts.authorized_keys("host3")
    assert not any(marker in multi_hosts.authorized_keys(h) for h in hosts)


def _forwards(cluster: LazySSHCluster) -> tuple[int, int]:
    """(forwards this machine holds, forwards the hosts' links carry)."""
    assert cluster.engine.routing.links is not None
    here = sum(len(rt.tunnels) for rt in cluster.engine.group.runtimes)
    return here, cluster.engine.routing.links.summary()["link_forwards"]


def _ring(client: Client) -> list[str]:
    """Every worker fetches a block made on the next one; the digests of what arrived."""
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    return client.gather(
        [
            client.submit(
                _sha,
                client.submit(_block, 1 << 20, workers=[w], pure=False),
                workers=[workers[(i + 1) % len(workers)]],
                allow_other_workers=False,
                pure=False,
            )
            for i, w in enumerate(workers)
        ]
    )


@pytest.mark.slow
def test_forwards_and_threads_grow_with_the_workers_not_with_the_hosts_squared(
    multi_hosts: TestHosts, no_local_leaks: None
) -> None:
    """Six hosts of their own (the session has four), against the three above: this machine
    holds 2 x workers + hosts forwards and a bounded number of threads, the links every pair."""
    with TestHosts(6) as six:
        names = [h.name for h in six.hosts]
        cluster = _tunnelled(six, names)
        try:
            with Client(cluster) as client:
                links = links_set_up(cluster, client, 6)
                assert len(links.up) == 6 * 5 and not links.down
                kinds = [t.kind for rt in cluster.engine.group.runtimes for t in rt.tunnels]
                assert len(kinds) == 2 * 6 + 6  # -L per worker and nanny, -R per host
                assert links.summary()["link_forwards"] == 6 * 5  # on the hosts, not here
                assert threading.active_count() <= 4 * 6 + 24
                assert _ring(client) == [_sha(_block(1 << 20))] * 6
        finally:
            cluster.close()
        deadline = time.monotonic() + 3
        while six.leftovers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not six.leftovers()


def test_a_scale_down_closes_the_stopped_workers_routes_here_and_on_the_links(
    multi_hosts: TestHosts, no_leftovers: TestHosts, no_local_leaks: None
) -> None:
    """Forwards follow the workers down and up again (ports freed by the stopped workers serve
    the next ones): -L per worker and nanny and -R per host here, each worker's port on every
    other host on the links."""
    cluster = LazySSHCluster(
        HOSTS,
        ssh_config_path=str(multi_hosts.ssh_config_path),
        network_mode="tunnelled",
        threads_per_worker=1,
        workers_per_host=2,
        n_workers=6,
    )
    try:
        with Client(cluster) as client:
            client.wait_for_workers(6, timeout=60)
            assert cluster.engine.routing.links is not None
            cluster.engine.routing.links.wait()
            assert _forwards(cluster) == (2 * 6 + 3, 6 * 2)
            cluster.scale(3)
            assert wait_until(lambda: len(cluster.engine.worker_processes()) == 3, timeout=30)
            assert _forwards(cluster) == (2 * 3 + 3, 3 * 2)
            cluster.scale(6)
            client.wait_for_workers(6, timeout=60)
            cluster.wait_started()
            assert wait_until(lambda: _forwards(cluster) == (2 * 6 + 3, 6 * 2), timeout=30), (
                _forwards(cluster)
            )
            assert _ring(client) == [_sha(_block(1 << 20))] * 6
    finally:
        cluster.close()


def test_a_worker_started_again_on_other_ports_leaves_no_forward_to_its_lost_port(
    multi_hosts: TestHosts, no_leftovers: TestHosts, no_local_leaks: None, monkeypatch
) -> None:
    """A worker that loses its port at bind time (another process took it after the probe) is
    started again on other ports; the forwards made while it registered close with it."""
    from lazycluster_tasks.engine import Engine

    real, blockers, lost = Engine._worker_specs, [], []

    def someone_takes_a_port_first(engine, placement, pool, used):  # type: ignore[no-untyped-def]
        specs = real(engine, placement, pool, used)
        if not blockers:
            port = specs["host2"][0].ports[0]
            blocker = multi_hosts.run_in(
                "host2",
                [sys.executable, "-c", "import socket, sys, time\n"
                 "s = socket.create_server(('127.0.0.1', int(sys.argv[1])))\n"
                 "print('up', flush=True); time.sleep(120)", str(port)],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            blockers.append(blocker)
            assert blocker.stdout is not None and blocker.stdout.readline().strip() == "up"
            lost.append(port)
        return specs

    monkeypatch.setattr(Engine, "_worker_specs", someone_takes_a_port_first)
    cluster = LazySSHCluster(
        HOSTS,
        ssh_config_path=str(multi_hosts.ssh_config_path),
        network_mode="tunnelled",
        threads_per_worker=1,
    )
    try:
        with Client(cluster) as client:
            client.wait_for_workers(3, timeout=60)
            assert cluster.engine.routing.links is not None
            cluster.engine.routing.links.wait()
            placed = {i.name: (i.host, i.ports) for i in cluster.engine.worker_processes()}
            why = (lost, placed, [b.poll() for b in blockers], cluster.engine.plan.mode)
            # no worker listens on it anywhere (its port is forwarded to every node); a
            # nanny's port is its own host's only, and may be this one on another host
            on_host2 = {p for host, ports in placed.values() if host == "host2" for p in ports}
            workers = {ports[0] for _, ports in placed.values()}
            assert lost and lost[0] not in workers | on_host2, why
            assert _forwards(cluster) == (2 * 3 + 3, 3 * 2)
            # a forward of that number may remain only to a process of another host that
            # listens on it (a nanny's port is forwarded from its own host)
            ports_of = {host: set() for host, _ in placed.values()}
            for host, ports in placed.values():
                ports_of[host].update(ports)
            stale = [
                (rt.host, t)
                for rt in cluster.engine.group.runtimes
                for t in rt.tunnels
                if lost[0] in (t.local_port, t.remote_port)
                and lost[0] not in ports_of.get(rt.host, ())
            ]
            assert not stale, (stale, why)
            assert _ring(client) == [_sha(_block(1 << 20))] * 3
    finally:
        cluster.close()
        for blocker in blockers:
            blocker.kill()
            blocker.wait()
            if blocker.stdout is not None:
                blocker.stdout.close()


#: Answers argv[2] on 127.0.0.1:argv[1]; the port is asked for again for up to 10 s (a session
#: of the test before may still hold it for a moment).
GREETER = (
    "import socket, sys, time\n"
    "for _ in range(100):\n"
    "    try:\n"
    "        s = socket.create_server(('127.0.0.1', int(sys.argv[1]))); break\n"
    "    except OSError:\n"
    "        time.sleep(0.1)\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(sys.argv[2].encode()); c.close()\n"
)


@pytest.mark.parametrize("refusal", ["port taken", "sshd forbids -R"])
def test_a_direction_its_link_refuses_does_not_take_the_other_with_it(
    multi_hosts: TestHosts, no_leftovers: TestHosts, refusal: str
) -> None:
    """Both directions of a link are added in one call. host1 dials host2, so host2's traffic
    is the -R half, listened for by host2's sshd: here it fails (its port is taken on host2, or
    host2's sshd allows local forwarding only, as a mixed site's would). Each direction is then
    tried alone: host1's route to host2 is made on the link, host2's is left for the route
    through this machine."""
    procs = [multi_hosts.run_in("host2", [sys.executable, "-c", GREETER, "29311", "from-host2"])]
    if refusal == "port taken":
        squatter = [sys.executable, "-c", GREETER, "29312", "squatter"]
        procs.append(multi_hosts.run_in("host2", squatter))
    else:
        multi_hosts.tcp_forwarding("host2", "local")
    try:
        with _two_hosts_linked(multi_hosts, "parts") as (group, _, links):
            assert links._via[("host2", "host1")] == ("host1", "host2")  # the -R half
            host1 = group.get_runtime("host1")
            fetch = "import socket; print(socket.create_connection(('127.0.0.1', 29311)).recv(99))"

            def answers(port: str, answer: str) -> bool:  # the service listens on host2
                line = f"{sys.executable} -c {shlex.quote(fetch.replace('29311', port))}"
                done = group.get_runtime("host2").connection.run(line)  # refused: not yet up
                return done.ok and answer in done.stdout

            # a loaded machine may take a while to start the services (and host2's sshd to
            # come back from its changed config): what is tested starts after they answer
            for port, answer in (("29311", "from-host2"), ("29312", "squatter"))[: len(procs)]:
                assert wait_until(functools.partial(answers, port, answer), timeout=30)
            carried = links.forward_all({"host1": {"host2": [29311]}, "host2": {"host1": [29312]}})
            assert carried == {"host1": {"host2"}}
            assert "from-host2" in host1.run(f"{sys.executable} -c {shlex.quote(fetch)}")
            assert links.summary()["link_forwards"] == 1
    finally:
        multi_hosts.tcp_forwarding("host2", "yes")
        for proc in procs:
            proc.kill()
            proc.wait()
