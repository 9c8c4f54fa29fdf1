"""A host's forwards on an OpenSSH master of this machine (ssh_master.py), on real test hosts:
what carries the bytes, the pinned host key, the fallback to paramiko, a master that ends, a
controller that is killed, and a tunnelled cluster whose relay rides the masters."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
from distributed import Client

from lazycluster_tasks import HostConnectionError, PortInUseError, Runtime, TunnelError, ssh_master
from lazycluster_tasks import runtime as runtime_module
from lazycluster_tasks.ssh_master import OpenSSHMaster
from lazycluster_tasks.testing.helpers import ROOT, cluster_on, ssh_runtime, wait_until
from lazycluster_tasks.testing.hosts import TestHosts
from lazycluster_tasks.tunnels import LocalForward, MasterForward, RemoteForward

GREETER = (
    "import socket, sys\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(b'hello from ' + socket.gethostname().encode()); c.close()\n"
)


@pytest.fixture
def greeter(ssh_only: TestHosts, no_leftovers: TestHosts):
    """A server on host1's 127.0.0.1:29410 that greets with its host name."""
    proc = ssh_only.run_in("host1", ["python3", "-c", GREETER, "29410"])
    probe = "import socket; socket.create_connection(('127.0.0.1', 29410), 1).close()"
    assert wait_until(
        lambda: ssh_only.run_in("host1", ["python3", "-c", probe]).wait() == 0, timeout=10
    )
    yield 29410
    proc.kill()
    proc.wait()


