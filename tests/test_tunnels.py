"""Ports and tunnels on real SSH test hosts, with the SSH-only switch making tunnels necessary."""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from lazycluster_tasks import (
    HostConnectionError,
    NoPortsLeftError,
    PortInUseError,
    Runtime,
    RuntimeGroup,
    TunnelError,
    tunnels,
)
from lazycluster_tasks.testing.helpers import HTTP_GET, ssh_runtime, wait_until

ECHO_SERVER = (
    "import socket, sys\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen()\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(b'hello from ' + socket.gethostname().encode()); c.close()\n"
)


def serve(hosts, name, port, address="127.0.0.1"):
    """A tiny server inside a test host that greets with its hostname."""
    proc = hosts.run_in(name, [sys.executable, "-c", ECHO_SERVER, address, str(port)])
    probe = f"import socket; socket.create_connection(({address!r}, {port}), 1).close()"
    assert wait_until(
        lambda: hosts.run_in(name, [sys.executable, "-c", probe]).wait() == 0, timeout=10
    )
    return proc


def fetch(port: int) -> str:
    """A command for a host: print what 127.0.0.1:port sends."""
    code = f"import socket; print(socket.create_connection(('127.0.0.1', {port})).recv(100))"
    return f"{sys.executable} -c {code!r}"


def greet(port: int, host: str = "127.0.0.1") -> bytes:
    with socket.create_connection((host, port), timeout=5) as s:
        return s.recv(100)


@pytest.fixture
def server(multi_hosts, no_leftovers):
    """Start greeting servers in hosts; they are stopped before the leftover check."""
    procs = []

    def start(name, port, address="127.0.0.1"):
        procs.append(serve(multi_hosts, name, port, address))

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_free_port_probes_take_one_round_trip(host1, test_hosts):
    listener = test_hosts.run_in("host1", [sys.executable, "-c", ECHO_SERVER, "127.0.0.1", "7301"])
    try:
        assert wait_until(lambda: not host1.has_free_port(7301))
        before = host1.connection.commands_run
        assert host1.get_free_port([7301, 7302, *range(7400, 8400)]) == 7302
        assert host1.connection.commands_run == before + 1
        with pytest.raises(NoPortsLeftError):
            host1.get_free_port([7301])
        assert host1.has_free_port(7302)
    finally:
        listener.kill()
        listener.wait()


def test_local_runtime_ports_use_psutil():
    runtime = Runtime("localhost")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert not runtime.has_free_port(port)
        assert runtime.get_free_port([port, port + 1 if port < 65535 else port - 1]) != port
    assert runtime.connection.commands_run == 0
    with pytest.raises(ValueError, match="invalid port"):
        runtime.has_free_port(70000)


def test_group_free_port(multi_hosts, server, no_leftovers):
    server("host2", 7311)
    group = RuntimeGroup(hosts=["host1", "host2"], ssh_config_path=str(multi_hosts.ssh_config_path))
    try:
        assert not group.has_free_port(7311)
        assert group.has_free_port(7311, exclude_hosts=["host2"])
        assert group.get_free_port([7311, 7312]) == 7312
        with socket.create_server(("127.0.0.1", 7312)):
            assert group.get_free_port([7311, 7312, 7313], enforce_check_on_localhost=True) == 7313
        with pytest.raises(NoPortsLeftError):
            group.get_free_port([7311])
    finally:
        group.cleanup()


def test_local_forward_reaches_a_port_only_ssh_can_reach(
    ssh_only, server, no_leftovers, no_local_leaks
):
    server("host1", 7321)
    runtime = ssh_runtime(ssh_only, "host1")
    try:
        address = ssh_only.host("host1").address
        with pytest.raises(OSError):
            socket.create_connection((address, 7321), timeout=2)
        local_port = runtime.expose_port_from_runtime(7321)
        assert greet(local_port) == b"hello from host1"
        bound = {
            c.laddr.ip
            for c in psutil.Process().net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == local_port
        }
        assert bound == {"127.0.0.1"}
        assert runtime.is_port_exposure_active(local_port)
        assert [t.kind for t in runtime.tunnels] == ["-L"]
        runtime.close_tunnel(local_port)
        assert runtime.tunnels == []
        with pytest.raises(OSError):
            greet(local_port)
    finally:
        runtime.cleanup()


