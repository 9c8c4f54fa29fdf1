"""The ``lazycluster`` command end to end on the test hosts, run as users run it: a process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lazycluster_tasks.cli import app, parse_workers_per_host
from lazycluster_tasks.prefect.blocks import HostGroupBlock, SSHSettingsBlock
from lazycluster_tasks.testing.helpers import local_leftovers, wait_until
from lazycluster_tasks.testing.hosts import TestHosts

pytestmark = [pytest.mark.multihost]


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lazycluster_tasks.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli_env(multi_hosts: TestHosts, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "LAZYCLUSTER_SSH_CONFIG": str(multi_hosts.ssh_config_path),
        "LAZYCLUSTER_STATE_DIR": str(tmp_path / "state"),
        "COLUMNS": "200",
    }


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "lazycluster"
    assert script.exists()
    from lazycluster_tasks import __version__

    for args in (["version"], ["--version"]):
        done = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout) == (0, f"lazycluster-tasks {__version__}\n")


def test_a_fresh_process_finds_both_block_types() -> None:
    """Prefect loads the collection's entry point: the module that defines the blocks."""
    probe = (
        "from prefect.blocks.core import Block\n"
        "for key in ('lazycluster-host-group', 'lazycluster-ssh-settings',\n"
        "            'lazycluster-ssh-command'):\n"
        "    print(Block.get_block_class_from_key(key).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    found = done.stdout.split()
    assert found == ["HostGroupBlock", "SSHSettingsBlock", "SSHCommand"], done.stderr[-2000:]


def test_hosts_up_status_logs_exec_down(
    prefect_api: str, multi_hosts: TestHosts, no_leftovers: TestHosts, cli_env: dict[str, str]
) -> None:
    found = _cli(cli_env, "hosts", "--json", "host1", "host2")
    assert found.returncode == 0, found.stderr
    rows = json.loads(found.stdout)
    assert [r["host"] for r in rows] == ["host1", "host2"]
    assert all(r["reachable"] and r["cores"] >= 1 and r["distributed"] for r in rows)
    table = _cli(cli_env, "hosts", "host1")
    assert table.returncode == 0 and "host1" in table.stdout and "distributed" in table.stdout

    # hosts, workers per host, network mode and ssh config all come from the host group block
    ssh = SSHSettingsBlock(ssh_config_path=str(multi_hosts.ssh_config_path))
    HostGroupBlock(hosts=["host1", "host2"], network_mode="tunnelled", ssh=ssh).save(
        "cli-group", overwrite=True
    )
    # the block's ssh config wins over LAZYCLUSTER_SSH_CONFIG (here one that does not exist)
    elsewhere = {**cli_env, "LAZYCLUSTER_SSH_CONFIG": "/nonexistent/ssh_config"}
    # --no-host-links: no host's authorized_keys is touched (worker traffic goes through here)
    keys = {h: multi_hosts.authorized_keys_bytes(h) for h in ("host1", "host2")}
    started = _cli(elsewhere, "up", "--detach", "--no-host-links", "--host-group", "cli-group")
    assert started.returncode == 0, started.stderr
    (cluster_id,) = re.findall(
        r"cluster (\w+) running \(tunnelled\): 2 workers on 2 hosts", started.stdout
    )
    assert "scheduler tls://127.0.0.1:" in started.stdout
    try:
        status = _cli(cli_env, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert {h: multi_hosts.authorized_keys_bytes(h) for h in keys} == keys
        (row,) = json.loads(status.stdout)
        assert (row["cluster_id"], row["state"], row["workers"]) == (cluster_id, "running", 2)
        assert multi_hosts.processes("host1") and multi_hosts.processes("host2")

        logs = _cli(cli_env, "logs", cluster_id, "--lines", "200")
        assert logs.returncode == 0, logs.stderr
        assert "--- host1 host1-0" in logs.stdout and "Registered to" in logs.stdout

        ran = _cli(cli_env, "exec", "-H", "host1", "-H", "host2", "hostname")
        assert ran.returncode == 0, ran.stderr
        assert (
            "--- host1 (exit 0)\nhost1" in ran.stdout and "--- host2 (exit 0)\nhost2" in ran.stdout
        )
        failing = _cli(cli_env, "exec", "-H", "host1", "echo no; exit 3")
        assert failing.returncode == 1 and "--- host1 (exit 3)" in failing.stdout
    finally:
        stopped = _cli(cli_env, "down", cluster_id)
    assert stopped.returncode == 0, stopped.stderr
    assert f"cluster {cluster_id} stopped" in stopped.stdout
    assert _cli(cli_env, "status").stdout.strip() == "no clusters"
    unknown = _cli(cli_env, "down", cluster_id)
    assert unknown.returncode == 2 and f"no cluster {cluster_id!r}" in unknown.stderr


def test_clear_errors_for_bad_input_and_unreachable_hosts(
    prefect_api: str, multi_hosts: TestHosts, no_leftovers: TestHosts, cli_env: dict[str, str]
) -> None:
    unknown = _cli(cli_env, "hosts", "host1", "no-such-host.invalid")
    assert unknown.returncode == 2
    assert "unknown host(s): no-such-host.invalid" in unknown.stderr
    bad = _cli(cli_env, "up", "--network-mode", "sideways", "host1")
    assert bad.returncode == 2 and "--network-mode must be one of auto, direct, tunnelled" in (
        bad.stderr
    )
    assert _cli(cli_env, "up", "--workers-per-host", "0", "host1").returncode == 2
    nothing = _cli(cli_env, "up")
    assert nothing.returncode == 2 and "give the hosts, or --host-group" in nothing.stderr
    no_group = _cli(cli_env, "up", "--host-group", "no-such-group")
    assert no_group.returncode == 2 and "no Lazycluster Host Group block 'no-such-group'" in (
        no_group.stderr
    )
    missing = _cli(cli_env, "hosts", "--ssh-config", "/nonexistent/ssh_config", "host1")
    assert missing.returncode == 2 and "ssh config file not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    multi_hosts.stop_sshd("host3")
    try:
        down = _cli(cli_env, "hosts", "--json", "host2", "host3")
        assert down.returncode == 1
        rows = {r["host"]: r for r in json.loads(down.stdout)}
        assert rows["host2"]["reachable"] and not rows["host3"]["reachable"]
        assert rows["host3"]["error"]
        ran = _cli(cli_env, "exec", "-H", "host2", "-H", "host3", "true")
        assert ran.returncode == 1
        assert "--- host2 (exit 0)" in ran.stdout and "--- host3: could not run" in ran.stderr
    finally:
        multi_hosts.start_sshd("host3")


def test_down_never_signals_a_process_that_only_has_the_owners_pid(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    """After a reboot (or a long wait) the pid in a cluster's state may be another process of
    the user's: the owner is its pid and its start time, so that one is left alone and the
    record tears the cluster down."""
    from lazycluster_tasks.record import ClusterRecord

    stranger = subprocess.Popen(["sleep", "60"])
    try:
        record = ClusterRecord(
            cluster_id="c0ffee", state="running", network_mode="direct", hosts=[]
        )
        state = {"pid": stranger.pid, "started": 1.0, "record": record.model_dump(mode="json")}
        folder = tmp_path / "state"
        folder.mkdir(mode=0o700)
        (folder / "c0ffee.json").write_text(json.dumps(state))
        status = _cli(cli_env, "status", "--json")
        assert json.loads(status.stdout)[0]["state"] == "owner gone"
        stopped = _cli(cli_env, "down", "c0ffee")
        assert stopped.returncode == 0 and "cluster c0ffee stopped" in stopped.stdout
        assert stranger.poll() is None  # not signalled
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.parametrize(
    ("given", "parsed"),
    [
        (["2"], 2),
        (["gpu1=4", "cpu1=1"], {"gpu1": 4, "cpu1": 1}),
        (["user@gpu1=3"], {"user@gpu1": 3}),
        ([], None),
        (None, None),
    ],
)
def test_workers_per_host_is_one_count_or_host_counts(given: list[str], parsed: object) -> None:
    assert parse_workers_per_host(given) == parsed


@pytest.mark.parametrize(
    ("given", "said"),
    [
        (["0"], "the count must be an integer >= 1, not 0"),
        (["gpu1=0"], "the count must be an integer >= 1, not 0"),
        (["two"], "the count must be an integer >= 1 (N or HOST=N)"),
        (["gpu1=x"], "the count must be an integer >= 1 (N or HOST=N)"),
        (["=2"], "give HOST=N with a host name"),
        (["2", "gpu1=4"], "one count N for every host, or HOST=N entries, not both"),
        (["gpu1=4", "2"], "one count N for every host, or HOST=N entries, not both"),
        (["gpu1=4", "gpu1=2"], "gpu1 given twice"),
    ],
)
def test_workers_per_host_refuses_what_it_cannot_read(given: list[str], said: str) -> None:
    with pytest.raises(ValueError, match=re.escape(said)):
        parse_workers_per_host(given)


def test_up_reads_repeated_workers_per_host_and_checks_the_hosts_first(tmp_path: Path) -> None:
    """``up`` as typer parses it, in this process; each case is bad input, so nothing starts."""
    from typer.testing import CliRunner

    config = tmp_path / "ssh_config"
    config.write_text("")
    runner = CliRunner()
    args = ["up", "--ssh-config", str(config), "localhost"]
    pairs = ["--workers-per-host", "gpu1=4", "--workers-per-host", "cpu1=1"]
    named = runner.invoke(app, [*args, *pairs])
    assert named.exit_code == 2
    assert "--workers-per-host names gpu1, cpu1, not among the hosts (localhost)" in named.stderr
    mixed = runner.invoke(app, [*args, "--workers-per-host", "2", *pairs])
    assert mixed.exit_code == 2 and "not both" in mixed.stderr
    zero = runner.invoke(app, [*args, "--workers-per-host", "0"])
    assert zero.exit_code == 2 and "integer >= 1, not 0" in zero.stderr


HOLD = """
import sys, time
from lazycluster_tasks import LazySSHCluster
c = LazySSHCluster(sys.argv[2:], ssh_config_path=sys.argv[1], network_mode="tunnelled",
                   threads_per_worker=1)
c.engine.routing.links.wait()
print(c.engine.cluster_id, flush=True)
time.sleep(600)
"""


def test_sweep_finds_and_removes_what_a_killed_controller_left(
    multi_hosts: TestHosts, no_leftovers: TestHosts
) -> None:
    """A controller SIGKILLed where the guards died too (KILLed here, first: they would clean
    up after it): sweep lists the cluster's folders, processes and link keys, then removes
    them all by itself."""
    hosts = ["host1", "host2", "host3"]
    config = str(multi_hosts.ssh_config_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, config, *hosts], stdout=subprocess.PIPE, text=True
    )
    cluster_id = ""
    try:
        cluster_id = holder.stdout.readline().strip()  # type: ignore[union-attr]
        assert re.fullmatch(r"[0-9a-f]{12}", cluster_id), cluster_id
        pattern = f"lazycluster-{cluster_id}/hostside.pyz"
        for host in hosts:  # the guards cannot act: they died too (a host may see them all)
            multi_hosts.run_in(host, ["pkill", "-KILL", "-f", pattern]).wait()
        subprocess.run(["pkill", "-KILL", "-f", pattern], check=False)  # the scheduler's here

        def gone() -> bool:
            here = subprocess.run(["pgrep", "-f", pattern], check=False).returncode == 1
            return here and all(
                multi_hosts.run_in(h, ["pgrep", "-f", pattern]).wait() == 1 for h in hosts
            )

        assert wait_until(gone, 10)
        holder.kill()  # then the controller (its healing would start workers again)
        holder.wait()
        _sweep_and_check(multi_hosts, hosts, config, cluster_id)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()  # type: ignore[union-attr]
        if cluster_id:  # none may outlive the test, whatever failed
            pattern = f"lazycluster-{cluster_id}/hostside.pyz"
            for host in hosts:
                multi_hosts.run_in(host, ["pkill", "-KILL", "-f", pattern]).wait()
            subprocess.run(["pkill", "-KILL", "-f", pattern], check=False)


def _sweep_and_check(
    multi_hosts: TestHosts, hosts: list[str], config: str, cluster_id: str
) -> None:
    marker = f"lazycluster-link-{cluster_id}"
    keyed = [h for h in hosts if marker in multi_hosts.authorized_keys(h)]
    assert keyed, "the links let keys in"
    env = {**os.environ, "LAZYCLUSTER_SSH_CONFIG": config}
    # this machine too: the scheduler ran here, its folder is in this machine's temp dir
    argv = [sys.executable, "-m", "lazycluster_tasks.cli", "sweep", "localhost", *hosts]
    dry = subprocess.run([*argv, "--dry-run", "--json"], env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    found = json.loads(dry.stdout)["hosts"]
    for host in hosts:
        # these hosts share one temp dir: each sees every host's folder of the cluster
        folders = [f for f in found[host]["folders"] if f["path"].endswith(cluster_id)]
        assert folders and all(any(f["pids"].values()) for f in folders), found[host]
        assert (marker in found[host]["markers"]) == (host in keyed)
    assert all(marker in multi_hosts.authorized_keys(h) for h in keyed)  # dry: nothing changed
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"host1: removed [1-3] cluster folders", done.stdout), done.stdout
    assert not any(marker in multi_hosts.authorized_keys(h) for h in hosts)
    again = subprocess.run([*argv, "--dry-run", "--json"], env=env, capture_output=True, text=True)
    left = json.loads(again.stdout)["hosts"]
    assert not [
        f for h in ["localhost", *hosts] for f in left[h]["folders"] if cluster_id in f["path"]
    ]
    # nothing of the cluster runs here either (its stopped guard included)
    assert wait_until(lambda: not local_leftovers(cluster_id), 10), local_leftovers(cluster_id)


def test_up_takes_the_options_dask_ssh_users_reach_for_first(
    multi_hosts: TestHosts, no_leftovers: TestHosts, cli_env: dict[str, str]
) -> None:
    from distributed import Client

    started = _cli(
        cli_env, "up", "--detach", "host1", "host2",
        "--threads-per-worker", "2", "--memory-limit", "1GiB", "--ports", "61000-61099",
        "--scheduler-host", "host2", "--setup", "export SITE_STEP=up", "--no-tls",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    assert "warning: --no-tls" in started.stderr
    (cluster_id,) = re.findall(r"cluster (\w+) running", started.stdout)
    (address,) = re.findall(r"scheduler (tcp://\S+)", started.stdout)
    try:
        with Client(address, timeout=30) as client:
            workers = client.scheduler_info(n_workers=-1)["workers"]
            assert {(w["nthreads"], w["memory_limit"]) for w in workers.values()} == {(2, 2**30)}
            ports = {int(a.rsplit(":", 1)[1]) for a in workers}
            assert all(61000 <= p <= 61099 for p in ports), ports
            assert set(client.run(lambda: __import__("os").environ.get("SITE_STEP")).values()) == {
                "up"
            }
            where = client.run_on_scheduler(lambda: __import__("socket").gethostname())
            assert where == "host2"
    finally:
        stopped = _cli(cli_env, "down", cluster_id)
    assert stopped.returncode == 0, stopped.stderr
    for wrong in (["--ports", "61000"], ["--python", "a=/x", "--python", "/y"]):
        bad = _cli(cli_env, "up", "host1", *wrong)
        assert bad.returncode == 2 and wrong[0] in bad.stderr, bad.stderr
