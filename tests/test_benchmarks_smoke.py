"""The host-layer benchmark runs end to end on 2 test hosts and prints every expected row."""

from __future__ import annotations

import os
import re
from typing import Any

import psutil
import pytest

from benchmarks import common, host_layer
from lazycluster_tasks.testing.hosts import NETNS_DIR, SSHD, TestHosts


@pytest.fixture
def built_hosts(monkeypatch: pytest.MonkeyPatch) -> list[TestHosts]:
    """The TestHosts the benchmark builds for itself, recorded to be checked afterwards."""
    built: list[TestHosts] = []
    real = host_layer.TestHosts

    def recording(*args: Any, **kwargs: Any) -> TestHosts:
        hosts = real(*args, **kwargs)
        built.append(hosts)
        return hosts

    monkeypatch.setattr(host_layer, "TestHosts", recording)
    return built


def _ssh_clients_of(hosts: TestHosts) -> list[str]:
    """Local ssh processes still using these hosts' config (masters or clients)."""
    config = str(hosts.ssh_config_path)
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        cmdline = p.info["cmdline"] or []
        if p.info["name"] == "ssh" and config in cmdline:
            found.append(f"{p.pid} {' '.join(cmdline)}")
    return found


def _table(lines: list[str], title: str) -> list[list[str]]:
    """Body rows of the table printed under ``title``, cells split on runs of 2+ spaces."""
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rules = [i for i in range(start, len(lines)) if lines[i] and set(lines[i]) == {"-"}][:3]
    assert len(rules) == 3, f"table {title!r} is not closed"
    return [re.split(r"\s{2,}", line.strip()) for line in lines[rules[1] + 1 : rules[2]]]


@pytest.mark.slow
def test_host_layer_benchmark_prints_its_tables(
    capsys: pytest.CaptureFixture[str], built_hosts: list[TestHosts]
) -> None:
    if not os.path.exists(SSHD):
        pytest.skip(f"{SSHD} not installed")

    targets = host_layer.main(["--hosts", "2", "--repeat", "2"])
    lines = capsys.readouterr().out.splitlines()

    # it built its own hosts and left nothing: no process on them, no ssh, no namespace
    [hosts] = built_hosts
    common.leftover_check(hosts, grace=0)
    assert _ssh_clients_of(hosts) == []
    assert not hosts.base_dir.exists()
    assert not [h.netns for h in hosts.hosts if h.netns and (NETNS_DIR / h.netns).exists()]

    names = ["round trip connection.run", "round trip rt.echo"]
    names += ["broadcast to 1 host", "broadcast to 2 hosts"]
    assert [t.name for t in targets] == names
    assert all(len(t.ours.samples) == len(t.openssh.samples) == 2 for t in targets)

    round_trip = _table(lines, host_layer.ROUND_TRIP_TITLE)
    assert [row[0] for row in round_trip] == [host_layer.RUN, host_layer.ECHO, host_layer.OPENSSH]
    assert all(len(row) == 5 and row[-1].endswith("x") for row in round_trip)

    broadcast = _table(lines, host_layer.BROADCAST_TITLE)
    assert [row[0] for row in broadcast] == ["1", "2"]
    assert all(len(row) == 6 and row[-1].endswith("x") for row in broadcast)

    summary = _table(lines, host_layer.SUMMARY_TITLE)
    assert [row[0] for row in summary] == names
    for row, target in zip(summary, targets, strict=True):
        assert row[-1] == ("PASS" if target.passed else "MISS")
    assert "targets met" in lines[-1]