def test_remote_forward_exposes_a_local_port_on_127_0_0_1(ssh_only, no_leftovers, no_local_leaks):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        thread = threading.Thread(target=lambda: _answer(listener, b"from the controller"))
        thread.start()
        runtime = ssh_runtime(ssh_only, "host2")
        try:
            remote_port = runtime.expose_port_to_runtime(port)
            assert runtime.run(fetch(remote_port)).strip() == "b'from the controller'"
            listening = runtime.run(f"cat /proc/net/tcp | grep -i ':{remote_port:04X} ' || true")
            assert listening and all(
                line.split()[1].startswith("0100007F") for line in listening.splitlines()
            )
        finally:
            runtime.cleanup()
            thread.join(5)


def test_closing_one_remote_forward_keeps_the_others_of_that_host(
    multi_hosts, no_leftovers, no_local_leaks
):
    """paramiko's cancel_port_forward() also drops the transport's handler of incoming
    channels: every other -R on the host was refused afterwards (a stopped worker's route took
    the scheduler's with it)."""
    with socket.create_server(("127.0.0.1", 0)) as a, socket.create_server(("127.0.0.1", 0)) as b:
        thread = threading.Thread(target=lambda: _answer(b, b"still here"))
        thread.start()
        runtime = ssh_runtime(multi_hosts, "host2")
        try:
            port_a = runtime.expose_port_to_runtime(a.getsockname()[1])
            port_b = runtime.expose_port_to_runtime(b.getsockname()[1])
            runtime.close_tunnel(port_a)
            assert runtime.run(fetch(port_b)).strip() == "b'still here'"
        finally:
            runtime.cleanup()
            thread.join(5)


def _answer(listener: socket.socket, payload: bytes) -> None:
    listener.settimeout(10)
    conn, _ = listener.accept()
    with conn:
        conn.sendall(payload)


def _fetched(runtime: Runtime, port: int, listener: socket.socket, payload: bytes) -> str:
    """What the host reads from its 127.0.0.1:port while ``listener`` here answers ``payload``
    (through a -R forward)."""
    thread = threading.Thread(target=_answer, args=(listener, payload))
    thread.start()
    try:
        return runtime.run(fetch(port)).strip()
    finally:
        thread.join(5)


HOLDER = (
    "import socket, sys, time\n"
    "c = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
    "print(c.recv(100), flush=True)\n"
    "time.sleep(60)\n"
)


