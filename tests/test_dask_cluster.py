"""DaskCluster on real SSH test hosts: real schedulers and workers, results traced to hosts."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lazycluster_tasks import (
    GroupError,
    MasterStartError,
    NetworkPathError,
    NoPortsLeftError,
    PortInUseError,
    RemoteEnvironmentError,
    Runtime,
    RuntimeGroup,
    WorkerStartError,
    dask_launchers,
)
from lazycluster_tasks import ports as portlib
from lazycluster_tasks.dask import CONTROLLER_KEY, DaskCluster, teardown
from lazycluster_tasks.testing.helpers import DASK_CONTROLLER, local_leftovers, wait_until

pytestmark = pytest.mark.slow

HOSTS = ["host1", "host2", "host3"]


def where_work_ran(cluster: DaskCluster) -> dict[str, str]:
    """Run a real task pinned to each worker; map worker name -> hostname it computed on."""
    client = cluster.get_client(timeout=10)
    workers = client.scheduler_info(n_workers=-1)["workers"]
    futures = {
        info["name"]: client.submit(
            lambda x: (x * x, socket.gethostname()),
            len(info["name"]),
            workers=[address],
            pure=False,
        )
        for address, info in workers.items()
    }
    results = {name: future.result(timeout=30) for name, future in futures.items()}
    assert all(value == len(name) ** 2 for name, (value, _) in results.items())
    return {name: host for name, (_, host) in results.items()}


@pytest.mark.parametrize(
    ("master", "switch"),  # a local scheduler in the open network: most other tests
    [("local", "ssh-only"), ("remote", "open"), ("remote", "ssh-only")],
)
def test_work_runs_on_every_host(multi_hosts, make_cluster, switch, master):
    multi_hosts.ssh_only(switch == "ssh-only")
    try:
        cluster = make_cluster(
            cls=DaskCluster,
            master_host="host2" if master == "remote" else None,
            dashboard=True,
            nanny=True,  # Dask's default, and ours
        )
        cluster.start()
        assert cluster.network_mode == ("tunnelled" if switch == "ssh-only" else "direct")
        ran_on = where_work_ran(cluster)
        assert ran_on == {f"{h}-{i}": h for i, h in enumerate(HOSTS)}
        assert {w["host"] for w in cluster.workers.values()} == set(HOSTS)
        if switch == "ssh-only":
            assert cluster.scheduler_address.startswith("tls://127.0.0.1:")  # TLS by default
        with urllib.request.urlopen(
            cluster.dashboard_link.replace("/status", "/health"), timeout=10
        ) as r:
            assert r.read() == b"ok"
    finally:
        multi_hosts.ssh_only(False)


def test_explicit_modes_hold_with_the_switch_off(make_cluster):
    cluster = make_cluster(cls=DaskCluster, hosts=["host1", "host2"], network_mode="tunnelled")
    cluster.start()
    assert cluster.network_mode == "tunnelled"
    assert set(where_work_ran(cluster).values()) == {"host1", "host2"}


def test_scale_up_and_down_and_a_killed_worker(multi_hosts, make_cluster):
    cluster = make_cluster(cls=DaskCluster, hosts=["host1", "host2"], nanny=False)
    cluster.start()
    cluster.scale(4)
    assert sorted(cluster.workers) == ["host1-0", "host1-2", "host2-1", "host2-3"]
    assert set(where_work_ran(cluster).values()) == {"host1", "host2"}
    client = cluster.get_client(timeout=10)
    slow = client.map(lambda x: time.sleep(0.5) or x, range(16), pure=False)
    victim = cluster.workers["host2-3"]
    assert (
        multi_hosts.run_in("host2", ["kill", "-s", "KILL", "--", f"-{victim['pid']}"]).wait() == 0
    )
    assert sorted(client.gather(slow)) == list(range(16))  # the cluster keeps serving
    assert wait_until(lambda: "host2-3" not in cluster.workers, timeout=15)
    cluster.scale(1)
    assert list(cluster.workers) == ["host1-0"]
    assert multi_hosts.processes("host2") == []  # scaled-down workers are stopped


def test_master_that_cannot_start(make_cluster, multi_hosts):
    cluster = make_cluster(cls=DaskCluster, scheduler_options=["--no-such-option"])
    start = time.monotonic()
    with pytest.raises(
        MasterStartError, match=r"(?s)scheduler on localhost exited.*Unknown argument"
    ):
        cluster.start()
    assert time.monotonic() - start < 10
    assert local_leftovers(cluster.cluster_id) == []


def test_master_that_never_listens(make_cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(dask_launchers, "MIN_MASTER_WAIT", 2.0)  # lazycluster's short timeouts
    python = tmp_path / "python-whose-scheduler-hangs"
    python.write_text(
        "#!/bin/sh\n"
        'case "$*" in *dask_scheduler*) exec sleep 60;; esac\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    cluster = make_cluster(
        cls=DaskCluster, hosts=["host1"], python_executable={"localhost": str(python)}
    )
    start = time.monotonic()
    with pytest.raises(MasterStartError, match="not up within 2 s"):
        cluster.start_master(timeout=2)
    assert time.monotonic() - start < 8
    assert local_leftovers(cluster.cluster_id) == []


def free_local_ports(count: int, start: int = 23000) -> list[int]:
    """Free ports below the ephemeral range (outgoing connections cannot take them)."""
    used = Runtime("localhost").used_ports()
    return [p for p in range(start, start + 1000) if p not in used][:count]


def test_master_ports(make_cluster):
    cluster = make_cluster(cls=DaskCluster, hosts=["host1"])
    a, b, c, d = free_local_ports(4)
    with socket.create_server(("127.0.0.1", a)):
        with pytest.raises(PortInUseError, match=str(a)):
            cluster.start_master(master_port=a)
        with pytest.raises(NoPortsLeftError):
            cluster._master_launcher.start([a])
        with socket.create_server(("0.0.0.0", b)):
            remaining = cluster._master_launcher.start([a, b, c, d])
    assert cluster.master_port == c and remaining == [a, b, d]


def test_port_taken_between_probe_and_bind(make_cluster):
    ports = free_local_ports(3, start=24000)
    cluster = make_cluster(cls=DaskCluster, hosts=["host1"], ports=ports)
    cluster.ensure_plan(cluster.ports)  # the probe: everything free
    with socket.create_server(("0.0.0.0", ports[0])):  # then someone takes the first port
        cluster._master_launcher.start(ports)
        assert cluster.master_port == ports[1]


def test_scheduler_port_taken_here_before_its_forward(make_cluster, monkeypatch):
    """Tunnelled, with the scheduler on a host: its port must be free here too, for the
    forward. Taken here between the probe and the forward, the next port is used, and no
    forward of the first stays open."""
    ports = free_local_ports(8, start=24100)
    monkeypatch.setattr(DaskCluster, "DEFAULT_MASTER_PORT", ports[0])
    cluster = make_cluster(
        cls=DaskCluster, master_host="host2", network_mode="tunnelled", ports=ports[1:]
    )
    cluster.ensure_plan(ports)  # the probe: everything free
    routing = cluster.engine.routing
    real, taken = routing.route_scheduler, []

    def someone_takes_it_first(runtime, port):
        if not taken:
            taken.append(socket.create_server(("127.0.0.1", port)))
        real(runtime, port)

    monkeypatch.setattr(routing, "route_scheduler", someone_takes_it_first)
    try:
        cluster.start(worker_count=2)
        assert cluster.master_port == ports[1]
        assert [t for rt in cluster.runtime_group.runtimes for t in rt.tunnels
                if ports[0] in (t.local_port, t.remote_port)] == []  # fmt: skip
        assert sorted(where_work_ran(cluster).values()) == ["host1", "host2"]
    finally:
        for listener in taken:
            listener.close()


@pytest.mark.parametrize("when", ["before the check", "after the check"])
def test_worker_port_taken_here_before_its_forward(make_cluster, monkeypatch, when):
    """Tunnelled, every worker port is forwarded here too. Taken here between the probe and
    the forward (another cluster's forward, say), the workers start again on other ports, and
    no forward of the taken port stays open; also when it is taken between the forward's own
    check of the ports in use and its bind (an outgoing connection's port: this machine's
    ephemeral ports include lazycluster's range)."""
    ports = free_local_ports(12, start=24200)
    monkeypatch.setattr(DaskCluster, "DEFAULT_MASTER_PORT", ports[0])
    cluster = make_cluster(
        cls=DaskCluster, hosts=["host1", "host2"], network_mode="tunnelled", ports=ports[1:]
    )
    engine = cluster.engine
    taken: list[socket.socket] = []

    def someone_takes_one_first(workers):
        if taken:
            return real(workers)
        taken.append(socket.create_server(("127.0.0.1", workers[0].ports[0])))
        if when == "before the check":
            return real(workers)
        with monkeypatch.context() as patch:  # the check saw the port free
            patch.setattr(portlib, "local_used_ports", set)
            return real(workers)

    cluster.ensure_plan(ports)  # the probe: everything free
    real = engine.routing.route_workers
    monkeypatch.setattr(engine.routing, "route_workers", someone_takes_one_first)
    try:
        cluster.start(worker_count=2)
        port = taken[0].getsockname()[1]
        assert port not in [i.ports[0] for i in engine.worker_processes()]
        live = {p for i in engine.table.all() for p in i.ports}  # no forward of the first try
        assert {p for rt in cluster.runtime_group.runtimes for t in rt.tunnels
                for p in (t.local_port, t.remote_port)} <= live  # fmt: skip
        assert sorted(where_work_ran(cluster).values()) == ["host1", "host2"]
    finally:
        for listener in taken:
            listener.close()


def test_worker_ports_skip_taken_ones(multi_hosts, make_cluster):
    blocker = multi_hosts.run_in(
        "host1",
        [
            sys.executable,
            "-c",
            "import socket,time; s=socket.create_server(('0.0.0.0', 62000)); time.sleep(60)",
        ],
    )
    try:
        cluster = make_cluster(
            cls=DaskCluster, hosts=["host1"], ports=[62000, 62001, 62002, 62003], nanny=False
        )
        assert wait_until(
            lambda: not cluster.runtime_group.get_runtime("host1").has_free_port(62000)
        )
        cluster.start(master_port=62003)
        assert cluster.workers["host1-0"]["address"].endswith(":62001")
        assert cluster._worker_launcher.ports_per_host == {"host1": [62001]}
    finally:
        blocker.kill()
        blocker.wait()


def test_host_without_distributed_is_named(make_cluster, tmp_path):
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    bare.chmod(0o755)
    cluster = make_cluster(
        cls=DaskCluster, hosts=["host1", "host2"], python_executable={"host2": str(bare)}
    )
    with pytest.raises(GroupError) as info:
        cluster.start()
    assert list(info.value.errors) == ["host2"]
    assert isinstance(info.value.errors["host2"], RemoteEnvironmentError)
    assert "dask.distributed is not importable" in str(info.value)


def test_host_without_distributed_is_named_in_an_explicit_mode(make_cluster, tmp_path):
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    bare.chmod(0o755)
    cluster = make_cluster(
        cls=DaskCluster,
        hosts=["host1", "host2"],
        network_mode="direct",
        python_executable={"host2": str(bare)},
    )
    with pytest.raises(WorkerStartError, match=r"dask\.distributed is not importable") as info:
        cluster.start()
    assert list(info.value.missing) == ["host2", "scheduler"]


def test_debug_output_logs_and_context_manager(multi_hosts, no_leftovers, capfd):
    group = RuntimeGroup(hosts=["host1"], ssh_config_path=str(multi_hosts.ssh_config_path))
    with DaskCluster(group, nanny=False) as cluster:
        cluster.start(debug=True)
        logs = cluster.get_logs()
        assert set(logs) == {"scheduler", "host1-0"}
        assert "Scheduler at" in logs["scheduler"] and "Registered to" in logs["host1-0"]
        printed: list[str] = []

        def printed_live() -> bool:
            printed.append(capfd.readouterr().out)
            return "Scheduler at" in "".join(printed) and "Registered to" in "".join(printed)

        assert wait_until(printed_live, timeout=10)  # remote output reached our stdout
    assert cluster.state == "stopped"
    assert local_leftovers(cluster.cluster_id) == []


def test_embedded_default_runs_on_this_machine(no_local_leaks):
    cluster = DaskCluster(RuntimeGroup(runtimes=[Runtime("localhost")]), nanny=False)
    try:
        cluster.start()
        assert cluster.network_mode == "direct"
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert set(where_work_ran(cluster).values()) == {socket.gethostname()}
    finally:
        cluster.cleanup()
    assert local_leftovers(cluster.cluster_id) == []


def test_teardown_from_the_record_alone(multi_hosts, no_leftovers):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            DASK_CONTROLLER,
            str(multi_hosts.ssh_config_path),
            "tunnelled",
            *HOSTS,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        record = json.loads(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert {p["host"] for p in record["processes"]} == {"localhost", *HOSTS}
    assert "password" not in json.dumps(record) and "PRIVATE KEY" not in json.dumps(record)
    certificates = [Path(f["folder"], "tls") for f in record["folders"].values()]
    assert all(any(c.glob("*-key.pem")) for c in certificates)  # TLS is on by default
    start = time.monotonic()
    report = teardown(record)
    assert time.monotonic() - start < 4  # much sooner than the death timeout
    assert set(report) == {CONTROLLER_KEY, *HOSTS}
    assert multi_hosts.leftovers() == {} and local_leftovers(record["cluster_id"]) == []
    folders = [f["working_dir"] for f in record["folders"].values()]
    assert not any(os.path.exists(f) for f in folders)
    assert set(teardown(record)) == set(report)  # idempotent


def test_direct_mode_behind_an_ssh_only_switch_fails_clearly(ssh_only, make_cluster):
    cluster = make_cluster(
        cls=DaskCluster, hosts=["host1", "host2"], network_mode="direct", start_timeout=3
    )
    start = time.monotonic()
    with pytest.raises(WorkerStartError) as info:
        cluster.start()
    assert time.monotonic() - start < 30
    assert set(info.value.missing) >= {"host1", "host2"}  # each host named, with its log tail
    assert "did not register within 3" in str(info.value)


def test_options_reach_the_processes(make_cluster):
    cluster = make_cluster(
        cls=DaskCluster,
        hosts=["host1", "host2"],
        workers_per_host=2,
        memory_limit="1GiB",
        resources=lambda rt: {"SLOT": 1, "BIG": 2} if rt.host == "host2" else {"SLOT": 1},
        env={"LCT_MARK": "it's $(set)"},
        worker_options=["--lifetime", "1h"],
        scheduler_options=["--idle-timeout", "1h"],
    )
    cluster.start()
    client = cluster.get_client(timeout=10)
    info = client.scheduler_info(n_workers=-1)["workers"].values()
    assert len(info) == 4 and {w["nthreads"] for w in info} == {1}
    assert {w["memory_limit"] for w in info} == {2**30}
    big = {w["name"] for w in info if w["resources"].get("BIG")}
    assert big == {"host2-1", "host2-3"}
    marks = client.run(lambda: __import__("os").environ.get("LCT_MARK"))
    assert set(marks.values()) == {"it's $(set)"}
    only_big = client.submit(socket.gethostname, resources={"BIG": 1}, pure=False)
    assert only_big.result(timeout=30) == "host2"


@pytest.mark.parametrize("mode", ["direct", "tunnelled"])
def test_scheduler_here_boots_while_the_hosts_are_reached(make_cluster, caplog, mode):
    """Its address is known without the hosts: it starts before the first SSH connection."""
    caplog.set_level("INFO", logger="lazycluster_tasks")
    cluster = make_cluster(cls=DaskCluster, network_mode=mode)
    cluster.start()
    lines = [r.getMessage() for r in caplog.records]
    early = next(i for i, m in enumerate(lines) if "scheduler starting here" in m)
    connected = min(i for i, m in enumerate(lines) if m.startswith("connected to host"))
    assert early < connected
    assert not any("started again" in m for m in lines)
    assert cluster.network_mode == mode
    assert sorted(where_work_ran(cluster).values()) == cluster.runtime_group.hosts


def test_early_scheduler_moves_off_a_port_a_host_holds(
    make_cluster, multi_hosts, caplog, monkeypatch
):
    """Tunnelled, its port is forwarded to every host: a host that holds it (which only the
    plan can know) makes it start again on the next port."""
    caplog.set_level("INFO", logger="lazycluster_tasks")
    ports = free_local_ports(8, start=24300)
    monkeypatch.setattr(DaskCluster, "DEFAULT_MASTER_PORT", ports[0])
    code = f"import socket,time; s=socket.create_server(('127.0.0.1', {ports[0]})); time.sleep(60)"
    blocker = multi_hosts.run_in("host2", [sys.executable, "-c", code])
    try:
        cluster = make_cluster(cls=DaskCluster, network_mode="tunnelled", ports=ports[1:])
        host2 = cluster.runtime_group.get_runtime("host2")
        assert wait_until(lambda: not host2.has_free_port(ports[0]))
        cluster.start(worker_count=2)
        lines = [r.getMessage() for r in caplog.records]
        assert (
            f"scheduler starting here on 127.0.0.1:{ports[0]} while the hosts are reached" in lines
        )
        assert any(f"started again: port {ports[0]} is taken" in m for m in lines)
        assert cluster.master_port == ports[1]
        assert sorted(where_work_ran(cluster).values()) == ["host1", "host2"]
    finally:
        blocker.kill()
        blocker.wait()


def test_early_scheduler_stops_when_the_hosts_fail(make_cluster, tmp_path):
    """start_master cleans nothing up itself: the engine stops the scheduler it started before
    the plan when the plan fails."""
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    bare.chmod(0o755)
    cluster = make_cluster(
        cls=DaskCluster, hosts=["host1", "host2"], python_executable={"host2": str(bare)}
    )
    with pytest.raises(GroupError, match=r"dask\.distributed is not importable"):
        cluster.start_master()
    assert local_leftovers(cluster.cluster_id) == []
    assert cluster.engine.table.names() == [] and cluster.engine.scheduler_address is None


def test_auto_starts_the_scheduler_as_it_chose_last_time(
    ssh_only, make_cluster, caplog, tmp_path, monkeypatch
):
    """auto's scheduler starts before the probe as auto chose for these hosts last time (an
    open network the first time): on SSH-only hosts, the first start binds it again on the
    loopback, the second binds it there at once."""
    monkeypatch.setenv("LAZYCLUSTER_CACHE_DIR", str(tmp_path))  # nothing remembered yet
    caplog.set_level("INFO", logger="lazycluster_tasks")
    first = make_cluster(cls=DaskCluster, hosts=["host1", "host2"])
    first.start()
    assert first.network_mode == "tunnelled"
    lines = [r.getMessage() for r in caplog.records]
    assert any("started again: the plan binds it to 127.0.0.1" in m for m in lines)
    first.cleanup()
    caplog.clear()
    second = make_cluster(cls=DaskCluster, hosts=["host1", "host2"])
    second.start()
    assert second.network_mode == "tunnelled"
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("scheduler starting here on 127.0.0.1:") for m in lines)
    assert not any("started again" in m for m in lines)
    assert sorted(where_work_ran(second).values()) == ["host1", "host2"]


@pytest.mark.parametrize("mode", ["direct", "tunnelled"])
def test_the_check_goes_to_each_worker_as_it_registers_where_its_paths_exist(
    multi_hosts, make_cluster, caplog, mode
):
    """A worker's part of the end-to-end check is sent as it registers, before a slower host's
    worker did: direct at once (its paths exist once it listens), tunnelled once the workers'
    routes to every host were made."""
    caplog.set_level(logging.DEBUG, logger="lazycluster_tasks")
    cluster = make_cluster(
        cls=DaskCluster, hosts=["host1", "host2"], network_mode=mode, setup={"host2": ["sleep 2"]}
    )
    cluster.start()
    lines = [r.getMessage() for r in caplog.records]
    sent = [i for i, m in enumerate(lines) if m.startswith("end-to-end check: tasks sent to")]
    slow = min(i for i, m in enumerate(lines) if m.startswith("worker host2-1 ready"))
    assert len(sent) == 2, sent
    assert min(sent) < slow, lines[min(sent) :]
    routed = [i for i, m in enumerate(lines) if m.startswith("tunnels up for host")]
    assert (routed != []) == (mode == "tunnelled")
    assert all(i > max(routed, default=-1) for i in sent), lines
    assert any(m.startswith("end-to-end check: 2 workers reached") for m in lines)
    assert sorted(where_work_ran(cluster).values()) == ["host1", "host2"]


@pytest.mark.parametrize("closed", ["icmp", "drop"])
def test_a_path_blocked_after_registration_fails_the_start_naming_it(
    multi_hosts, make_cluster, closed
):
    """Direct on hosts that reach this machine but not each other: the workers register, the
    check's results reach here, and each worker's fetch of the other's fails by name."""
    cluster = make_cluster(
        cls=DaskCluster, hosts=["host1", "host2"], network_mode="direct", start_timeout=4
    )
    multi_hosts.set_network("isolated", closed)
    try:
        start = time.monotonic()
        with pytest.raises(NetworkPathError) as info:
            cluster.start()
        assert time.monotonic() - start < 30
    finally:
        multi_hosts.set_network("open")
    failed = info.value.paths
    assert len(failed) == 2, failed
    assert any(p.startswith("host1-0 on host1 -> host2-1 on host2 (tls://") for p in failed)
    assert any(p.startswith("host2-1 on host2 -> host1-0 on host1 (tls://") for p in failed)
    assert all(why.startswith("data not fetched within") for why in failed.values())
    assert local_leftovers(cluster.cluster_id) == [] and multi_hosts.leftovers() == {}


def test_early_scheduler_stops_when_its_one_port_is_taken_on_a_host(make_cluster, multi_hosts):
    """A port given alone that a host holds (tunnelled: it is forwarded there) is refused
    after the plan; the scheduler that started on it before the plan does not stay."""
    (port,) = free_local_ports(1, start=24400)
    code = f"import socket,time; s=socket.create_server(('127.0.0.1', {port})); time.sleep(60)"
    blocker = multi_hosts.run_in("host2", [sys.executable, "-c", code])
    try:
        cluster = make_cluster(cls=DaskCluster, hosts=["host1", "host2"], network_mode="tunnelled")
        host2 = cluster.runtime_group.get_runtime("host2")
        assert wait_until(lambda: not host2.has_free_port(port))
        with pytest.raises(PortInUseError, match=str(port)):
            cluster.start_master(master_port=port)
        assert local_leftovers(cluster.cluster_id) == []
        assert cluster.engine.scheduler_address is None
    finally:
        blocker.kill()
        blocker.wait()


@pytest.mark.parametrize("master_host", [None, "host1"])
def test_a_cleanup_closes_the_scheduler_gracefully_while_the_hosts_kill_their_workers(
    make_cluster, multi_hosts, master_host, caplog
):
    """A running cluster's cleanup asks the scheduler to close itself (a plugin's close hook
    runs, here or on a host that runs workers too) while each host KILLs its workers in the
    same round trip that stops and removes everything else there: one command per host. The
    scheduler's close closes our connection as it ends: that is its answer, not a failure
    (the old close logged "not asked to close" every time and waited for a TERM)."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    caplog.set_level(logging.INFO, logger="lazycluster_tasks")

    cluster = make_cluster(cls=DaskCluster, master_host=master_host)
    cluster.start()
    mark = f"/tmp/lct-closed-{cluster.engine.cluster_id}"  # on the scheduler's own host

    class AtClose(SchedulerPlugin):
        name = "lct-test-at-close"

        def __init__(self, path: str) -> None:
            self.path = path

        async def close(self) -> None:
            with open(self.path, "w") as f:
                f.write("closed")

    def read_mark(remove: bool = False) -> str:
        if master_host is None:
            text = Path(mark).read_text() if Path(mark).exists() else ""
            if remove:
                Path(mark).unlink(missing_ok=True)
            return text
        argv = ["sh", "-c", 'cat "$0" 2>/dev/null; [ -z "$1" ] || rm -f "$0"', mark]
        argv.append("rm" if remove else "")
        done = multi_hosts.run_in(master_host, argv, stdout=subprocess.PIPE)
        return done.communicate(timeout=10)[0].decode()

    cluster.get_client(timeout=10).register_plugin(AtClose(mark))
    runtimes = cluster.runtime_group.runtimes
    before = {rt.host: rt.connection.commands_run for rt in runtimes}
    try:
        cluster.cleanup()
        assert read_mark() == "closed"
        assert "the scheduler was not asked to close" not in caplog.text
    finally:
        read_mark(remove=True)
    assert {rt.host: rt.connection.commands_run - before[rt.host] for rt in runtimes} == {
        host: 1 for host in before
    }
