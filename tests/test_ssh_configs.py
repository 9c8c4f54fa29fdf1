"""ssh configs as people write them, against the real namespace test hosts.

Every config here is written under tmp_path with a temporary $HOME (so relative Includes, ``~``
and default keys never touch the real ~/.ssh) and no ssh-agent unless the test starts one.
"""

from __future__ import annotations

import logging
import os
import pwd
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from lazycluster_tasks import ssh, sshconfig
from lazycluster_tasks.errors import AuthenticationError, HostConnectionError, HostKeyError
from lazycluster_tasks.group import RuntimeGroup, fan_out
from lazycluster_tasks.manager import RuntimeManager, config_hosts
from lazycluster_tasks.runtime import Runtime
from lazycluster_tasks.ssh_settings import resolve_settings
from lazycluster_tasks.testing.helpers import send_until_cut, wait_until
from lazycluster_tasks.testing.hosts import TestHosts

USER = pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary $HOME with an empty ~/.ssh, and no ssh-agent."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home


@pytest.fixture(params=["openssh", "paramiko"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(sshconfig.RESOLVER_ENV, request.param)
    return str(request.param)


def defaults(hosts: TestHosts, *, known: Path | None = None, identity: bool = True) -> str:
    """A `Host *` block: how to log in to every test host."""
    lines = [
        "Host *",
        f"  User {USER}",
        f"  UserKnownHostsFile {known or hosts.known_hosts_path}",
        "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes",
        "  BatchMode yes",
        "  ConnectTimeout 5",
    ]
    if identity:
        lines += [f"  IdentityFile {hosts.identity_file}", "  IdentitiesOnly yes"]
    return "\n".join(lines) + "\n"


def addr(hosts: TestHosts, name: str) -> str:
    return hosts.host(name).address


def hostname_of(runtime: Runtime) -> str:
    result = runtime.connection.run("hostname", timeout=20)
    assert result.ok, result.output
    return result.stdout.strip()


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def local_ssh_children(alive: bool = False) -> list[psutil.Process]:
    """ssh (or sh) processes under this one; ``alive``: zombies left out. Processes that exit
    while they are listed are left out too."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name() in ("ssh", "sh") and not (alive and p.status() == psutil.STATUS_ZOMBIE):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


# -- multi-pattern Host lines and de-duplication -------------------------------------------------


def test_multi_pattern_host_lines_are_one_host(
    multi_hosts, no_leftovers, no_local_leaks, home, tmp_path, caplog
):
    a1, a2, a3 = (addr(multi_hosts, n) for n in ("host1", "host2", "host3"))
    config = write(
        tmp_path / "config",
        f"Host host1 host1.example.org {a1}\n  HostName {a1}\n"
        f"Host gpu2 {a2}\n  HostName {a2}\n"
        f"Host !bad host3 h3 *.lab\n  HostName {a3}\n"
        # a second block for the machine of host1: another alias, same destination
        f"Host db1\n  HostName {a1}\n" + defaults(multi_hosts),
    )
    assert config_hosts(config) == ["host1", "gpu2", "host3", "db1"]
    caplog.set_level(logging.INFO)
    manager = RuntimeManager(config, connect_timeout=5)
    try:
        assert manager.hosts == ["host1", "gpu2", "host3"]
        assert "db1" in caplog.text and "same host" in caplog.text
        group = manager.create_group()
        assert group.runtime_count == 3  # not 6 for 3 machines
        names = fan_out("hostname", group.runtimes, hostname_of)
        assert names == {"host1": "host1", "gpu2": "host2", "host3": "host3"}
    finally:
        for runtime in manager._runtimes.values():
            runtime.cleanup()

    caplog.clear()
    group = RuntimeGroup(hosts=["host1", "host1.example.org", a1, "h3"], ssh_config_path=config)
    try:
        assert group.hosts == ["host1", "h3"]
        assert "host1.example.org" in caplog.text and f"{USER}@{a1}:22" in caplog.text
        assert fan_out("hostname", group.runtimes, hostname_of) == {"host1": "host1", "h3": "host3"}
    finally:
        group.cleanup()


# -- Include --------------------------------------------------------------------------------------


def test_include_globs_nested_relative_to_home_ssh_with_host_star_defaults(
    multi_hosts, no_leftovers, no_local_leaks, home, tmp_path, resolver
):
    ssh = home / ".ssh"
    a1, a2, a3, a4 = (addr(multi_hosts, f"host{k}") for k in range(1, 5))
    # nested, at the top of the included file (after a Host line it would belong to that block)
    write(ssh / "conf.d" / "10-first.conf", f"Include nested/*.conf\nHost host1\n  HostName {a1}\n")
    write(ssh / "nested" / "host2.conf", f"Host host2 second\n  HostName {a2}\n")
    write(ssh / "conf.d" / "README", "Host not-a-conf-file\n  HostName 192.0.2.1\n")
    # an Include inside a Host block applies to that block only, Host lines in it included
    write(ssh / "blocks" / "host3.conf", f"HostName {a3}\nHost host3-only-inside\n  Port 2222\n")
    config = write(
        tmp_path / "elsewhere" / "main.config",  # relative Includes still mean ~/.ssh
        "Include conf.d/*.conf\n"
        "Host host3\n  Include blocks/host3.conf\n"
        f"Host host4\n  HostName {a4}\n" + defaults(multi_hosts),
    )
    assert config_hosts(config) == ["host2", "host1", "host3", "host4"]  # file order
    s3 = resolve_settings("host3", config)
    assert (s3.hostname, s3.port, s3.username) == (a3, 22, USER)
    assert resolve_settings("host3-only-inside", config).port == 22  # host3 block not active
    assert resolve_settings("second", config).hostname == a2
    s2 = resolve_settings("host2", config)  # Host * supplies the rest
    assert s2.key_filenames == (str(multi_hosts.identity_file),)
    assert s2.known_hosts == (str(multi_hosts.known_hosts_path),)

    manager = RuntimeManager(config, connect_timeout=5)
    try:
        assert manager.hosts == ["host2", "host1", "host3", "host4"], manager.inactive_hosts
        names = fan_out("hostname", list(manager._runtimes.values()), hostname_of)
        assert names == {f"host{k}": f"host{k}" for k in range(1, 5)}
    finally:
        for runtime in manager._runtimes.values():
            runtime.cleanup()


def test_include_loops_and_depth_are_reported(home, tmp_path):
    write(home / ".ssh" / "a.conf", "Include b.conf\n")
    write(home / ".ssh" / "b.conf", "Include a.conf\n")
    config = write(tmp_path / "config", "Include a.conf\n")
    with pytest.raises(ValueError, match="Include loop"):
        config_hosts(config)


# -- ProxyCommand and ProxyJump -------------------------------------------------------------------


@pytest.fixture
def host2_behind_host1(multi_hosts: TestHosts) -> Iterator[TestHosts]:
    """host2 accepts SSH only from host1."""
    multi_hosts.restrict_ssh("host2", ["host1"])
    try:
        yield multi_hosts
    finally:
        multi_hosts.restrict_ssh("host2", None)


GREETER_PORT = 29411
#: Greets one connection on 127.0.0.1:GREETER_PORT with its host name, then ends.
GREETER = f"""
import socket
s = socket.create_server(("127.0.0.1", {GREETER_PORT}))
print("ready", flush=True)
c, _ = s.accept()
c.sendall(b"hello from " + socket.gethostname().encode())
c.close()
"""


@pytest.mark.parametrize("route", ["ProxyCommand ssh -F {cfg} -W %h:%p host1", "ProxyJump host1"])
def test_proxy_reaches_a_host_only_its_jump_host_can_reach(
    host2_behind_host1, no_leftovers, no_local_leaks, home, tmp_path, route
):
    hosts = host2_behind_host1
    cfg = tmp_path / "config"
    write(
        cfg,
        f"Host host1\n  HostName {addr(hosts, 'host1')}\n"
        f"Host host2 behind\n  HostName {addr(hosts, 'host2')}\n  {route.format(cfg=cfg)}\n"
        f"Host host2-direct\n  HostName {addr(hosts, 'host2')}\n  ConnectTimeout 2\n"
        + defaults(hosts),
    )
    direct = Runtime("host2-direct", ssh_config_path=str(cfg))
    try:
        with pytest.raises(HostConnectionError):  # the restriction is real
            hostname_of(direct)
    finally:
        direct.cleanup()
    runtime = Runtime("behind", ssh_config_path=str(cfg))
    try:
        assert hostname_of(runtime) == "host2"
        if route.startswith("ProxyCommand"):
            assert any(p.name() == "ssh" for p in local_ssh_children())
        # the forwards ride an OpenSSH master that takes the same route (to a program on
        # host2's 127.0.0.1 that says where it runs)
        assert runtime.use_openssh()
        server = hosts.run_in("host2", ["python3", "-c", GREETER], stdout=subprocess.PIPE)
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        local = runtime.expose_port_from_runtime(GREETER_PORT)
        assert [type(t).__name__ for t in runtime.tunnels] == ["MasterForward"]
        with socket.create_connection(("127.0.0.1", local), timeout=10) as conn:
            assert conn.recv(20) == b"hello from host2"
        server.wait(10)
        assert hosts.processes("host1") == []  # the hop is sshd's alone: nothing runs there
    finally:
        runtime.cleanup()
    assert wait_until(lambda: not local_ssh_children(alive=True), 5), local_ssh_children()


def test_a_failing_proxy_command_is_named_and_reaped(
    multi_hosts, no_leftovers, no_local_leaks, home, tmp_path
):
    cfg = write(
        tmp_path / "config",
        f"Host broken\n  HostName {addr(multi_hosts, 'host1')}\n"
        # it reads our banner before it fails: the failure is its exit, not a refused write
        "  ProxyCommand sh -c 'sleep 0.3; echo proxy refuses %h:%p >&2; exit 3'\n"
        + defaults(multi_hosts),
    )
    runtime = Runtime("broken", ssh_config_path=cfg)
    try:
        with pytest.raises(HostConnectionError, match="proxy refuses"):
            hostname_of(runtime)
    finally:
        runtime.cleanup()
    assert not local_ssh_children()


#: A ProxyCommand that relays to sys.argv[1]:sys.argv[2] through a small socket buffer: on a cut
#: path its send soon blocks, and it takes no more input (as a proxy whose own path is cut does).
RELAY = """
import os, socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2**15)
s.connect((sys.argv[1], int(sys.argv[2])))
def down():
    while data := s.recv(65536):
        os.write(1, data)
    os._exit(0)
threading.Thread(target=down, daemon=True).start()
while data := os.read(0, 65536):
    s.sendall(data)
"""


@pytest.mark.parametrize("proxy", ["relay", "ssh -W"])
def test_a_cut_behind_a_proxy_command_fails_the_command_in_bounded_time(
    host2_behind_host1, no_leftovers, no_local_leaks, home, tmp_path, monkeypatch, proxy
):
    """A command's input streams through a ProxyCommand when the path behind it is cut.
    relay: the proxy soon takes no more input; once it took none for UNACKNOWLEDGED_LIMIT
    (3 s here) the connection fails. ``ssh -W`` (no ServerAlive): it takes our bytes into its
    own buffers and never notices; the host's window runs out, and the keep-alive asked after
    KEEPALIVE_SECONDS (1 s here) gets no answer within the limit. Either way the command fails
    in words, the proxy is reaped, the cleanup kills the command left on the host. (Before,
    both waited for good.)"""
    monkeypatch.setattr(ssh, "UNACKNOWLEDGED_LIMIT", 3)
    monkeypatch.setattr(ssh, "KEEPALIVE_SECONDS", 1)
    hosts = host2_behind_host1
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    cfg = tmp_path / "config"
    route = (
        f"{sys.executable} {relay} %h %p" if proxy == "relay" else f"ssh -F {cfg} -W %h:%p host1"
    )
    cut = "host2" if proxy == "relay" else "host1"  # the relay runs here: its host cut
    write(
        cfg,
        f"Host host1\n  HostName {addr(hosts, 'host1')}\n  ServerAliveInterval 0\n"
        f"Host behind\n  HostName {addr(hosts, 'host2')}\n  ProxyCommand {route}\n"
        + defaults(hosts),
    )
    if proxy == "relay":
        hosts.restrict_ssh("host2", None)
    runtime = Runtime("behind", ssh_config_path=str(cfg))
    try:
        assert hostname_of(runtime) == "host2"
        try:
            took, failed = send_until_cut(
                runtime.connection, lambda: hosts.cut_host(cut), ssh.UNACKNOWLEDGED_LIMIT + 30
            )
        finally:
            hosts.restore_host(cut)
        assert took < ssh.KEEPALIVE_SECONDS + ssh.UNACKNOWLEDGED_LIMIT + 10, took
        assert isinstance(failed, HostConnectionError), failed
        assert "dropped while a command" in str(failed)
        assert hostname_of(runtime) == "host2"  # a new connection, a new proxy
    finally:
        runtime.cleanup()

    def relays() -> list[psutil.Process]:
        return [p for p in psutil.Process().children() if str(relay) in " ".join(p.cmdline())]

    assert wait_until(lambda: not relays(), 5), relays()


# -- known_hosts: hashed, accept-new --------------------------------------------------------------


def test_hashed_known_hosts(multi_hosts, no_leftovers, no_local_leaks, home, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(multi_hosts.known_hosts_path.read_text())
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    assert all(line.startswith("|1|") for line in known.read_text().splitlines() if line)
    assert addr(multi_hosts, "host1") not in known.read_text()
    cfg = write(
        tmp_path / "config",
        f"Host host1\n  HostName {addr(multi_hosts, 'host1')}\n"
        + defaults(multi_hosts, known=known),
    )
    runtime = Runtime("host1", ssh_config_path=cfg)
    try:
        assert hostname_of(runtime) == "host1"
    finally:
        runtime.cleanup()


def host_key_line(hosts: TestHosts, name: str) -> str:
    address = addr(hosts, name)
    for line in hosts.known_hosts_path.read_text().splitlines():
        if line.split()[0] == address:
            return " ".join(line.split()[1:3])
    raise AssertionError(f"no key of {name}")


@pytest.mark.parametrize("hashed", [False, True])
def test_accept_new_saves_an_unknown_key_and_refuses_a_changed_one(
    multi_hosts, no_leftovers, no_local_leaks, home, tmp_path, hashed
):
    known = tmp_path / "fresh" / "known_hosts"  # neither the file nor its folder exist
    a1 = addr(multi_hosts, "host1")
    block = f"Host host1\n  HostName {a1}\n  StrictHostKeyChecking accept-new\n"
    block += "  HashKnownHosts yes\n" if hashed else ""
    cfg = write(tmp_path / "config", block + defaults(multi_hosts, known=known))
    assert resolve_settings("host1", cfg).host_key_policy == "accept-new"
    runtime = Runtime("host1", ssh_config_path=cfg)
    try:
        assert hostname_of(runtime) == "host1"
    finally:
        runtime.cleanup()
    saved = known.read_text().splitlines()
    assert len(saved) == 1
    name, key = saved[0].split()[0], " ".join(saved[0].split()[1:3])
    assert key == host_key_line(multi_hosts, "host1")
    assert name.startswith("|1|") if hashed else name == a1

    # the saved key is now trusted by a strict config
    strict = write(
        tmp_path / "strict", f"Host host1\n  HostName {a1}\n" + defaults(multi_hosts, known=known)
    )
    runtime = Runtime("host1", ssh_config_path=strict)
    try:
        assert hostname_of(runtime) == "host1"
    finally:
        runtime.cleanup()

    # a CHANGED key is refused, and the file is left alone
    other = tmp_path / "other_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
        check=True,
        capture_output=True,
    )
    wrong = " ".join(Path(f"{other}.pub").read_text().split()[:2])
    known.write_text(f"{a1} {wrong}\n")
    runtime = Runtime("host1", ssh_config_path=cfg)
    try:
        with pytest.raises(HostKeyError, match="CHANGED"):
            hostname_of(runtime)
    finally:
        runtime.cleanup()
    assert known.read_text() == f"{a1} {wrong}\n"


# -- keys: agent, certificates ----------------------------------------------------------------


def test_key_from_ssh_agent(multi_hosts, no_leftovers, no_local_leaks, home, tmp_path, monkeypatch):
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert agent.poll() is None and time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.02)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(
            ["ssh-add", str(multi_hosts.identity_file)],
            env=env,
            check=True,
            capture_output=True,
            timeout=10,
        )
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        cfg = write(
            tmp_path / "config",  # no IdentityFile at all, and ~/.ssh holds no key
            f"Host host1\n  HostName {addr(multi_hosts, 'host1')}\n"
            + defaults(multi_hosts, identity=False),
        )
        settings = resolve_settings("host1", cfg)
        assert settings.key_filenames == () and settings.allow_agent
        runtime = Runtime("host1", ssh_config_path=cfg)
        try:
            assert hostname_of(runtime) == "host1"
        finally:
            runtime.cleanup()
    finally:
        agent.terminate()
        agent.wait(timeout=10)
    # without the agent the same config has no key: proof the agent's key was the one used
    runtime = Runtime("host1", ssh_config_path=cfg)
    try:
        with pytest.raises(AuthenticationError):
            hostname_of(runtime)
    finally:
        runtime.cleanup()


def test_certificate_file_signed_by_a_user_ca_the_host_trusts(
    multi_hosts, no_leftovers, no_local_leaks, home, tmp_path
):
    """sshd trusts the CA through a ``cert-authority`` line in its AuthorizedKeysFile; the
    user key itself is NOT authorized, so only the certificate can log in."""

    def keygen(*args: str) -> None:
        subprocess.run(["ssh-keygen", "-q", *args], check=True, capture_output=True, timeout=30)

    ca, user_key = tmp_path / "user_ca", tmp_path / "user_key"
    keygen("-t", "ed25519", "-N", "", "-f", str(ca))
    keygen("-t", "ed25519", "-N", "", "-f", str(user_key))
    keygen("-s", str(ca), "-I", "lct-test", "-n", USER, "-V", "+1h", f"{user_key}.pub")
    certificate = tmp_path / "signed.cert"  # not <key>-cert.pub: paramiko must not guess it
    Path(f"{user_key}-cert.pub").rename(certificate)
    a1 = addr(multi_hosts, "host1")
    block = f"Host host1\n  HostName {a1}\n  IdentityFile {user_key}\n  IdentitiesOnly yes\n"
    with_cert = write(
        tmp_path / "with_cert",
        block + f"  CertificateFile {certificate}\n" + defaults(multi_hosts, identity=False),
    )
    without = write(tmp_path / "without", block + defaults(multi_hosts, identity=False))
    authorized = multi_hosts.base_dir / "authorized_keys"
    original = authorized.read_text()
    authorized.write_text(original + f"cert-authority {Path(f'{ca}.pub').read_text()}")
    try:
        runtime = Runtime("host1", ssh_config_path=with_cert)
        try:
            assert hostname_of(runtime) == "host1"
        finally:
            runtime.cleanup()
        runtime = Runtime("host1", ssh_config_path=without)
        try:
            with pytest.raises(AuthenticationError):
                hostname_of(runtime)
        finally:
            runtime.cleanup()
    finally:
        authorized.write_text(original)


# -- Match ----------------------------------------------------------------------------------------


def test_match_blocks_are_honoured(
    multi_hosts, no_leftovers, no_local_leaks, home, tmp_path, resolver
):
    a1 = addr(multi_hosts, "host1")
    exec_ = ' exec "test -d /"' if resolver == "openssh" else ""  # OpenSSH runs Match exec
    cfg = write(
        tmp_path / "config",
        f"Host mhost\n  HostName {a1}\n"
        # the only way to the key: the Match block must apply
        f"Match originalhost mhost user {USER}{exec_}\n"
        f"  IdentityFile {multi_hosts.identity_file}\n"
        "Match originalhost nobody\n  Port 2999\n" + defaults(multi_hosts, identity=False),
    )
    assert config_hosts(cfg) == ["mhost"]
    settings = resolve_settings("mhost", cfg)
    assert settings.key_filenames == (str(multi_hosts.identity_file),) and settings.port == 22
    runtime = Runtime("mhost", ssh_config_path=cfg, connection_kwargs={"look_for_keys": False})
    try:
        assert hostname_of(runtime) == "host1"
    finally:
        runtime.cleanup()


@pytest.mark.parametrize("criterion", ["frobnicate yes", "localnetwork 10.0.0.0/8", "exec true"])
def test_a_match_that_cannot_be_evaluated_is_an_error_naming_the_line(
    home, tmp_path, resolver, criterion
):
    if resolver == "openssh" and not criterion.startswith("frobnicate"):
        pytest.skip("OpenSSH evaluates it (exec always, localnetwork from 9.4)")
    cfg = write(tmp_path / "config", f"Host a\n  HostName 192.0.2.1\nMatch {criterion}\n  Port 2\n")
    with pytest.raises(ValueError, match=rf"{cfg}:3"):
        resolve_settings("a", cfg)
