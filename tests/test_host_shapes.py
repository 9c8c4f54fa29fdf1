"""Hosts that are not copies of this machine: other login shells, an unprivileged login user
with a home of its own, a filesystem of its own with only the system's Python."""

from __future__ import annotations

import os
import socket

import pytest
from distributed import Client

from lazycluster_tasks import LazySSHCluster, Runtime
from lazycluster_tasks.testing.hosts import TestHosts

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

SHELLS = {
    "host1": "/bin/dash",
    "host2": "/bin/bash",
    "host3": "/usr/bin/zsh",
    "host4": "/usr/bin/tcsh",
    "host5": "/usr/bin/fish",
}
#: A line every shell of SHELLS would read differently, as sh reads it.
TRICKY = (
    'x="it\'s"; printf \'%s|\' "$x" "a\\\\b" "`echo bt`" "$(echo cs)" \'!x\' \'ü€\' \'%d\'\n'
    "printf '\\nline2 %s\\n' \"$$\" >/dev/null; echo done; exit 3"
)


@pytest.fixture(scope="module")
def shells() -> TestHosts:
    missing = [s for s in SHELLS.values() if not os.path.exists(s)]
    if missing:
        pytest.skip(f"login shells not installed: {missing} (apt-get install tcsh zsh fish)")
    with TestHosts(len(SHELLS), shells=SHELLS) as hosts:
        yield hosts


def test_every_login_shell_runs_our_lines_and_reports_true_facts(shells: TestHosts) -> None:
    for host, shell in SHELLS.items():
        runtime = Runtime(host, ssh_config_path=str(shells.ssh_config_path))
        try:
            assert runtime.run("echo $SHELL").strip() == shell  # sshd ran the line through it
            result = runtime.connection.run(TRICKY)
            assert (result.exit_code, result.stdout) == (3, "it's|a\\b|bt|cs|!x|ü€|%d|done\n")
            info = runtime.info
            assert info["cpu_cores"] == os.cpu_count() and info["memory"] > 2**20, (host, info)
        finally:
            runtime.cleanup()
    assert not shells.leftovers()


def test_a_cluster_runs_on_hosts_of_every_login_shell(shells: TestHosts) -> None:
    cluster = LazySSHCluster(
        list(SHELLS),
        ssh_config_path=str(shells.ssh_config_path),
        threads_per_worker=1,
        nanny=False,
    )
    try:
        with Client(cluster) as client:
            client.wait_for_workers(len(SHELLS), timeout=60)
            ran = client.run(socket.gethostname)
            assert sorted(ran.values()) == sorted(SHELLS)
    finally:
        cluster.close()
    assert not shells.leftovers()