def greet(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return s.recv(100)


def fetched_on_host(
    hosts: TestHosts, port: int, listener: socket.socket, data: bytes, name: str = "host1"
) -> bytes:
    """What a program on host ``name`` reads from its 127.0.0.1:port while we answer with
    ``data``."""
    code = f"import socket; print(socket.create_connection(('127.0.0.1', {port})).recv(100))"
    proc = hosts.run_in(name, ["python3", "-c", code], stdout=subprocess.PIPE)
    conn, _ = listener.accept()
    with conn:
        conn.sendall(data)
    out, _ = proc.communicate(timeout=10)
    return out.strip()


def listener_process(port: int) -> str:
    """The name of the process here that listens on 127.0.0.1:port."""
    for conn in psutil.net_connections("tcp4"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr == ("127.0.0.1", port):
            return psutil.Process(conn.pid).name() if conn.pid else "?"
    return ""


def masters_here(folder: str | None = None) -> list[psutil.Process]:
    """This process's OpenSSH masters (ssh and its shell, by the control folder they name; the
    tests beside this one in the run have theirs), or any naming ``folder``."""
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    found = []
    for p in psutil.process_iter(["cmdline"]):
        named = " ".join(p.info["cmdline"] or [])
        ours = folder in named if folder is not None else "lct-ssh-" in named and p.pid in mine
        if ours:
            found.append(p)
    return found


def sessions_on(hosts: TestHosts, name: str) -> set[int]:
    """The pids of the masters' sessions (their waiting command) on host ``name``."""
    return {p.pid for p in hosts.processes(name) if _named(p) == "cat"}


def _named(process: psutil.Process) -> str:
    """Its name; "" once it ended (between the listing and this read)."""
    try:
        return process.name()
    except psutil.Error:
        return ""


def test_forwards_on_the_master_carry_both_ways_and_no_thread_here_pumps_them(
    ssh_only, greeter, no_leftovers, no_local_leaks
):
    runtime = ssh_runtime(ssh_only, "host1")
    try:
        assert runtime.use_openssh()
        assert isinstance(runtime._master, OpenSSHMaster)
        folder = runtime._master._folder
        assert folder is not None and os.stat(folder).st_mode & 0o077 == 0  # ours alone
        threads = {t.ident for t in threading.enumerate()}
        local = runtime.expose_port_from_runtime(greeter)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            remote = runtime.expose_port_to_runtime(listener.getsockname()[1])
            assert all(isinstance(t, MasterForward) for t in runtime.tunnels), runtime.tunnels
            assert listener_process(local) == "ssh"  # the master listens, not this process
            assert greet(local) == b"hello from host1"
            assert fetched_on_host(ssh_only, remote, listener, b"back") == b"b'back'"
        # no accept, pump or keeper work of ours carried those bytes
        new = {t.name for t in threading.enumerate() if t.ident not in threads}
        assert not {n for n in new if n.startswith("lct-fwd")}, new
        runtime.close_tunnels([local, remote])
        assert runtime.tunnels == [] and listener_process(local) == ""
        assert masters_here()  # the master stays for the next forwards
    finally:
        runtime.cleanup()
    assert wait_until(lambda: not masters_here(), timeout=5), masters_here()
    assert not os.path.exists(folder)


def test_a_master_trusts_only_the_host_key_paramiko_verified(ssh_only, no_leftovers):
    one, other = ssh_runtime(ssh_only, "host1"), ssh_runtime(ssh_only, "host2")
    try:
        key1 = one._ssh().transport().get_remote_server_key()
        key2 = other._ssh().transport().get_remote_server_key()
        assert key1.get_base64() != key2.get_base64()
        master = OpenSSHMaster(one._ssh().settings, key2.get_name(), key2.get_base64())
        try:
            with pytest.raises(TunnelError, match="Host key verification failed"):
                master.start()
        finally:
            master.close()
        master = OpenSSHMaster(one._ssh().settings, key1.get_name(), key1.get_base64())
        try:
            master.start()
            assert master.alive
        finally:
            master.close()
        assert not master.alive and not masters_here()
    finally:
        one.cleanup()
        other.cleanup()


def test_a_host_openssh_cannot_log_in_to_keeps_paramikos_forwards(
    ssh_only, greeter, no_leftovers, no_local_leaks, tmp_path, caplog
):
    """paramiko has a key OpenSSH is not given (a key's text, as from a Block): the master
    cannot log in, the runtime says so and forwards through paramiko."""
    config = ssh_only.ssh_config_path.read_text()
    stripped = "\n".join(
        line for line in config.splitlines() if not line.strip().startswith("IdentityFile")
    )
    (tmp_path / "config").write_text(stripped)
    key = ssh_only.identity_file.read_text()
    runtime = Runtime(
        "host1", ssh_config_path=str(tmp_path / "config"), connection_kwargs={"private_key": key}
    )
    caplog.set_level("INFO", logger="lazycluster_tasks.runtime")
    try:
        assert not runtime.use_openssh()
        assert "forwards to host1 stay on paramiko" in caplog.text
        assert "Permission denied" in caplog.text
        local = runtime.expose_port_from_runtime(greeter)
        assert isinstance(runtime.tunnels[0], LocalForward)
        assert greet(local) == b"hello from host1"
        assert not masters_here()
    finally:
        runtime.cleanup()


def test_a_master_that_ends_is_started_again_and_its_forwards_come_back(
    ssh_only, greeter, no_leftovers, no_local_leaks
):
    runtime = ssh_runtime(ssh_only, "host1")
    try:
        assert runtime.use_openssh()
        local = runtime.expose_port_from_runtime(greeter)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            remote = runtime.expose_port_to_runtime(listener.getsockname()[1])
            master = runtime._master
            assert isinstance(master, OpenSSHMaster) and master._proc is not None
            session = sessions_on(ssh_only, "host1")
            assert len(session) == 1, session
            os.killpg(master._proc.pid, signal.SIGKILL)
            assert wait_until(lambda: not runtime.is_port_exposure_active(local), timeout=5)
            # its session on the host ended with the connection
            assert wait_until(lambda: not session & sessions_on(ssh_only, "host1"), timeout=5)
            # the keeper starts it again and adds both forwards back, on the same ports
            assert wait_until(
                lambda: master.generation == 2 and all(t.is_active for t in runtime.tunnels),
                timeout=15,
            ), runtime.tunnels
            assert greet(local) == b"hello from host1"
            assert fetched_on_host(ssh_only, remote, listener, b"again") == b"b'again'"
    finally:
        runtime.cleanup()
    assert wait_until(lambda: not masters_here(), timeout=5)


def started_master(runtime: Runtime) -> OpenSSHMaster:
    """The runtime's OpenSSH master, started."""
    assert runtime.use_openssh()
    master = runtime._master
    assert isinstance(master, OpenSSHMaster)
    return master


@contextlib.contextmanager
def silenced_master(hosts: TestHosts, name: str) -> Iterator[psutil.Process]:
    """The master's sshd on host ``name`` stops (SIGSTOP): its connection stays open and the
    kernel acknowledges what comes, but nothing answers, as on a path that lost packets for a
    while and whose retransmissions backed off. Continued at the end, it finds its client gone
    and ends."""

    def sessions() -> list[psutil.Process]:  # `exec cat` follows the ready line at once
        return [p for p in hosts.processes(name) if _named(p) == "cat"]

    assert wait_until(lambda: len(sessions()) == 1, 10), sessions()
    (session,) = sessions()
    server = session.parent()
    assert server is not None and server.name().startswith("sshd"), server
    server.send_signal(signal.SIGSTOP)
    try:
        yield server
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            server.send_signal(signal.SIGCONT)


def test_a_master_whose_host_does_not_answer_a_request_is_started_anew(
    ssh_only, greeter, monkeypatch, no_leftovers, no_local_leaks
):
    """A forward request the master's host does not answer in time: the master is started on a
    new connection, its forwards come back there at once (not after ServerAlive gives up on
    the old one, 15 s), and the request fails in bounded time to paramiko's forward."""
    monkeypatch.setattr(ssh_master, "REQUEST_TIMEOUT", 2.0)
    runtime = ssh_runtime(ssh_only, "host1")
    try:
        master = started_master(runtime)
        local = runtime.expose_port_from_runtime(greeter)
        with (
            socket.create_server(("127.0.0.1", 0)) as listener,
            silenced_master(ssh_only, "host1"),
        ):
            started = time.monotonic()
            remote = runtime.expose_port_to_runtime(listener.getsockname()[1])
            asked = time.monotonic() - started
            assert 2.0 <= asked < 8, asked
            assert master.generation == 2  # a new connection
            (forward,) = [t for t in runtime.tunnels if t.remote_port == remote]
            assert isinstance(forward, RemoteForward)  # the failed request's fallback
            assert wait_until(lambda: runtime.is_port_exposure_active(local), timeout=5)
            assert greet(local) == b"hello from host1"  # the old forward, on the new master
            assert fetched_on_host(ssh_only, remote, listener, b"still") == b"b'still'"
    finally:
        runtime.cleanup()
    assert wait_until(lambda: not masters_here(), timeout=5)


def test_a_master_that_carries_nothing_after_an_outage_is_started_anew(
    multi_hosts, no_leftovers, no_local_leaks
):
    """Our connection to the host dropped in an outage and came back: the master went through
    it too, and one that does not answer a round trip within MASTER_CHECK_TIMEOUT is started
    anew before the reconnect returns, so forwards asked for next ride a working connection."""
    runtime = ssh_runtime(multi_hosts, "host3", connection_kwargs={"connect_timeout": 3})
    try:
        master = started_master(runtime)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            remote = runtime.expose_port_to_runtime(listener.getsockname()[1])
            with silenced_master(multi_hosts, "host3"):
                multi_hosts.cut_host("host3")
                try:
                    with pytest.raises(HostConnectionError):
                        runtime.run("true", timeout=3)  # noticed here: the connection is dropped
                finally:
                    multi_hosts.restore_host("host3")
                started = time.monotonic()
                runtime.run("true", timeout=20)  # reconnects, and checks the master
                took = time.monotonic() - started
                assert master.generation == 2, master.generation
                assert took < runtime_module.MASTER_CHECK_TIMEOUT + 5, took
            # the old session, continued, learns that its client is gone and frees the port,
            # which the forward takes back on the new master
            assert wait_until(lambda: runtime.is_port_exposure_active(remote), timeout=10)
            assert fetched_on_host(multi_hosts, remote, listener, b"anew", "host3") == b"b'anew'"
    finally:
        runtime.cleanup()
    assert wait_until(lambda: not masters_here(), timeout=5)


def test_a_master_that_answers_after_an_outage_is_kept(ssh_only, greeter, no_leftovers):
    """The check after a reconnect starts no master anew that carries its round trip."""
    runtime = ssh_runtime(ssh_only, "host1")
    try:
        master = started_master(runtime)
        local = runtime.expose_port_from_runtime(greeter)
        runtime.connection.transport().close()  # our end drops it: the next use reconnects
        runtime.run("true", timeout=20)
        assert runtime.connection.connect_count == 2
        assert master.generation == 1 and runtime.is_port_exposure_active(local)
        assert greet(local) == b"hello from host1"
    finally:
        runtime.cleanup()


@pytest.fixture
def no_terminal(ssh_only: TestHosts) -> Iterator[TestHosts]:
    """host1's sshd grants no terminal (PermitTTY no) for the test."""
    ssh_only.permit_tty("host1", False)
    try:
        yield ssh_only
    finally:
        ssh_only.permit_tty("host1", True)


def test_a_host_that_grants_no_terminal_gets_a_master_without_one_that_leaves_nothing(
    no_terminal, greeter, no_leftovers, no_local_leaks, caplog
):
    caplog.set_level("INFO", logger="lazycluster_tasks.ssh_master")
    runtime = ssh_runtime(no_terminal, "host1")
    try:
        assert runtime.use_openssh()
        master = runtime._master
        assert isinstance(master, OpenSSHMaster) and master._proc is not None
        assert "host1 grants no terminal" in caplog.text, caplog.text
        assert master.alive and not master._tty, master._log()
        local = runtime.expose_port_from_runtime(greeter)
        assert greet(local) == b"hello from host1"
        session = sessions_on(no_terminal, "host1")
        assert len(session) == 1, no_terminal.leftover_processes()
        generation = master.generation
        os.killpg(master._proc.pid, signal.SIGKILL)
        # without a terminal to hang up, its session still ends with the connection
        assert wait_until(lambda: not session & sessions_on(no_terminal, "host1"), timeout=5)
        # and the one started again runs without a terminal at once
        assert wait_until(lambda: runtime.is_port_exposure_active(local), timeout=15)
        assert master.generation > generation and not master._tty, master.generation
        assert greet(local) == b"hello from host1"
    finally:
        runtime.cleanup()
    assert wait_until(lambda: not masters_here(), timeout=5)
    assert wait_until(lambda: not sessions_on(no_terminal, "host1"), timeout=5)


CONTROLLER = """
import json, sys, time
from lazycluster_tasks import Runtime
rt = Runtime("host1", ssh_config_path=sys.argv[1])
assert rt.use_openssh()
port = rt.expose_port_from_runtime(int(sys.argv[2]))
print(json.dumps({"port": port, "folder": rt._master._folder}), flush=True)
time.sleep(600)
"""


def test_a_killed_controller_leaves_no_master_no_folder_and_nothing_on_the_host(
    ssh_only, greeter, no_leftovers
):
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(
        [sys.executable, "-c", CONTROLLER, str(ssh_only.ssh_config_path), str(greeter)],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        shown = json.loads(proc.stdout.readline())
        assert greet(shown["port"]) == b"hello from host1"
        assert os.path.isdir(shown["folder"]) and masters_here(shown["folder"])
        proc.kill()
        proc.wait()
        assert wait_until(lambda: not masters_here(shown["folder"]), timeout=5)
        assert not os.path.exists(shown["folder"])
        assert listener_process(shown["port"]) == ""
        assert wait_until(lambda: ssh_only.sessions("host1") == 0, timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _relay_bytes() -> int:
    """Bytes our masters' ssh processes moved so far."""
    total = 0
    for p in masters_here():
        if _named(p) == "ssh":
            try:
                io = p.io_counters()
            except psutil.Error:
                continue
            total += io.read_chars + io.write_chars
    return total


@pytest.mark.parametrize("masters", ["on", "off"])
def test_a_tunnelled_clusters_forwards_and_relay_ride_the_masters_unless_turned_off(
    ssh_only, no_leftovers, no_local_leaks, monkeypatch, masters
):
    """No host-to-host links: host2's worker fetches 8 MiB from host1's through this machine's
    relay, on the masters' forwards (their ssh processes move the bytes); with
    LAZYCLUSTER_OPENSSH_FORWARDS=0 every forward is paramiko's, as before."""
    monkeypatch.setenv("LAZYCLUSTER_OPENSSH_FORWARDS", "1" if masters == "on" else "0")
    cluster = cluster_on(ssh_only, ["host1", "host2"], network_mode="tunnelled", host_links=False)
    try:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=30)
            workers = client.scheduler_info(n_workers=-1)["workers"]
            on = {str(w["name"]).split("-")[0]: a for a, w in workers.items()}
            tunnels = [t for rt in cluster.engine.group.runtimes for t in rt.tunnels]
            scheduler_port = int(cluster.scheduler_address.rsplit(":", 1)[1])
            # -L per worker here, -R of the scheduler per host, -R of the other's worker
            on_master = [t for t in tunnels if isinstance(t, MasterForward)]
            paramikos = [t for t in tunnels if isinstance(t, LocalForward | RemoteForward)]
            before = _relay_bytes()
            block = client.submit(lambda: b"x" * (8 << 20), workers=[on["host1"]], pure=False)
            size = client.submit(len, block, workers=[on["host2"]]).result(timeout=60)
            assert size == 8 << 20
            moved = _relay_bytes() - before
            if masters == "on":
                # the scheduler's routes take a master where it was up by then
                workers_on_master = [t for t in on_master if t.local_port != scheduler_port]
                assert {t.kind for t in workers_on_master} == {"-L", "-R"}
                assert len(workers_on_master) == 2 + 2, tunnels
                assert len(on_master) + len(paramikos) == 6, tunnels
                assert moved >= 2 * (8 << 20), moved  # in and out of both masters
            else:
                assert not on_master and not masters_here() and moved == 0
                assert len(paramikos) == 6
    finally:
        cluster.close()
    assert wait_until(lambda: not masters_here(), timeout=5)


def test_forwards_asked_at_once_where_one_port_is_taken_go_one_by_one_naming_it(
    ssh_only, greeter, no_leftovers, no_local_leaks
):
    """One request for many -R forwards; the host's sshd refuses one (its port is taken
    there): none of the request stays, each is then asked alone, the free one is carried and
    the taken one raises PortInUseError naming the host and port."""
    runtime = ssh_runtime(ssh_only, "host1")
    free = 29411
    try:
        assert runtime.use_openssh()
        with socket.create_server(("127.0.0.1", free)) as listener:
            with pytest.raises(PortInUseError) as info:
                runtime.expose_ports(to_runtime=[free, greeter])  # the greeter holds it there
            assert (info.value.port, info.value.host) == (greeter, "host1")
            assert [(t.kind, t.remote_port) for t in runtime.tunnels] == [("-R", free)]
            assert isinstance(runtime.tunnels[0], MasterForward)
            assert fetched_on_host(ssh_only, free, listener, b"free") == b"b'free'"
        # the greeter still has its port on host1
        code = f"import socket; print(socket.create_connection(('127.0.0.1', {greeter})).recv(99))"
        read = ssh_only.run_in("host1", ["python3", "-c", code], stdout=subprocess.PIPE)
        assert read.communicate(timeout=10)[0].strip() == b"b'hello from host1'"
    finally:
        runtime.cleanup()
