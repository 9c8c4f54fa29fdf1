"""The SSH test-host harness itself, checked with the OpenSSH client binary and psutil only."""

from __future__ import annotations

import errno
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from lazycluster_tasks.testing.hosts import TestHosts
from lazycluster_tasks.testing.prefect_server import PrefectServer

pytest_plugins = ["lazycluster_tasks.testing.pytest_plugin"]

PORT = 8786  # hosts have their own port spaces, a fixed port is fine

#: A TCP server on port argv[1] that says "ready" once it listens; the scripts below end it.
SERVER = """
import socket, sys, threading, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(50)
print("ready", flush=True)
"""

LISTEN = SERVER + "time.sleep(60)\n"

ECHO = (
    SERVER
    + """
def echo(c):
    while data := c.recv(1024):
        c.sendall(data)
while True:
    threading.Thread(target=echo, args=(s.accept()[0],), daemon=True).start()
"""
)

PROBE = """
import socket, sys
s = socket.socket()
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print(0)
except OSError as e:
    print(e.errno)
"""


def ssh(hosts: TestHosts, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    argv = ["ssh", "-F", str(hosts.ssh_config_path), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def probe(address: str, port: int) -> int:
    """0 when a TCP connect succeeds, else its errno."""
    with socket.socket() as s:
        s.settimeout(3)
        try:
            s.connect((address, port))
            return 0
        except OSError as e:
            return e.errno or -1


def probe_from(hosts: TestHosts, name: str, address: str, port: int) -> int:
    p = hosts.run_in(
        name, [sys.executable, "-c", PROBE, address, str(port)], stdout=subprocess.PIPE
    )
    out, _ = p.communicate(timeout=10)
    return int(out)


@contextmanager
def listening(
    hosts: TestHosts, name: str, port: int = PORT, script: str = LISTEN
) -> Iterator[subprocess.Popen[str]]:
    p = hosts.run_in(
        name, [sys.executable, "-c", script, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield p
    finally:
        p.kill()
        p.wait()
        if p.stdout:
            p.stdout.close()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def run_traces(run_id: str, base_dir: Path) -> list[str]:
    """Anything a TestHosts run could leave: namespaces, links, marker, processes, files."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"netns {m}" for m in re.findall(rf"lct{run_id}\S*", netns)]
    found += [f"link {m}" for m in re.findall(rf"lct{run_id}[^:@\s]*", links)]
    if Path(f"/run/lct-{run_id}.owner").exists():
        found.append("marker")
    for p in psutil.process_iter(["cmdline"]):
        if str(base_dir) in " ".join(p.info["cmdline"] or []):
            found.append(f"process {p.pid} {p.info['cmdline']}")
    return found


pytestmark = pytest.mark.timeout(60)


def test_each_host_has_its_name_and_address(test_hosts: TestHosts, no_leftovers: TestHosts) -> None:
    for h in test_hosts.hosts:
        res = ssh(test_hosts, h.name, "hostname; ip -4 -o addr show")
        assert res.returncode == 0, res.stderr
        name, addrs = res.stdout.split("\n", 1)
        if test_hosts.namespaced:
            assert name == h.name
            assert f"inet {h.address}/24" in addrs
            assert h.netns is not None and h.port == 22
        else:
            assert h.address == "127.0.0.1" and h.port != 22 and h.netns is None
    if test_hosts.namespaced:
        assert len(test_hosts.hosts) == int(os.environ.get("LCT_TEST_HOST_COUNT", "4"))
        assert test_hosts.controller_address.endswith(".1")
        assert [h.address for h in test_hosts.hosts][:2] == [
            test_hosts.controller_address[:-1] + "11",
            test_hosts.controller_address[:-1] + "12",
        ]


def test_run_in_enters_the_host(multi_hosts: TestHosts) -> None:
    h = multi_hosts.hosts[1]
    out = multi_hosts.run_in(
        h.name, ["sh", "-c", "hostname; ip -4 -o addr"], stdout=subprocess.PIPE
    )
    text = out.communicate(timeout=10)[0].decode()
    assert text.splitlines()[0] == h.name and h.address in text


def test_host_keys_are_verified(test_hosts: TestHosts, tmp_path: Path) -> None:
    h = test_hosts.hosts[0]
    assert ssh(test_hosts, h.name, "true").returncode == 0
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    res = ssh(test_hosts, "-o", f"UserKnownHostsFile={empty}", h.name, "true")
    assert res.returncode == 255 and "Host key verification failed" in res.stderr
    wrong = tmp_path / "wrong"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    where = h.address if h.port == 22 else f"[{h.address}]:{h.port}"
    empty.write_text(f"{where} {wrong.with_suffix('.pub').read_text()}")
    res = ssh(test_hosts, "-o", f"UserKnownHostsFile={empty}", h.name, "true")
    assert res.returncode == 255 and "IDENTIFICATION HAS CHANGED" in res.stderr


def test_ssh_only_from_the_controller(multi_hosts: TestHosts) -> None:
    h2 = multi_hosts.host("host2")
    assert probe(h2.address, PORT) == errno.ECONNREFUSED  # nothing listening yet
    with listening(multi_hosts, "host2"):
        assert probe(h2.address, PORT) == 0
        multi_hosts.ssh_only(True)
        try:
            t0 = time.monotonic()
            assert probe(h2.address, PORT) in (errno.EHOSTUNREACH, errno.EACCES)
            assert time.monotonic() - t0 < 1  # rejected, not dropped
            assert ssh(multi_hosts, "host2", "true").returncode == 0
        finally:
            multi_hosts.ssh_only(False)
        assert probe(h2.address, PORT) == 0


def test_ssh_only_between_hosts(ssh_only: TestHosts) -> None:
    hosts = ssh_only
    h2 = hosts.host("host2")
    with listening(hosts, "host2"):
        assert probe_from(hosts, "host1", h2.address, PORT) in (errno.EHOSTUNREACH, errno.EACCES)
        assert probe_from(hosts, "host1", h2.address, 22) == 0
        # a host cannot reach the controller's non-SSH ports either
        with socket.create_server((hosts.controller_address, 0)) as srv:
            port = srv.getsockname()[1]
            blocked = probe_from(hosts, "host1", hosts.controller_address, port)
            assert blocked in (errno.EHOSTUNREACH, errno.EACCES, errno.EPERM)
            hosts.ssh_only(False)
            assert probe_from(hosts, "host1", hosts.controller_address, port) == 0
        assert probe_from(hosts, "host1", h2.address, PORT) == 0


def test_restrict_ssh_needs_a_jump(multi_hosts: TestHosts, no_leftovers: TestHosts) -> None:
    multi_hosts.restrict_ssh("host2", ["host1"])
    try:
        t0 = time.monotonic()
        res = ssh(multi_hosts, "host2", "hostname")
        assert res.returncode == 255 and time.monotonic() - t0 < 3, res.stderr
        res = ssh(multi_hosts, "-o", "ProxyJump=host1", "host2", "hostname")
        assert res.returncode == 0 and res.stdout.strip() == "host2", res.stderr
        assert ssh(multi_hosts, "host1", "true").returncode == 0  # other hosts unaffected
    finally:
        multi_hosts.restrict_ssh("host2", None)
    assert ssh(multi_hosts, "host2", "hostname").stdout.strip() == "host2"


def test_kill_sessions_drops_connections(
    test_hosts: TestHosts, tmp_path: Path, no_leftovers: TestHosts
) -> None:
    name = test_hosts.hosts[0].name
    cfg = str(test_hosts.ssh_config_path)
    client = subprocess.Popen(["ssh", "-F", cfg, name, "sleep 30"], stderr=subprocess.PIPE)
    cm = str(tmp_path / "cm")
    subprocess.run(["ssh", "-F", cfg, "-M", "-S", cm, "-f", "-N", name], check=True, timeout=20)
    try:
        sleeping = lambda: any(  # noqa: E731
            x.endswith(" sleep 30") for x in test_hosts.leftovers().get(name, [])
        )
        assert wait_for(sleeping)
        assert ssh(test_hosts, "-S", cm, "-O", "check", name).returncode == 0
        assert test_hosts.kill_sessions(name) >= 2
        assert client.wait(timeout=5) == 255
        check = lambda: ssh(test_hosts, "-S", cm, "-O", "check", name).returncode != 0  # noqa: E731
        assert wait_for(check)
        assert ssh(test_hosts, name, "true").returncode == 0  # the listener is fine
    finally:
        client.kill()
        client.communicate()
        ssh(test_hosts, "-S", cm, "-O", "exit", name)
        test_hosts.kill_leftovers()  # the orphaned sleep 30


@pytest.mark.timeout(30)
def test_paused_sshd_times_out(test_hosts: TestHosts) -> None:
    name = test_hosts.hosts[-1].name
    test_hosts.pause_sshd(name)
    try:
        t0 = time.monotonic()
        res = ssh(test_hosts, "-o", "ConnectTimeout=2", name, "true")
        took = time.monotonic() - t0
        assert res.returncode == 255 and 1.5 < took < 6, (took, res.stderr)
        assert "timed out" in res.stderr
    finally:
        test_hosts.resume_sshd(name)
    assert ssh(test_hosts, name, "true").returncode == 0


def test_stopped_sshd_refuses_then_comes_back(test_hosts: TestHosts) -> None:
    h = test_hosts.hosts[-1]
    test_hosts.stop_sshd(h.name)
    try:
        res = ssh(test_hosts, h.name, "true")
        assert res.returncode == 255 and "Connection refused" in res.stderr
        assert probe(h.address, h.port) == errno.ECONNREFUSED
    finally:
        test_hosts.start_sshd(h.name)
    res = ssh(test_hosts, h.name, "hostname")  # same host key: StrictHostKeyChecking passes
    assert res.returncode == 0, res.stderr
    if test_hosts.namespaced:
        assert res.stdout.strip() == h.name


def test_leftovers_are_reported_and_killed(multi_hosts: TestHosts) -> None:
    res = ssh(multi_hosts, "host1", "setsid nohup sleep 300 >/dev/null 2>&1 </dev/null &")
    assert res.returncode == 0, res.stderr
    found = lambda: any(x.endswith(" sleep 300") for x in multi_hosts.leftovers().get("host1", []))  # noqa: E731
    assert wait_for(found)
    assert set(multi_hosts.leftovers()) == {"host1"}
    multi_hosts.kill_leftovers()
    assert multi_hosts.leftovers() == {}


@pytest.mark.timeout(30)
def test_separate_run_leaves_nothing_behind(multi_hosts: TestHosts) -> None:
    hosts = TestHosts(count=2)
    with hosts:
        assert hosts.run_id != multi_hosts.run_id
        assert hosts.controller_address != multi_hosts.controller_address
        assert ssh(hosts, "host2", "hostname").stdout.strip() == "host2"
        sleeper = hosts.run_in("host1", ["sleep", "300"])
        traces = run_traces(hosts.run_id, hosts.base_dir)  # the probe sees a live run
        assert len([t for t in traces if t.startswith("netns")]) == 2
        sshd = [t for t in traces if "sshd" in t]
        reapers = [t for t in sshd if "tini" in t]  # each host's sshd under its reaper
        assert len(sshd) - len(reapers) == 2 and len(reapers) in (0, 2)
    assert sleeper.wait(timeout=1) == -9
    assert run_traces(hosts.run_id, hosts.base_dir) == []
    assert not hosts.base_dir.exists()
    hosts.stop()  # twice is fine
    assert ssh(multi_hosts, "host1", "true").returncode == 0  # the session's hosts are untouched


def test_partial_start_is_cleaned_up(multi_hosts: TestHosts, tmp_path: Path) -> None:
    base = tmp_path / "hosts"
    (base / "host2").mkdir(parents=True)  # makes start() fail at the second host
    hosts = TestHosts(count=3, base_dir=base)
    with pytest.raises(FileExistsError):
        hosts.start()
    assert run_traces(hosts.run_id, base) == []
    hosts.stop()


def test_stale_run_is_removed(multi_hosts: TestHosts) -> None:
    run_id = secrets.token_hex(2)
    ns = f"lct{run_id}h1"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "link", "add", f"lct{run_id}br", "type", "bridge"], check=True)
    orphan = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "300"], start_new_session=True)
    # no owner marker: as if its pytest was SIGKILLed
    with TestHosts(count=1):
        assert orphan.wait(timeout=5) == -9
        assert run_traces(run_id, Path("/nonexistent")) == []


@pytest.mark.timeout(30)
def test_loopback_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    if not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("no sshd")
    monkeypatch.setenv("LCT_TEST_HOSTS_MODE", "loopback")
    hosts = TestHosts(count=3)
    assert not hosts.namespaced and hosts.count == 1
    with hosts:
        (h,) = hosts.hosts
        assert (h.name, h.address, h.netns) == ("host1", "127.0.0.1", None)
        assert hosts.controller_address == "127.0.0.1"
        assert f"[127.0.0.1]:{h.port} ssh-ed25519 " in hosts.known_hosts_path.read_text()
        res = ssh(hosts, "host1", "echo ok")
        assert res.returncode == 0 and res.stdout == "ok\n", res.stderr
        with pytest.raises(RuntimeError, match="needs root"):
            hosts.ssh_only()
        with pytest.raises(RuntimeError, match="needs root"):
            hosts.cut_host("host1")
        client = subprocess.Popen(["ssh", "-F", str(hosts.ssh_config_path), "host1", "sleep 30"])
        assert wait_for(lambda: "host1" in hosts.leftovers())
        client.kill()
        client.wait()
        hosts.kill_leftovers()
        assert wait_for(lambda: hosts.leftovers() == {})
    assert run_traces(hosts.run_id, hosts.base_dir) == []


CLASSIFY = """
import errno, socket, sys
s = socket.socket()
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("open")
except socket.timeout:
    print("drop")
except ConnectionRefusedError:
    print("reset")
except OSError as e:
    print("icmp" if e.errno in (errno.EHOSTUNREACH, errno.EACCES, errno.EPERM) else e.errno)
"""

#: topology -> whether (controller->host, host->host, host->controller) are open
EXPECTED_PATHS = {
    "open": (True, True, True),
    "isolated": (True, False, True),
    "ssh-only": (False, False, False),
    "no-connect-back": (True, True, False),
}


def classify_from(hosts: TestHosts, name: str | None, address: str, port: int) -> str:
    argv = [sys.executable, "-c", CLASSIFY, address, str(port), "1.0"]
    if name is None:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    p = hosts.run_in(name, argv, stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=10)
    return out.strip()


@pytest.mark.parametrize("closed", ["drop", "reset", "icmp"])
@pytest.mark.parametrize("topology", list(EXPECTED_PATHS))
def test_network_shapes_answer_as_declared(
    multi_hosts: TestHosts, topology: str, closed: str, no_leftovers: TestHosts
) -> None:
    if topology == "open" and closed != "icmp":
        pytest.skip("an open network has no closed ports to answer")
    h2 = multi_hosts.host("host2")
    with (
        listening(multi_hosts, "host2"),
        socket.create_server((multi_hosts.controller_address, 0)) as srv,
    ):
        back = srv.getsockname()[1]
        multi_hosts.set_network(topology, closed)
        try:
            seen = (
                classify_from(multi_hosts, None, h2.address, PORT),
                classify_from(multi_hosts, "host1", h2.address, PORT),
                classify_from(multi_hosts, "host1", multi_hosts.controller_address, back),
            )
            assert ssh(multi_hosts, "host2", "true").returncode == 0  # SSH always passes
        finally:
            multi_hosts.set_network("open")
    want = tuple("open" if ok else closed for ok in EXPECTED_PATHS[topology])
    assert seen == want


def test_cut_established_breaks_open_connections(
    multi_hosts: TestHosts, no_leftovers: TestHosts
) -> None:
    h2 = multi_hosts.host("host2")
    with listening(multi_hosts, "host2"), socket.create_connection((h2.address, PORT), 3) as c:
        multi_hosts.set_network("ssh-only", "reset")  # new connections only
        try:
            c.sendall(b"x")  # still passes
            multi_hosts.set_network("ssh-only", "reset", cut_established=True)
            c.settimeout(3)
            with pytest.raises(OSError):
                for _ in range(50):
                    c.sendall(b"x" * 1000)
                    time.sleep(0.02)
            assert ssh(multi_hosts, "host2", "true").returncode == 0
        finally:
            multi_hosts.set_network("open")
    with pytest.raises(ValueError, match="topology"):
        multi_hosts.set_network("closed")
    with pytest.raises(ValueError, match="closed"):
        multi_hosts.set_network("open", "silent")


Probe = tuple[str | None, str, int]  # (from host or None for this machine, address, port)


def classify_all(hosts: TestHosts, probes: Sequence[Probe], timeout: float = 1.0) -> list[str]:
    """classify_from for several (from host or None, address, port) at once: one timeout for all."""
    procs = []
    for name, address, port in probes:
        argv = [sys.executable, "-c", CLASSIFY, address, str(port), str(timeout)]
        if name is None:
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
        else:
            procs.append(hosts.run_in(name, argv, stdout=subprocess.PIPE, text=True))
    return [p.communicate(timeout=10)[0].strip() for p in procs]


@pytest.mark.timeout(30)
def test_cut_host_drops_everything_until_restored(
    multi_hosts: TestHosts, no_leftovers: TestHosts
) -> None:
    hosts, h2 = multi_hosts, multi_hosts.host("host2")
    every_path: list[Probe] = [(None, h2.address, 22), (None, h2.address, PORT)]
    every_path += [("host1", h2.address, 22), ("host1", h2.address, PORT)]
    with (
        listening(hosts, "host2", script=ECHO) as server,
        socket.create_connection((h2.address, PORT), 3) as c,
    ):
        c.settimeout(3)
        c.sendall(b"a")
        assert c.recv(1) == b"a"
        try:
            hosts.cut_host("host2")
            hosts.cut_host("host2")  # idempotent
            assert hosts.cut_hosts == {"host2"}
            c.sendall(b"b")  # the open connection carries nothing any more...
            # silence everywhere, sshd's port included (stopped: it would refuse otherwise)
            assert classify_all(hosts, every_path) == ["drop"] * 4
            c.settimeout(0.1)
            with pytest.raises(TimeoutError):  # ...no echo within the probes' second either
                c.recv(1)
            # its processes live on and still see themselves (loopback)
            assert server.poll() is None
            assert server.pid in [p.pid for p in hosts.processes("host2")]
            assert classify_all(hosts, [("host2", "127.0.0.1", PORT)]) == ["open"]
            # a new network shape keeps the cut host cut; the others get the shape
            hosts.set_network("ssh-only", "reset")
            assert classify_all(hosts, [(None, h2.address, 22), (None, h2.address, PORT)]) == [
                "drop",
                "drop",
            ]
            assert classify_all(hosts, [(None, hosts.host("host1").address, PORT)]) == ["reset"]
        finally:
            hosts.restore_host("host2")
            hosts.restore_host("host2")  # idempotent
        try:
            assert hosts.cut_hosts == frozenset()
            # back to the shape in force: SSH passes, other ports reset
            assert classify_all(hosts, every_path[:2]) == ["open", "reset"]
            res = ssh(hosts, "-o", "ProxyJump=host1", "host2", "hostname")
            assert res.returncode == 0 and res.stdout.strip() == "host2", res.stderr
        finally:
            hosts.set_network("open")
        assert classify_all(hosts, every_path) == ["open"] * 4  # the earlier listener
        assert server.poll() is None
        assert ssh(hosts, "host2", "hostname").stdout.strip() == "host2"
    with pytest.raises(ValueError, match="no test host 'host9'"):
        hosts.cut_host("host9")
    with pytest.raises(ValueError, match="no test host 'host9'"):
        hosts.restore_host("host9")


@pytest.mark.timeout(30)
def test_stop_while_a_host_is_cut(multi_hosts: TestHosts) -> None:
    hosts = TestHosts(count=2)
    with hosts:
        sleeper = hosts.run_in("host2", ["sleep", "300"])
        hosts.cut_host("host2")
        assert sleeper.poll() is None
        assert ssh(hosts, "host1", "true").returncode == 0  # the other host is untouched
    assert sleeper.wait(timeout=1) == -9
    assert run_traces(hosts.run_id, hosts.base_dir) == []
    assert not hosts.base_dir.exists()


def test_the_runs_prefect_server_is_one_that_sessions_wait_for_and_never_stop(
    prefect_server: PrefectServer,
) -> None:
    """The pytest process launches the run's Prefect server; pytest-xdist's sessions wait for
    it like their own, stop nothing of it, and a port where none answers is a clear error."""
    servers = [
        p for p in psutil.process_iter(["cmdline"])
        if (p.info["cmdline"] or [])[-3:] == ["prefect", "server", "start"]
    ]  # fmt: skip
    assert len(servers) == 1, [p.info["cmdline"] for p in servers]
    if os.environ.get("PYTEST_XDIST_WORKER"):
        assert not prefect_server.owned
        assert servers[0].ppid() == os.getppid()  # launched by the process that started us
    shared = PrefectServer.at(prefect_server.port, startup_timeout=10)
    assert shared.wait_healthy() is shared
    shared.stop()
    with urllib.request.urlopen(f"{prefect_server.api_url}/health", timeout=5) as reply:
        assert reply.status == 200
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="not healthy 1 s after its launch"):
        PrefectServer.at(port, startup_timeout=1).wait_healthy()
    assert time.monotonic() - start < 5
