"""Resolution of OpenSSH config entries and connection_kwargs (pure, no network)."""

import pytest

from lazycluster_tasks import sshconfig
from lazycluster_tasks.manager import config_hosts
from lazycluster_tasks.ssh_settings import jump_settings, resolve_settings

CONFIG = """
Host web
    HostName 10.0.0.5
    User deploy
    Port 2222
    IdentityFile ~/.ssh/id_web
    ConnectTimeout 3
    UserKnownHostsFile /etc/lct/known_hosts
    ProxyJump bastion

Host bastion
    HostName 10.0.0.1
    User jump
    IdentitiesOnly yes

Host trusting
    HostName 10.0.0.6
    StrictHostKeyChecking accept-new

Host *
    ServerAliveInterval 10
"""


@pytest.fixture(autouse=True, params=["openssh", "paramiko"])
def resolver(request, monkeypatch):
    """Every test with OpenSSH's ``ssh -G`` and with the paramiko fallback."""
    monkeypatch.setenv(sshconfig.RESOLVER_ENV, request.param)
    return request.param


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config"
    path.write_text(CONFIG)
    return str(path)


def test_entry_values_are_resolved(config, monkeypatch):
    monkeypatch.setenv("HOME", "/home/me")
    s = resolve_settings("web", config)
    assert (s.hostname, s.username, s.port, s.connect_timeout) == ("10.0.0.5", "deploy", 2222, 3.0)
    assert s.key_filenames == ("/home/me/.ssh/id_web",)
    assert s.known_hosts == ("/etc/lct/known_hosts",)
    assert s.host_key_policy == "reject"
    assert s.proxy_jump == "bastion"


def test_jump_chain_resolves_through_the_config(config):
    hops = jump_settings(resolve_settings("web", config))
    assert [(h.alias, h.hostname, h.username) for h in hops] == [("bastion", "10.0.0.1", "jump")]
    assert hops[0].look_for_keys is False  # IdentitiesOnly yes
    spec = resolve_settings("web", config, {"proxy_jump": "ops@bastion:2200,10.9.9.9"})
    hops = jump_settings(spec)
    assert (hops[0].hostname, hops[0].username, hops[0].port) == ("10.0.0.1", "ops", 2200)
    assert hops[1].hostname == "10.9.9.9"


def test_connection_kwargs_override(config):
    secret = "pw-Q7#z"  # no temp dir in the repr can hold it by chance ("pw" did)
    s = resolve_settings(
        "web", config, {"port": 22, "username": "root", "key_filename": "/k", "password": secret}
    )
    assert (s.port, s.username, s.key_filenames, s.password) == (22, "root", ("/k",), secret)
    assert secret not in repr(s)


def test_unknown_hosts_keep_their_name(config):
    s = resolve_settings("10.1.2.3", config)
    assert s.hostname == "10.1.2.3" and s.port == 22


def test_accept_new_is_its_own_policy(config):
    assert resolve_settings("trusting", config).host_key_policy == "accept-new"
    assert resolve_settings("trusting", config, {"host_key_policy": "reject"}).host_key_policy == (
        "reject"
    )


@pytest.mark.parametrize(
    ("host", "kwargs", "message"),
    [
        ("", {}, "invalid host name"),
        ("a b", {}, "invalid host name"),
        ("web", {"usrname": "x"}, "unknown connection_kwargs for 'web': usrname"),
        ("web", {"host_key_policy": "yolo"}, "host_key_policy must be one of"),
        ("web", {"port": 70000}, "invalid port"),
    ],
)
def test_bad_input_is_named(config, host, kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_settings(host, config, kwargs)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="ssh config file not found"):
        resolve_settings("x", str(tmp_path / "nope"))


def test_discovery_lists_each_host_line_once_by_its_first_concrete_name(tmp_path):
    path = tmp_path / "config"
    path.write_text(
        "Host db1 db1.example.org 10.0.0.5\n  HostName 10.0.0.5\n"
        "Host gpu1 10.0.0.6\nHost * !x\n  User u\nHost *.lab ?x !y gpu2\n"
        "Host gpu1\n  Port 2\nHost db1.example.org\n  Compression yes\n"
    )
    assert config_hosts(str(path)) == ["db1", "gpu1", "gpu2"]
    a, b = resolve_settings("db1", str(path)), resolve_settings("db1.example.org", str(path))
    assert a.destination == b.destination == "u@10.0.0.5:22"


def test_include_inside_a_host_block_applies_to_that_block(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "web.conf").write_text("User webuser\nHost inner\n  Port 7\n")
    path = tmp_path / "config"
    path.write_text("Host web\n  Include web.conf\n  Port 2201\nHost other\n  HostName o\n")
    assert config_hosts(str(path)) == ["web", "other"]
    web = resolve_settings("web", str(path))
    assert (web.username, web.port) == ("webuser", 2201)
    other = resolve_settings("other", str(path))
    assert other.username != "webuser" and other.port == 22
    assert resolve_settings("inner", str(path)).port == 22  # only when the alias is also web


def test_a_bad_line_is_named_with_its_file_and_line(tmp_path, monkeypatch, resolver):
    if resolver == "paramiko":
        pytest.skip("paramiko's SSHConfig accepts unknown keywords")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "inc.conf").write_text("Host x\n  HostName 1.2.3.4\n  Bogus yes\n")
    path = tmp_path / "config"
    path.write_text("Include inc.conf\n")
    with pytest.raises(ValueError, match=r"inc\.conf:3: Bad configuration option: bogus"):
        resolve_settings("x", str(path))


def test_proxy_command_tokens_and_unsafe_names(tmp_path):
    from lazycluster_tasks.errors import InvalidRuntimeError
    from lazycluster_tasks.proxy import proxy_command_line

    path = tmp_path / "config"
    path.write_text("Host p\n  HostName 10.0.0.9\n  User me\n  ProxyCommand nc -x j %h %p %r %%\n")
    s = resolve_settings("p", str(path))
    assert proxy_command_line(s) == "nc -x j 10.0.0.9 22 me %"
    with pytest.raises(InvalidRuntimeError, match="shell characters"):
        proxy_command_line(resolve_settings("p", str(path), {"hostname": "a;reboot"}))
