"""The benchmarks count failed repetitions as failures, and run end to end on 2 test hosts."""

from __future__ import annotations

import math
import os
import re
import sys
import types
from typing import Any

import psutil
import pytest

from benchmarks import cluster_layer, common, host_layer, prefect_layer, run_all
from lazycluster_tasks.testing.hosts import NETNS_DIR, SSHD, TestHosts


def _flaky(fail_on: set[int]) -> Any:
    """A case that raises on the given calls (1-based) and succeeds on the others."""
    calls = 0

    def case() -> None:
        nonlocal calls
        calls += 1
        if calls in fail_on:
            raise RuntimeError(f"call {calls} failed")

    return case


def test_a_failed_repetition_is_counted_and_fails_the_target() -> None:
    # warm-up = call 1, rounds = calls 2..4: call 3 fails
    timings = common.timeit_interleaved({"flaky": _flaky({3}), "steady": _flaky(set())}, 3)
    flaky, steady = timings["flaky"], timings["steady"]
    assert (len(flaky.samples), flaky.failed, flaky.runs, flaky.failures) == (2, 1, 3, "1/3")
    assert flaky.errors == ("round 2/3: RuntimeError: call 3 failed",)
    assert common.error_lines({"flaky": flaky}) == [f"flaky failed in {flaky.errors[0]}"]
    assert (steady.failures, len(steady.samples)) == ("0/3", 3)

    # its median (of the successful runs) meets any limit, and still the target is FAIL
    failing = host_layer.TargetResult("t", flaky, steady, limit=1e9)
    assert failing.ratio <= failing.limit
    assert (failing.status, failing.passed, failing.failed) == ("FAIL", False, 1)
    clean = host_layer.TargetResult("t", steady, steady, limit=1e9)
    assert (clean.status, clean.passed) == ("PASS", True)
    assert host_layer.TargetResult("t", steady, steady, limit=0).status == "MISS"
    assert common.exit_code([clean, failing]) == 1
    assert common.exit_code([clean]) == 0

    flow = prefect_layer.Target(flaky, steady)
    assert flow.status == "FAIL" and prefect_layer.Target(steady, steady).status == "PASS"


def test_a_failed_warm_up_or_check_counts_and_a_case_is_given_up() -> None:
    checks: list[int] = []

    def check() -> None:  # runs after every repetition, failed ones too; fails the 5th
        checks.append(1)
        if len(checks) == 5:  # after "warm" in round 2
            raise RuntimeError("left behind")

    timings = common.timeit_interleaved(
        {"warm": _flaky({1}), "never": _flaky(set(range(1, 10)))}, repeat=4, check=check
    )
    assert len(checks) == 2 + 2 + 2 + 1 + 1  # warm-up and 2 rounds of both, then only "warm"
    warm, never = timings["warm"], timings["never"]
    assert warm.errors == (
        "warm-up: RuntimeError: call 1 failed",
        "round 2/4: RuntimeError: left behind",
    )
    assert (warm.failures, len(warm.samples)) == ("2/5", 3)
    assert never.failed == common.MAX_FAILURES and never.not_run == 5 - common.MAX_FAILURES
    assert never.failures == "3/3, 2 not run"
    assert math.isnan(never.median) and common.fmt_ms(never.p90) == "-"
    assert common.fmt_ratio(warm.median / never.median) == "-"