def test_closing_a_forward_ends_a_half_closed_connection_at_once(
    multi_hosts, no_leftovers, no_local_leaks
):
    """A connection whose side here already ended (its answer sent, then end-of-file) while
    the host's side stays open: closing the forward ends its pump at once, not at the pump's
    next idle timeout (a thread outlived its forward by up to 5 s)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        accepted: list[socket.socket] = []

        def answer_then_half_close() -> None:
            listener.settimeout(10)
            conn, _ = listener.accept()
            conn.sendall(b"bye")
            conn.shutdown(socket.SHUT_WR)
            accepted.append(conn)

        thread = threading.Thread(target=answer_then_half_close)
        thread.start()
        runtime = ssh_runtime(multi_hosts, "host2")
        holder = None
        try:
            port = runtime.expose_port_to_runtime(listener.getsockname()[1])
            holder = multi_hosts.run_in(
                "host2", [sys.executable, "-c", HOLDER, str(port)], stdout=subprocess.PIPE
            )
            assert holder.stdout.readline().strip() == b"b'bye'"
            pumps = [t for t in threading.enumerate() if t.name == f"lct-fwd-{port}"]
            assert len(pumps) == 1 and pumps[0].is_alive()
            runtime.close_tunnel(port)
            pumps[0].join(2)
            assert not pumps[0].is_alive(), "the pump outlived its closed forward"
        finally:
            if holder is not None:
                holder.kill()
                holder.wait()
                holder.stdout.close()
            runtime.cleanup()
            thread.join(5)
            for conn in accepted:
                conn.close()


FIREHOSE_READER = (
    "import socket, sys\n"
    "c = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
    "print('reading', flush=True)\n"
    "while c.recv(1 << 16):\n"
    "    pass\n"
)


def test_closing_a_forward_while_it_carries_data_keeps_the_connection(
    multi_hosts, no_leftovers, no_local_leaks
):
    """A forward closed while its pump is sending into the channel: paramiko's send could put
    data after the channel's close, and OpenSSH then drops the whole SSH connection ("data
    packet referred to nonexistent channel"), every other forward with it. Twenty closes
    mid-stream; the connection stays the first one and another forward still answers."""
    payload = b"x" * (1 << 20)
    stop = threading.Event()

    def firehose(listener: socket.socket) -> None:
        listener.settimeout(10)
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                while not stop.is_set():
                    conn.sendall(payload)

    runtime = ssh_runtime(multi_hosts, "host2")
    with socket.create_server(("127.0.0.1", 0)) as other:
        try:
            transport = runtime.connection.transport()
            for _ in range(20):
                stop.clear()
                with socket.create_server(("127.0.0.1", 0)) as source:
                    sender = threading.Thread(target=firehose, args=(source,))
                    sender.start()
                    port = runtime.expose_port_to_runtime(source.getsockname()[1])
                    reader = multi_hosts.run_in(
                        "host2",
                        [sys.executable, "-c", FIREHOSE_READER, str(port)],
                        stdout=subprocess.PIPE,
                    )
                    try:
                        assert reader.stdout is not None
                        assert reader.stdout.readline().strip() == b"reading"
                        time.sleep(0.05)  # data flowing through the pump
                        runtime.close_tunnel(port)
                    finally:
                        stop.set()
                        sender.join(10)
                        reader.kill()
                        reader.wait()
                        assert reader.stdout is not None
                        reader.stdout.close()
            assert runtime.connection.transport() is transport, "the SSH connection was dropped"
            port_other = runtime.expose_port_to_runtime(other.getsockname()[1])
            assert _fetched(runtime, port_other, other, b"still here") == "b'still here'"
        finally:
            stop.set()
            runtime.cleanup()


ECHOER = (
    "import socket, sys\n"
    "c = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
    "for line in sys.stdin:\n"
    "    c.sendall(line.encode())\n"
    "    print(c.recv(100).decode().strip(), flush=True)\n"
)


def test_a_drained_forward_takes_no_new_connection_and_keeps_those_open(
    multi_hosts, no_leftovers, no_local_leaks
):
    """A route that moved onto a host-to-host link closes its relay's forward with drain: the
    host's port takes no new connection, and one open goes on until either end closes it (a
    transfer under way is not cut); then its pump ends."""
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def echo() -> None:
            listener.settimeout(10)
            conn, _ = listener.accept()
            with conn:
                while data := conn.recv(100):
                    conn.sendall(data)

        thread = threading.Thread(target=echo)
        thread.start()
        runtime = ssh_runtime(multi_hosts, "host2")
        client = None
        try:
            port = runtime.expose_port_to_runtime(listener.getsockname()[1])
            client = multi_hosts.run_in(
                "host2",
                [sys.executable, "-c", ECHOER, str(port)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert client.stdin is not None and client.stdout is not None

            def say(word: str) -> str:
                client.stdin.write(word + "\n")
                client.stdin.flush()
                return client.stdout.readline().strip()

            assert say("before") == "before"
            runtime.close_tunnel(port, drain=True)
            runtime.connection.run("true", timeout=10)  # the host's sshd handled the cancel
            assert say("after") == "after"  # the open connection goes on
            refused = runtime.connection.run(fetch(port), timeout=10)
            assert not refused.ok and "Connection refused" in refused.output, refused
            pumps = [t for t in threading.enumerate() if t.name == f"lct-fwd-{port}"]
            assert len(pumps) == 1 and pumps[0].is_alive()
            client.stdin.close()  # the host's end closes: the connection ends, and its pump
            assert client.wait(10) == 0
            pumps[0].join(5)
            assert not pumps[0].is_alive()
        finally:
            if client is not None:
                client.kill()
                client.wait()
                for pipe in (client.stdin, client.stdout):
                    if pipe is not None:
                        pipe.close()
            runtime.cleanup()
            thread.join(5)


def test_taken_ports_are_reported(host1, test_hosts):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with pytest.raises(PortInUseError, match=str(port)):
            host1.expose_port_from_runtime(22, port)
    # taken after the check, at the bind (a socket bound but not yet connected or listening,
    # as an outgoing connection's ephemeral port is, is in no table): the same error, which
    # a start answers by moving its workers to other ports
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} is already in use on localhost"):
            host1.expose_port_from_runtime(22, port)
    proc = test_hosts.run_in("host1", [sys.executable, "-c", ECHO_SERVER, "127.0.0.1", "7331"])
    try:
        assert wait_until(lambda: not host1.has_free_port(7331))
        with pytest.raises(PortInUseError, match="7331 is already in use on host1"):
            host1.expose_port_to_runtime(22, 7331)
    finally:
        proc.kill()
        proc.wait()


def test_a_denied_remote_forward_says_what_was_measured(multi_hosts, no_leftovers):
    # sshd's denial does not say why: the port is looked up on the host
    proc = multi_hosts.run_in("host3", [sys.executable, "-c", ECHO_SERVER, "127.0.0.1", "7332"])
    runtime = ssh_runtime(multi_hosts, "host3")
    try:
        assert wait_until(lambda: not runtime.has_free_port(7332))
        with pytest.raises(TunnelError, match="port 7332 is taken there"):
            tunnels.RemoteForward(runtime.connection, 22, 7332)
        runtime.cleanup()
        multi_hosts.tcp_forwarding("host3", "local")  # -L only, as some sites set it
        runtime = ssh_runtime(multi_hosts, "host3")
        with pytest.raises(TunnelError, match="port 7333 is free there: its sshd forbids"):
            tunnels.RemoteForward(runtime.connection, 22, 7333)
    finally:
        runtime.cleanup()
        multi_hosts.tcp_forwarding("host3", "yes")
        proc.kill()
        proc.wait()


def test_tunnels_come_back_after_the_connection_drops(
    ssh_only, server, no_leftovers, no_local_leaks
):
    server("host3", 7341)
    runtime = ssh_runtime(ssh_only, "host3")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        try:
            local_port = runtime.expose_port_from_runtime(7341)
            remote_port = runtime.expose_port_to_runtime(port)
            assert ssh_only.kill_sessions("host3") == 1  # the runtime's one connection
            # the drop is noticed (or already healed) within a few seconds
            wait_until(lambda: not runtime.is_port_exposure_active(local_port), timeout=5)
            assert wait_until(lambda: all(t.is_active for t in runtime.tunnels), timeout=10), (
                runtime.tunnels
            )
            assert greet(local_port) == b"hello from host3"
            assert _fetched(runtime, remote_port, listener, b"back") == "b'back'"
        finally:
            runtime.cleanup()


def test_group_tunnels_connect_hosts_that_cannot_see_each_other(ssh_only, server, no_leftovers):
    server("host1", 7351)
    group = RuntimeGroup(
        hosts=["host1", "host2", "host3"], ssh_config_path=str(ssh_only.ssh_config_path)
    )
    try:
        port = group.expose_port_from_runtime_to_group("host1", 7351)
        assert port == 7351
        assert greet(port) == b"hello from host1"  # on this machine
        for host in ("host2", "host3"):
            out = group.get_runtime(host).run(fetch(port))
            assert out.strip() == "b'hello from host1'"
        with socket.create_server(("127.0.0.1", 0)) as listener:
            local = listener.getsockname()[1]
            assert group.expose_port_to_runtimes(local, exclude_hosts=["host3"]) == local
            assert group.get_runtime("host1").is_port_exposure_active(local)
            assert not group.get_runtime("host3").is_port_exposure_active(local)
        with pytest.raises(ValueError, match="not in the group"):
            group.expose_port_from_runtime_to_group("host9", 7351)
    finally:
        group.cleanup()
    assert all(rt.tunnels == [] for rt in group.runtimes)
    with pytest.raises(OSError):  # nothing listens on the group port any more
        greet(7351)


#: Echoes every connection's bytes back until the client half-closes (many at once).
ECHO_ALL = """
import asyncio, sys
async def echo(reader, writer):
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_server(echo, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    await server.serve_forever()
asyncio.run(main())
"""


def test_hundreds_of_forwarded_connections_past_the_select_limit(
    multi_hosts, no_leftovers, no_local_leaks
):
    """Past select()'s 1024 descriptors (the 16-host all-to-all crash): every byte comes back."""
    proc = multi_hosts.run_in("host1", [sys.executable, "-c", ECHO_ALL, "7333"])
    runtime = ssh_runtime(multi_hosts, "host1")
    conns: list[socket.socket] = []
    try:
        probe = "import socket; socket.create_connection(('127.0.0.1', 7333), 1).close()"
        assert wait_until(
            lambda: multi_hosts.run_in("host1", [sys.executable, "-c", probe]).wait() == 0, 10
        )
        port = runtime.expose_port_from_runtime(7333)
        conns += [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(320)]
        payloads = [bytes([i % 256]) * (4096 + i) for i in range(len(conns))]
        for conn, payload in zip(conns, payloads, strict=True):
            conn.sendall(payload)
        # beyond what select() can watch, once every connection is being pumped
        assert wait_until(lambda: psutil.Process().num_fds() > 1024, 20)
        for conn, payload in zip(conns, payloads, strict=True):
            conn.shutdown(socket.SHUT_WR)
            received = bytearray()
            while chunk := conn.recv(1 << 16):
                received += chunk
            assert bytes(received) == payload
            conn.close()
    finally:
        for conn in conns:
            conn.close()
        runtime.cleanup()
        proc.kill()
        proc.wait()


def test_a_remote_forward_comes_back_after_the_path_was_cut(
    multi_hosts, no_leftovers, no_local_leaks
):
    """After a long outage the host's sshd still holds the dead session and its -R listener
    (this machine gave up on the connection; an idle sshd sends nothing by default, so it never
    learns): the forward must still come back on the same port once the host answers, and
    carry connections again."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        # the cut is noticed when a command gets no channel within the connect timeout
        runtime = ssh_runtime(multi_hosts, "host3", connection_kwargs={"connect_timeout": 3})
        try:
            remote_port = runtime.expose_port_to_runtime(port)
            (tunnel,) = runtime.tunnels
            multi_hosts.cut_host("host3")
            try:
                with pytest.raises(HostConnectionError):
                    runtime.run("true", timeout=3)  # noticed here: the connection is dropped
                assert multi_hosts.forget_connections("host3") >= 1
            finally:
                multi_hosts.restore_host("host3")
            assert wait_until(lambda: tunnel.is_active, timeout=20), tunnel.last_error
            assert tunnel.remote_port == remote_port
            assert _fetched(runtime, remote_port, listener, b"back") == "b'back'"
        finally:
            runtime.cleanup()


def test_remote_forwards_requested_at_once_each_get_their_own_port(
    multi_hosts, no_leftovers, no_local_leaks
):
    """paramiko gives a forward request's answer to whichever request waits last: requests
    made at once on one connection (the keeper, a reconnect, routing) must not swap answers."""
    with contextlib.ExitStack() as stack:
        listeners = [stack.enter_context(socket.create_server(("127.0.0.1", 0))) for _ in range(12)]
        runtime = ssh_runtime(multi_hosts, "host2")
        stack.callback(runtime.cleanup)
        runtime.run("true")
        with concurrent.futures.ThreadPoolExecutor(len(listeners)) as pool:
            ports = list(
                pool.map(lambda s: runtime.expose_port_to_runtime(s.getsockname()[1]), listeners)
            )
        assert len(set(ports)) == len(ports), ports
        for listener, port in zip(listeners[:3], ports[:3], strict=True):  # each its own listener
            payload = f"listener {listener.getsockname()[1]}".encode()
            assert _fetched(runtime, port, listener, payload) == repr(payload)


def test_a_forward_request_to_a_host_that_went_silent_fails_in_bounded_time(
    multi_hosts, monkeypatch, no_leftovers, no_local_leaks
):
    """paramiko waits for a request's answer as long as the connection looks open, which a cut
    path does for minutes: the request gives up, names the host, and drops the connection."""
    monkeypatch.setattr(tunnels, "REQUEST_TIMEOUT", 2.0)
    runtime = ssh_runtime(multi_hosts, "host4")
    try:
        runtime.run("true")
        multi_hosts.cut_host("host4")
        try:
            start = time.monotonic()
            with pytest.raises(TunnelError, match=r"host4 .*no answer in 2 s"):
                runtime.expose_port_to_runtime(9)
            assert time.monotonic() - start < 10
            assert not runtime.connection.is_connected
        finally:
            multi_hosts.restore_host("host4")
    finally:
        runtime.cleanup()


def test_a_guarded_remote_forward_lets_through_only_the_login_users_connections(
    multi_hosts, no_leftovers, no_local_leaks, caplog
):
    """An HTTP service of this machine that authenticates nobody (a local Prefect API, say),
    forwarded to host1: host1's other users reach the forward, but their connections are
    closed here, before anything reaches the service; the login user's (the workers') pass."""
    import http.server

    seen: list[str] = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            body = b"healthy"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    service = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    port = service.server_address[1]
    thread = threading.Thread(target=service.serve_forever, daemon=True)
    thread.start()
    runtime = ssh_runtime(multi_hosts, "host1")
    try:
        forwarded = runtime.expose_port_to_runtime(port, None, guarded=True)

        def get(uid: int | None) -> str:
            argv = [sys.executable, "-c", HTTP_GET, str(forwarded), "/health"]
            if uid is not None:  # another local user of host1
                argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
            proc = multi_hosts.run_in("host1", argv, stdout=subprocess.PIPE, text=True, cwd="/")
            return proc.communicate(timeout=30)[0]

        for uid in (65534, 1000):
            assert not get(uid).startswith("HTTP"), uid  # closed before any answer
        assert seen == []  # nothing of theirs reached the service
        assert "from uid 65534 refused" in caplog.text
        assert get(None).startswith("HTTP/1.0 200") and "healthy" in get(None)  # the user's
        assert seen == ["/health", "/health"]
    finally:
        runtime.cleanup()
        service.shutdown()
        service.server_close()
        thread.join()
