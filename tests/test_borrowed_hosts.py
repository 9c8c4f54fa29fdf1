"""Borrowed hosts unharmed: a cluster's links edit each host's ~/.ssh/authorized_keys, and
whatever that file holds or whatever goes wrong, it is byte for byte the user's again after the
cluster; a host that cannot be edited safely keeps its pairs working another way."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from distributed import Client

from lazycluster_tasks import LazySSHCluster, RuntimeGroup, link_commands, processes, teardown
from lazycluster_tasks.errors import LazyclusterError
from lazycluster_tasks.group import run_parallel
from lazycluster_tasks.links import LinkKey
from lazycluster_tasks.testing.helpers import cluster_on, links_set_up, wait_until
from lazycluster_tasks.testing.hosts import TestHosts

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

HOSTS = ["host1", "host2", "host3"]
USER = (
    b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIUser1 alice@laptop\n"
    b'no-pty,command="/usr/bin/backup" ssh-rsa AAAAB3NzaUser2 backup@nas\n'
)
#: What host2's authorized_keys holds, by case (the others hold USER).
ODD = {
    "nul byte": USER + b"ssh-ed25519 AAAAC3NzaUser3 nul\x00inside\n",
    "latin-1": USER + b"ssh-ed25519 AAAAC3NzaUser3 j\xfcrgen@laptop\n",
    "no final newline": USER + b"ssh-ed25519 AAAAC3NzaUser3 last",
    "crlf": USER.replace(b"\n", b"\r\n"),
}
#: Cases where host2's file must not be edited: its pairs are dialled by host2 instead.
REFUSED = {
    "read-only": "read-only",
    "read error": "cannot be read",
    "full disk at authorize": "No space left on device",
}


def _fill(folder: Path) -> Path:
    """Fill the disk ``folder`` is on to the last byte (the host's ~/.ssh: a small tmpfs)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def user_files(multi_hosts: TestHosts) -> Iterator[TestHosts]:
    """Every host's authorized_keys holds the user's keys; put back as they were after."""
    saved = {h: multi_hosts.authorized_keys_bytes(h) for h in HOSTS}
    for host in HOSTS:
        (multi_hosts.ssh_dir(host) / "authorized_keys").write_bytes(USER)
    try:
        yield multi_hosts
    finally:
        for host in HOSTS:
            ssh = multi_hosts.ssh_dir(host)
            for entry in ssh.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            (ssh / "authorized_keys").write_bytes(saved[host])


@pytest.mark.parametrize("case", [*ODD, "symlink", "no file", *REFUSED])
def test_authorized_keys_are_the_users_byte_for_byte_after_a_cluster(
    user_files: TestHosts, no_leftovers: TestHosts, no_local_leaks: None, case: str, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="lazycluster_tasks")
    hosts = user_files
    ssh = hosts.ssh_dir("host2")
    path = ssh / "authorized_keys"
    filler = None
    if case in ODD:
        path.write_bytes(ODD[case])
    elif case == "symlink":  # managed elsewhere, linked in
        path.unlink()
        (ssh / "managed").mkdir()
        (ssh / "managed" / "keys").write_bytes(USER)
        path.symlink_to("managed/keys")
    elif case == "no file":
        path.unlink()
    elif case == "read-only":
        path.chmod(0o444)
    elif case == "read error":  # reading it fails with EIO
        path.unlink()
        path.symlink_to("/proc/self/mem")
    else:
        filler = _fill(ssh)
    compared = [h for h in HOSTS if case != "read error" or h != "host2"]  # host2's: EIO
    before = {h: hosts.authorized_keys_bytes(h) for h in compared}
    cluster = cluster_on(hosts, HOSTS, network_mode="tunnelled", nanny=False)
    marker = link_commands.peer_marker(cluster.engine.cluster_id)
    try:
        with Client(cluster) as client:
            links = links_set_up(cluster, client, 3)
            pairs = {(a, b) for a in HOSTS for b in HOSTS if a != b}
            assert set(links.up) == pairs, links.down  # refused: host2 dials its pairs
            if case in REFUSED:
                if case != "read error":
                    assert marker.encode() not in hosts.authorized_keys_bytes("host2")
                assert all(links.link_of(p)[0] == "host2" for p in pairs if "host2" in p)  # type: ignore[index]
                assert "host2: authorized_keys not edited: authorized_keys: " in caplog.text
                assert REFUSED[case] in caplog.text
            else:
                assert marker.encode() in hosts.authorized_keys_bytes("host2")
            assert all(
                marker.encode() in hosts.authorized_keys_bytes(h) for h in ("host1", "host3")
            )
            assert client.submit(lambda: 6 * 7).result(timeout=30) == 42
    finally:
        cluster.close()
    if filler is not None:
        filler.unlink()
    assert {h: hosts.authorized_keys_bytes(h) for h in compared} == before
    if case == "read error":
        assert os.readlink(path) == "/proc/self/mem"
    if case == "symlink":
        assert path.is_symlink() and os.readlink(path) == "managed/keys"
    if case == "no file":
        assert not path.exists()
    assert not [p.name for p in ssh.iterdir() if "lazycluster" in p.name]  # no temp file


def test_a_full_disk_at_the_revoke_keeps_the_lines_until_a_retry_can_remove_them(
    user_files: TestHosts, no_leftovers: TestHosts, no_local_leaks: None
) -> None:
    """The cleanup cannot write host2's file: it says so, naming host2 and the cause, keeps the
    cluster on record and leaves the file as it was; once there is room, a retry removes them."""
    hosts = user_files
    before = hosts.authorized_keys_bytes("host2")
    cluster = cluster_on(hosts, HOSTS, network_mode="tunnelled", nanny=False)
    marker = link_commands.peer_marker(cluster.engine.cluster_id)
    filler = None
    try:
        with Client(cluster) as client:
            client.wait_for_workers(3, timeout=60)
            assert cluster.engine.routing.links is not None
            cluster.engine.routing.links.wait()
            authorized = hosts.authorized_keys_bytes("host2")
            assert marker.encode() in authorized
            filler = _fill(hosts.ssh_dir("host2"))
        with pytest.raises(LazyclusterError, match=r"(?s)host2.*No space left on device"):
            cluster.close()
        assert hosts.authorized_keys_bytes("host2") == authorized  # not a byte lost
    finally:
        if filler is not None:
            filler.unlink()
    assert teardown(cluster.record())["host2"] == "host2: stopped"  # the retry, from the record
    assert hosts.authorized_keys_bytes("host2") == before
    assert not any(marker in hosts.authorized_keys(h) for h in HOSTS)


def test_where_the_guard_cannot_revoke_the_stop_edits_itself(
    user_files: TestHosts, no_leftovers: TestHosts, no_local_leaks: None, caplog
) -> None:
    """The cleanup's revoke is the host's guard's (its interpreter runs already), but where
    no guard runs any more — ended by hand, say — the stop runs the edit program itself; an
    answer left in the folder from before is never taken for this stop's."""
    caplog.set_level(logging.INFO, logger="lazycluster_tasks")
    hosts = user_files
    before = hosts.authorized_keys_bytes("host2")
    cluster = cluster_on(hosts, HOSTS, network_mode="tunnelled", nanny=False)
    marker = link_commands.peer_marker(cluster.engine.cluster_id)
    try:
        with Client(cluster) as client:
            client.wait_for_workers(3, timeout=60)
            assert cluster.engine.routing.links is not None
            cluster.engine.routing.links.wait()
            assert marker.encode() in hosts.authorized_keys_bytes("host2")
            (host2,) = [rt for rt in cluster.engine.group.runtimes if rt.host == "host2"]
            folder = shlex.quote(cluster.engine.folder(host2))
            stale = '{"path": "/nowhere", "changed": true, "lines": 0, "expiry": "", "by": "guard"}'
            host2.connection.check(
                f'kill -KILL "$(cat {folder}/guard.pid)" && '
                f"printf '%s\\n' {shlex.quote(stale)} >{folder}/revoke.answer"
            )
    finally:
        cluster.close()
    assert hosts.authorized_keys_bytes("host2") == before
    removed = [m for m in caplog.messages if m.startswith("host2: removed ")]
    assert len(removed) == 1 and removed[0].endswith("/.ssh/authorized_keys"), removed
    others = [m for m in caplog.messages if m.startswith(("host1: removed ", "host3: removed "))]
    assert len(others) == 2 and all(m.endswith("(by its guard)") for m in others), others


@pytest.mark.parametrize("flock", ["with flock", "without flock"])
def test_two_clusters_at_once_on_hosts_sharing_one_home(
    no_local_leaks: None, flock: str, tmp_path: Path
) -> None:
    """Three hosts with one ~/.ssh (a home on NFS): two clusters set up their links and close
    at once, each host editing the one file for itself; every line of the user's stays, and
    with or without flock(1) on the hosts (the edit never needs it)."""
    hidden = ("flock",) if flock == "without flock" else ()
    with TestHosts(3, shared_home=True, hidden=hidden) as shared:
        keys = shared.ssh_dir("host1") / "authorized_keys"
        keys.write_bytes(USER)
        if hidden:
            done = shared.run_in(
                "host1",
                ["flock", "--version"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            assert done.wait() != 0  # flock does not run there
        clusters = [
            cluster_on(
                shared,
                HOSTS,
                network_mode="tunnelled",
                nanny=False,
                ports=range(first, first + 100),
            )
            for first in (51000, 52000)
        ]
        markers = [link_commands.peer_marker(c.engine.cluster_id) for c in clusters]
        errors: list[BaseException] = []

        def links_up(cluster: LazySSHCluster) -> None:
            try:
                with Client(cluster) as client:
                    client.wait_for_workers(3, timeout=60)
                    assert cluster.engine.routing.links is not None
                    cluster.engine.routing.links.wait()
                    assert len(cluster.engine.routing.links.up) == 6
            except BaseException as exc:
                errors.append(exc)

        try:
            threads = [threading.Thread(target=links_up, args=(c,)) for c in clusters]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert not errors, errors
            text = keys.read_bytes()
            # each host's lines of each cluster: the keys dialling it, in the one file
            for marker in markers:
                for host in HOSTS:
                    assert f"@{host}".encode() in text and marker.encode() in text
        finally:
            closers = [threading.Thread(target=c.close) for c in clusters]
            for thread in closers:
                thread.start()
            for thread in closers:
                thread.join(120)
        assert keys.read_bytes() == USER
        assert wait_until(lambda: not shared.leftovers(), 5), shared.leftovers()


#: Holds the lock of the file in argv[1] (as an edit does) until a line comes on stdin, then
#: sets argv[2]'s line argv[3] under it: an authorize under way when the revoke begins.
AUTHORIZE_UNDER_LOCK = (
    "import fcntl, sys\n"
    "from lazycluster_tasks.hostside import authorized_keys as ak\n"
    "path, marker, line = sys.argv[1:4]\n"
    "f = open(path, 'r+b'); fcntl.lockf(f, fcntl.LOCK_EX)\n"
    "print('locked', flush=True); sys.stdin.readline()\n"
    "ak.set_lines(marker, [line], 60, path)\n"
)


def test_a_revoke_decides_under_the_lock_and_misses_no_line_written_meanwhile(
    user_files: TestHosts, no_leftovers: TestHosts, no_local_leaks: None
) -> None:
    """An authorize holds host2's lock when the cleanup's revoke begins there: the revoke waits
    for it and removes the line it wrote (a check outside the lock saw no line and skipped the
    edit: the line stayed). A revoke with nothing to remove stays fast: measured on 3 hosts."""
    hosts = user_files
    marker = link_commands.peer_marker("underlock")
    path = hosts.ssh_dir("host2") / "authorized_keys"
    ours = link_commands.authorized_line(
        LinkKey.generate().public, link_commands.key_comment(marker, "host1", "host2")
    )
    group = RuntimeGroup(hosts=HOSTS, ssh_config_path=str(hosts.ssh_config_path))
    revoke = processes.Revoke(sys.executable, marker)
    holder = None
    try:
        for _ in range(2):  # nothing to remove: the cost of a cleanup's revoke
            started = time.monotonic()
            run_parallel(
                "revoke",
                {rt.host: rt for rt in group.runtimes},
                lambda rt: processes.revoke(rt, revoke),
            )
            took = time.monotonic() - started
        print(f"revoke with nothing to remove on {len(HOSTS)} hosts: {took:.3f} s")
        holder = subprocess.Popen(
            [sys.executable, "-c", AUTHORIZE_UNDER_LOCK, str(path), marker, ours],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        errors: list[BaseException] = []

        def run() -> None:
            try:
                processes.revoke(group.runtimes[1], revoke)
            except BaseException as exc:
                errors.append(exc)

        revoking = threading.Thread(target=run)
        revoking.start()

        def editing() -> bool:  # the edit program runs on host2
            for proc in hosts.processes("host2"):
                with contextlib.suppress(psutil.Error):  # ended meanwhile
                    if proc.name().startswith("python") and marker in " ".join(proc.cmdline()):
                        return True
            return False

        # the edit waits for the lock on host2 (or, checked outside it, the revoke is over)
        assert wait_until(lambda: editing() or not revoking.is_alive(), 15)
        holder.communicate(b"go\n", timeout=15)
        assert holder.returncode == 0
        revoking.join(30)
        assert not revoking.is_alive() and not errors, errors
        assert path.read_bytes() == USER  # the line written meanwhile was removed
        assert all(hosts.authorized_keys_bytes(h) == USER for h in HOSTS)
    finally:
        if holder is not None:
            if holder.poll() is None:
                holder.kill()
            holder.communicate(timeout=10)
        group.cleanup()