def test_cluster_layer_counts_a_failed_start_as_failure() -> None:
    results = {case: cluster_layer.CaseResult() for case in cluster_layer.CASES}
    results[cluster_layer.FLOOR].starts = [2.0, 2.0, 2.0]
    direct = results[cluster_layer.OURS_DIRECT]
    direct.starts, direct.cleanups = [1.0, 1.0], [0.1, 0.1]
    direct.errors = ["round 2/3: RuntimeError: start failed"]
    ok = results[cluster_layer.OURS_TUNNELLED]
    ok.starts, ok.cleanups = [1.0, 1.0, 1.0], [0.1, 0.1, 0.1]
    results[cluster_layer.SSHCLUSTER].skipped = cluster_layer.SSHCLUSTER_SKIPPED
    all_results = {2: results}

    rows = {row[1]: row for row in cluster_layer.start_rows(all_results)}
    # the median of the successful starts, and the failed one beside it
    assert rows[cluster_layer.OURS_DIRECT][2:] == ["1.00", "1.00", "0.50x", "-", "1/3"]
    assert rows[cluster_layer.OURS_TUNNELLED][-1] == "0/3"
    assert rows[cluster_layer.OURS_AUTO_OPEN][2:] == ["FAILED", "-", "-", "-", "0/0"]
    assert rows[cluster_layer.SSHCLUSTER][2:] == ["skipped", "-", "-", "-", "0/0"]

    targets = {t.name: t for t in cluster_layer.start_targets(all_results)}
    failing = targets["start ours direct, 2 hosts vs floor"]
    assert failing.value == 0.5 and failing.status == "FAIL" and not failing.passed
    assert targets["start ours tunnelled, 2 hosts vs floor"].status == "PASS"
    assert targets["start ours auto (open), 2 hosts vs floor"].status == "n/a"
    assert targets["start ours direct, 2 hosts vs SSHCluster"].status == "FAIL"
    assert targets["start ours tunnelled, 2 hosts vs SSHCluster"].status == "n/a"

    cleanups = {t.name: t.status for t in cluster_layer.cleanup_targets(all_results)}
    assert cleanups["cleanup ours direct, 2 hosts (+ nothing left)"] == "FAIL"
    assert cleanups["cleanup ours tunnelled, 2 hosts (+ nothing left)"] == "PASS"
    assert common.exit_code(targets.values()) == 1


def test_every_cluster_layer_case_can_be_chosen_by_name() -> None:
    assert cluster_layer.parse_args(["--cases", ",".join(cluster_layer.CASES)]).cases == list(
        cluster_layer.CASES
    )
    for case in cluster_layer.CASES:
        chosen = cluster_layer.parse_args(["--cases", f"{case},{cluster_layer.FLOOR}"]).cases
        assert chosen[0] == case


