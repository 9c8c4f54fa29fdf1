"""The host-layer benchmark runs end to end on 2 test hosts and prints every expected row."""

from __future__ import annotations

import os
import re
from typing import Any

import psutil
import pytest

from benchmarks import cluster_layer, common, host_layer
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


@pytest.fixture
def cluster_built_hosts(monkeypatch: pytest.MonkeyPatch) -> list[TestHosts]:
    """The TestHosts the cluster-layer benchmark builds for itself, recorded to be checked."""
    built: list[TestHosts] = []
    real = cluster_layer.TestHosts

    def recording(*args: Any, **kwargs: Any) -> TestHosts:
        hosts = real(*args, **kwargs)
        built.append(hosts)
        return hosts

    monkeypatch.setattr(cluster_layer, "TestHosts", recording)
    return built


def _is_number(cell: str) -> bool:
    return re.fullmatch(r"\d+(\.\d+)?", cell) is not None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cluster_layer_benchmark_prints_its_tables(
    capsys: pytest.CaptureFixture[str], cluster_built_hosts: list[TestHosts]
) -> None:
    if not os.path.exists(SSHD):
        pytest.skip(f"{SSHD} not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root: tunnelled mode runs on SSH-only network-namespace hosts")

    targets = cluster_layer.main(
        ["--hosts", "2", "--repeat", "1", "--warmup", "0", "--size-mb", "20"]
    )
    lines = capsys.readouterr().out.splitlines()

    # it built its own hosts and left nothing: no process on them, no ssh, no namespace
    [hosts] = cluster_built_hosts
    common.leftover_check(hosts, grace=0)
    assert _ssh_clients_of(hosts) == []
    assert not hosts.base_dir.exists()
    assert not [h.netns for h in hosts.hosts if h.netns and (NETNS_DIR / h.netns).exists()]

    skipped = cluster_layer.sshcluster_unavailable() is not None
    assert (cluster_layer.SSHCLUSTER_SKIPPED in lines) == skipped

    start = _table(lines, cluster_layer.START_TITLE)
    assert [row[:2] for row in start] == [["2", case] for case in cluster_layer.CASES]
    for row in start:
        assert len(row) == 7
        if row[1] == cluster_layer.SSHCLUSTER and skipped:
            assert row[2:] == ["skipped", "-", "-", "-", "0"]
        else:  # every case ran, without a failed run
            assert _is_number(row[2]) and _is_number(row[3]), row
            assert row[4].endswith("x") and row[6] == "1", row
    floor = cluster_layer.CASES.index(cluster_layer.FLOOR)
    assert start[floor][4] == "1.00x"  # the floor against itself

    breakdown = _table(lines, cluster_layer.BREAKDOWN_TITLE)
    cases = [*cluster_layer.OURS_MODES, cluster_layer.FLOOR]
    assert [row[0] for row in breakdown] == [f"2 hosts, {case}" for case in cases]
    assert all(len(row) == 1 + len(cluster_layer.BREAKDOWN_COLUMNS) for row in breakdown)
    assert all(_is_number(row[-1]) for row in breakdown)

    cleanup = _table(lines, cluster_layer.CLEANUP_TITLE)
    assert [row[:2] for row in cleanup] == [["2", case] for case in cluster_layer.OURS_MODES]
    assert all(_is_number(row[2]) and row[-1] == "none" for row in cleanup)
    cleanup_phases = _table(lines, cluster_layer.CLEANUP_BREAKDOWN_TITLE)
    assert [row[0] for row in cleanup_phases] == [f"2 hosts, {c}" for c in cluster_layer.OURS_MODES]

    tunnel = _table(lines, cluster_layer.TUNNEL_TITLE)
    assert len(tunnel) == 2 and all(len(row) == 5 and _is_number(row[1]) for row in tunnel)
    assert tunnel[1][-1] == "1.00x"

    summary = _table(lines, cluster_layer.SUMMARY_TITLE)
    assert [row[0] for row in summary] == [t.name for t in targets]
    modes = len(cluster_layer.OURS_MODES)
    assert len(targets) == 2 * modes + modes + 1  # start (x floor/SSHCluster), cleanup, tunnel
    for row, target in zip(summary, targets, strict=True):
        expected = "n/a" if target.value is None else ("PASS" if target.passed else "MISS")
        assert row[-1] == expected
        assert expected != "n/a" or (skipped and "SSHCluster" in target.name)
    assert "targets met" in lines[-1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prefect_layer_benchmark_prints_its_table(
    prefect_api: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import prefect_layer

    total, ours = prefect_layer.main(["--hosts", "2", "--repeat", "1"])
    out = capsys.readouterr().out
    assert total[0] == "lifecycle flow overhead" and ours[0] == "overhead beyond an empty flow"
    assert "plain DaskCluster start/job/cleanup" in out and "an empty Prefect flow" in out
    assert f"{total[1]:.2f} s = {100 * total[2]:.0f} %" in out
    assert f"{ours[1]:.2f} s = {100 * ours[2]:.0f} %" in out
