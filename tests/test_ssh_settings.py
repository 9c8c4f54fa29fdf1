"""Resolution of OpenSSH config entries and connection_kwargs (pure, no network)."""

import pytest

from lazycluster_tasks.ssh import jump_settings, resolve_settings

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
    s = resolve_settings(
        "web", config, {"port": 22, "username": "root", "key_filename": "/k", "password": "pw"}
    )
    assert (s.port, s.username, s.key_filenames, s.password) == (22, "root", ("/k",), "pw")
    assert "pw" not in repr(s)


def test_unknown_hosts_keep_their_name(config):
    s = resolve_settings("10.1.2.3", config)
    assert s.hostname == "10.1.2.3" and s.port == 22


def test_accept_new_means_auto_add(config):
    assert resolve_settings("trusting", config).host_key_policy == "auto-add"


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