def test_run_all_reports_a_failed_benchmark(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    verdicts = {"clean": ["PASS", "MISS"], "flaky": ["PASS", "FAIL"]}
    for name, statuses in verdicts.items():
        module = types.ModuleType(name)
        targets = [types.SimpleNamespace(status=status) for status in statuses]
        module.main = lambda argv, targets=targets: targets  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, f"benchmarks._{name}", module)

    monkeypatch.setattr(run_all, "MODULES", ["benchmarks._clean"])
    assert run_all.main([]) == 0
    monkeypatch.setattr(run_all, "MODULES", ["benchmarks._clean", "benchmarks._flaky"])
    assert run_all.main([]) == 1
    table = _table(capsys.readouterr().out.splitlines()[-7:], "benchmarks run")
    assert [(row[0], row[-1]) for row in table] == [
        ("benchmarks._clean", "ok"),
        ("benchmarks._flaky", "FAILED"),
    ]


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
    assert all(t.failed == 0 for t in targets)

    round_trip = _table(lines, host_layer.ROUND_TRIP_TITLE)
    cases = [host_layer.RUN, host_layer.ECHO, host_layer.OPENSSH]
    cases += [host_layer.PARAMIKO, host_layer.PARAMIKO_NODELAY]
    assert [row[0] for row in round_trip] == cases
    for row in round_trip:  # failures, then the ratios to OpenSSH and to both paramiko peers
        assert len(row) == 8 and row[4] == "0/2", row
        assert all(cell.endswith("x") for cell in row[5:]), row
    assert [round_trip[i][5 + i - 2] for i in (2, 3, 4)] == ["1.00x"] * 3

    broadcast = _table(lines, host_layer.BROADCAST_TITLE)
    assert [row[0] for row in broadcast] == ["1", "2"]
    assert all(len(row) == 8 and row[5:7] == ["0/2", "0/2"] for row in broadcast)
    assert all(row[-1].endswith("x") for row in broadcast)

    summary = _table(lines, host_layer.SUMMARY_TITLE)
    assert [row[0] for row in summary] == names
    for row, target in zip(summary, targets, strict=True):
        assert row[-2:] == ["0/4", target.status] and target.status in ("PASS", "MISS")
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

    c = cluster_layer
    # the auto cases (their probe) and tunnelled LazySSHCluster run elsewhere in the suite
    # (LazySSHCluster direct starts in most other tests)
    selected = [c.OURS_DIRECT, c.OURS_TUNNELLED, c.FLOOR, c.SSHCLUSTER]
    options = ["--hosts", "2", "--repeat", "1", "--warmup", "0", "--size-mb", "20"]
    targets = cluster_layer.main([*options, "--cases", ",".join(selected)])
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
        if (row[1] == cluster_layer.SSHCLUSTER and skipped) or row[1] not in selected:
            assert row[2:] == ["skipped", "-", "-", "-", "0/0"]
        else:  # every case ran, without a failed run
            assert _is_number(row[2]) and _is_number(row[3]), row
            assert row[4].endswith("x") and row[6] == "0/1", row
    floor = cluster_layer.CASES.index(cluster_layer.FLOOR)
    assert start[floor][4] == "1.00x"  # the floor against itself

    breakdown = _table(lines, cluster_layer.BREAKDOWN_TITLE)
    cases = [case for case in (*cluster_layer.OURS_MODES, cluster_layer.FLOOR) if case in selected]
    assert [row[0] for row in breakdown] == [f"2 hosts, {case}" for case in cases]
    assert all(len(row) == 1 + len(cluster_layer.BREAKDOWN_COLUMNS) for row in breakdown)
    assert all(_is_number(row[-1]) for row in breakdown)

    cleanup = _table(lines, cluster_layer.CLEANUP_TITLE)
    assert [row[:2] for row in cleanup] == [["2", case] for case in cluster_layer.TIMED_CASES]
    for row in cleanup:
        assert row[-1] == "none"
        assert _is_number(row[2]) if row[1] in selected else row[2] == "skipped", row
    cleanup_phases = _table(lines, cluster_layer.CLEANUP_BREAKDOWN_TITLE)
    ours = [case for case in cluster_layer.OURS_MODES if case in selected]
    assert [row[0] for row in cleanup_phases] == [f"2 hosts, {case}" for case in ours]

    tunnel = _table(lines, cluster_layer.TUNNEL_TITLE)
    # on the runtime's OpenSSH master, on paramiko, and OpenSSH itself (the reference)
    assert len(tunnel) == 3 and all(len(row) == 5 and _is_number(row[1]) for row in tunnel)
    assert "OpenSSH master" in tunnel[0][0] and "paramiko" in tunnel[1][0]
    assert tunnel[2][-1] == "1.00x"

    summary = _table(lines, cluster_layer.SUMMARY_TITLE)
    assert [row[0] for row in summary] == [t.name for t in targets]
    modes = len(cluster_layer.TIMED_CASES)
    assert len(targets) == 2 * modes + modes + 1  # start (x floor/SSHCluster), cleanup, tunnel
    for row, target in zip(summary, targets, strict=True):
        assert row[-1] == target.status and target.status != "FAIL"
        unselected = not any(f" {case}," in target.name for case in selected)
        assert target.status != "n/a" or unselected or (skipped and "SSHCluster" in target.name)
    assert "targets met" in lines[-1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prefect_layer_benchmark_prints_its_table(
    prefect_api: str, capsys: pytest.CaptureFixture[str]
) -> None:
    targets = prefect_layer.main(["--hosts", "2", "--repeat", "1", "--warmup", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert all(t.failed == 0 and t.status in ("PASS", "MISS") for t in targets)
    assert "added" not in "\n".join(lines)  # no derived difference, each time as its own row

    table = _table(lines, prefect_layer.TABLE_TITLE)
    cases = [prefect_layer.PLAIN, prefect_layer.FLOW, prefect_layer.EMPTY, prefect_layer.WAIT]
    assert [row[0] for row in table] == cases
    for row in table:
        assert _is_number(row[1]) and _is_number(row[2]) and row[3] == "0/1", row
    wait, empty = float(table[3][1]), float(table[2][1])
    assert 0 < wait <= empty  # measured inside the empty flow's runs

    summary = _table(lines, prefect_layer.SUMMARY_TITLE)
    assert [row[0] for row in summary] == [t.name for t in targets]
    assert [row[-2:] for row in summary] == [["0/2", targets[0].status], ["0/3", targets[1].status]]
    plain, empty = float(table[0][1]), float(table[2][1])
    assert float(summary[1][3]) == pytest.approx(
        plain + empty + prefect_layer.OWN_SECONDS, abs=0.02
    )


def test_dataplane_targets_compare_within_a_host_count() -> None:
    from benchmarks import dataplane

    def row(case: str, **values: float) -> dataplane.Row:
        return dataplane.Row(3, case, {k.replace("_", " "): str(v) for k, v in values.items()})

    throughputs = ("pair MiB/s", "ring MiB/s", "all-to-all MiB/s", "gather MiB/s")
    rows = [
        row("direct", **dict.fromkeys(throughputs, 100)),
        row(
            "tunnelled",
            **dict(zip(throughputs, (85, 40, 80, 79.6), strict=True)),
            forwards=9,
            peak_threads=20,
            cleanup_s=1.5,
        ),
    ]
    found = {t.name: (t.value, t.status) for t in dataplane.targets(rows)}
    assert found["3 hosts: tunnelled pair MiB/s >= 0.8x direct"] == ("0.85x", common.PASS)
    assert found["3 hosts: tunnelled ring MiB/s >= 0.8x direct"] == ("0.40x", common.MISS)
    assert found["3 hosts: tunnelled all-to-all MiB/s >= 0.8x direct"] == ("0.80x", common.PASS)
    assert found["3 hosts: tunnelled gather MiB/s >= 0.8x direct"] == ("0.79x", common.MISS)
    assert found["3 hosts: tunnelled forwards <= 2 x workers + hosts (9)"] == ("9", common.PASS)
    assert found["3 hosts: tunnelled cleanup s <= 1"] == ("1.5", common.MISS)
    assert not any(dataplane.RELAY in name for name in found)  # that case was not run
    rows.append(row(dataplane.RELAY, **dict.fromkeys(throughputs, 23)))
    found = {t.name: (t.value, t.status) for t in dataplane.targets(rows)}
    relay = [v for name, v in found.items() if name.startswith(f"3 hosts: {dataplane.RELAY} ")]
    assert relay == [("0.23x", common.MISS)] * 4
    for failed in rows[1:]:
        failed.error = "boom"  # a failed case fails every target it would feed
    assert {t.status for t in dataplane.targets(rows)} == {common.FAIL}


def test_environments_benchmark_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import environments

    targets = environments.main(["--hosts", "1", "--repeat", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert [t.status in ("PASS", "MISS") for t in targets] == [True, True], out
    assert "bytes / link" in targets[1].name and targets[1].ratio is not None, out
    rows = {line.split("  ")[0]: line.split() for line in out.splitlines() if "1 hosts, " in line}
    first = rows["1 hosts, first start"]
    assert float(first[-4]) > 1 and first[-1] == "0/1"  # MiB sent per host, no failure
    assert (
        rows["1 hosts, cached start"][-4] == "0.0" and rows["1 hosts, pre-installed"][-1] == "0/1"
    )
    # the link, measured in the run: the same bytes a first start sent, by plain ssh
    copied = rows["1 hosts, link (ssh cat)"]
    assert copied[-4] == first[-4] and float(copied[-3]) > 0, out


def test_the_scale_model_fits_and_flags_growth_with_hosts_squared() -> None:
    from benchmarks import scale

    assert [round(c, 6) for c in scale.fit([(1, 3.0), (2, 5.0), (4, 9.0)], 1)] == [1.0, 2.0]
    quad = scale.fit([(1, 2.0), (2, 5.0), (3, 10.0), (4, 17.0)], 2)  # 1 + N²
    assert [round(c, 6) for c in quad] == [1.0, 0.0, 1.0]
    rows = [
        scale.Row(n, "direct", {"threads": 10 + 2 * n, "fds": 20 + n * n}) for n in (3, 8, 16, 32)
    ]
    found = {m.measure: m for m in scale.models(rows)}
    assert not found["threads"].quadratic_matters and round(found["threads"].at(1000)) == 2010
    assert found["fds"].quadratic_matters and round(found["fds"].at(1000)) == 1_000_020


def test_scale_benchmark_prints_its_tables(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import scale

    # one mode (the one with more parts: forwards, masters, relay); `make bench` runs both
    targets = scale.main(["--hosts", "1,2,3", "--idle", "1", "--modes", "tunnelled"])
    out = capsys.readouterr().out
    assert "model: per-host cost" in out and "at 1000" in out, out
    assert all(t.status in ("PASS", "MISS") for t in targets), out
    assert len(targets) >= 5 + 1, out  # five growth targets and idle CPU
    assert "hosts, tunnelled" in out and "hosts, direct" not in out, out
