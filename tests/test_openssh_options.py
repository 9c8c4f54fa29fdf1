"""Both of our OpenSSH clients (the controller's masters, the host-to-host links) pass the same
options, as this machine's ``ssh`` reads them (``ssh -G``)."""

from __future__ import annotations

import subprocess

import pytest

from lazycluster_tasks import link_commands
from lazycluster_tasks.ssh_master import OpenSSHMaster
from lazycluster_tasks.ssh_settings import SSHSettings


def _link_argv(tmp_path, key_type: str) -> list[str]:
    return link_commands.link_master_argv(
        f"{tmp_path}/link0.s", f"{tmp_path}/key", f"{tmp_path}/known_hosts", "lazycluster-h2",
        key_type, "me", "10.0.0.2", 22,
    )  # fmt: skip


def _master_argv(tmp_path, key_type: str) -> list[str]:
    master = OpenSSHMaster(SSHSettings(alias="h2", hostname="10.0.0.2"), key_type, "AAAA")
    master._folder = str(tmp_path)  # as its start makes it
    return master._argv()[:-1]  # without the session's command


@pytest.mark.parametrize("build", [_link_argv, _master_argv], ids=["link", "master"])
@pytest.mark.parametrize(
    ("key_type", "algorithms"),
    [("ssh-rsa", "rsa-sha2-512,rsa-sha2-256"), ("ssh-ed25519", "ssh-ed25519")],
)
def test_both_clients_resolve_to_the_same_fast_options(tmp_path, build, key_type, algorithms):
    argv = build(tmp_path, key_type)
    end = argv.index("--")
    resolved = subprocess.run(
        [argv[0], "-G", *argv[1:end], "--", "h2"], capture_output=True, text=True, timeout=10
    )
    assert resolved.returncode == 0, resolved.stderr
    config = dict(line.split(" ", 1) for line in resolved.stdout.splitlines() if " " in line)
    # no sntrup761 key exchange (0.1 CPU-s per connection), curve25519 kept
    assert "curve25519-sha256" in config["kexalgorithms"].split(",")
    assert "sntrup" not in config["kexalgorithms"]
    assert config["ciphers"].startswith("aes128-gcm@openssh.com,")  # one pass, AES-NI
    assert config["hostkeyalgorithms"] == algorithms  # only the pinned key's own
    assert config["serveraliveinterval"] == "5"
    assert config["serveralivecountmax"] == "3"
    assert config["compression"] == "no"
