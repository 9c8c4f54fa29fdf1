"""LazySSHCluster (a distributed SpecCluster) on real SSH test hosts: placement, scale, adapt,
self-healing after a killed worker and a host cut off the network, and nothing left behind."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import signal
import socket
import time
import urllib.request

import psutil
import pytest
from distributed import Client

from lazycluster_tasks import LazySSHCluster, processes
from lazycluster_tasks.dask import teardown
from lazycluster_tasks.dask_options import DaskOptions
from lazycluster_tasks.testing.helpers import wait_until
from lazycluster_tasks.watch import ClusterWatch

pytestmark = pytest.mark.slow

HOSTS = ["host1", "host2", "host3"]


def hosts_of(client: Client) -> dict[str, str]:
    """worker name -> hostname where it runs (asked from the worker itself)."""
    ran = client.run(socket.gethostname)
    info = client.scheduler_info(n_workers=-1)["workers"]
    names = {address: w["name"] for address, w in info.items()}
    return {names[a]: h for a, h in ran.items() if a in names}  # the set may change meanwhile


def test_a_dask_cluster_on_the_hosts(make_cluster, multi_hosts):
    cluster = make_cluster(workers_per_host=2, n_workers=4, dashboard=True, nanny=True)
    assert cluster.capacity == 6
    with Client(cluster) as client:
        client.wait_for_workers(4, timeout=30)
        where = hosts_of(client)
        assert sorted(where) == sorted(cluster.workers)
        assert {h for h in where.values()} == {"host1", "host2", "host3"}
        for name, host in where.items():
            assert name.startswith(host + "-")  # placed where its name says
        assert client.submit(lambda x: x + 1, 1).result(timeout=30) == 2
        cluster.scale(9)  # more than the hosts take: capped at the capacity
        client.wait_for_workers(6, timeout=60)
        time.sleep(1)
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 6
        assert sorted(hosts_of(client).values()).count("host1") == 2
        cluster.scale(2)
        assert wait_until(lambda: len(client.scheduler_info(n_workers=-1)["workers"]) == 2, 30)
        record = cluster.record()
        assert "LazySSHCluster" in cluster._repr_html_()  # the notebook widget renders
        assert record.network_mode == cluster.network_mode == "direct"
        logs = cluster.get_logs()
        assert any("Scheduler" in key or "scheduler" in key.lower() for key in logs)
        # the dashboard opens (bokeh is a dependency): its status page, not "Dask needs bokeh"
        with urllib.request.urlopen(cluster.dashboard_link, timeout=20) as page:
            html = page.read().decode()
        assert page.status == 200 and "bokeh" in html.lower() and "needs bokeh" not in html
    assert cluster.dashboard_link.startswith("http://127.0.0.1:")
    cluster.close()
    assert cluster.status.name == "closed"
    assert multi_hosts.leftovers() == {}
    assert teardown(record) == {k: f"{k}: stopped" for k in record.folders}  # idempotent


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="hosts"):
        LazySSHCluster([])
    with pytest.raises(ValueError, match="string"):
        LazySSHCluster("host1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_workers=5 exceeds the capacity of 2"):
        LazySSHCluster(["host1", "host2"], n_workers=5)
    with pytest.raises(ValueError, match="network_mode"):
        LazySSHCluster(["host1"], network_mode="fast")
    with pytest.raises(ValueError, match="worker_ttl"):
        LazySSHCluster(["host1"], worker_ttl=0)
    with pytest.raises(ValueError, match="host_lost_after"):
        LazySSHCluster(["host1"], host_lost_after=-1)
    with pytest.raises(ValueError, match="security must be"):
        LazySSHCluster(["host1"], security="yes")
    with pytest.raises(ValueError, match="host_links must be True, False, 'all' or 'on-demand'"):
        LazySSHCluster(["host1"], host_links="sometimes")
    # a name that is no option: named, with the option it looks like, before any connection
    with pytest.raises(TypeError, match=r"^'thread_per_worker' is not a cluster option \(did "):
        LazySSHCluster(["host1"], thread_per_worker=2)
    with pytest.raises(TypeError, match=r"'flavour' is not a cluster option \(options: .*nanny"):
        LazySSHCluster(["host1"], flavour="x")
    with pytest.raises(TypeError, match=r"did you mean 'memory_limit'\?"):
        DaskOptions.of({"memory_limt": "1GiB"})  # DaskCluster's keywords too


def test_a_start_that_fails_leaves_no_thread_here_and_nothing_on_the_hosts(make_cluster):
    """Every host refuses the preflight (no such interpreter): the error names them, and the
    event loop distributed started for the cluster goes with it (it stopped that loop only when
    a later step failed: its thread and the executor's stayed). ``make_cluster``'s fixtures
    check the threads, descriptors and the hosts."""
    with pytest.raises(Exception, match=r"preflight failed on 2 of 2 hosts") as failed:
        make_cluster(HOSTS[:2], python="/nonexistent/python", environment=None)
    assert "/nonexistent/python" in str(failed.value)


def test_asynchronous(make_cluster, multi_hosts):
    async def run() -> str:
        async with (
            LazySSHCluster(
                HOSTS[:2],
                ssh_config_path=str(multi_hosts.ssh_config_path),
                threads_per_worker=1,
                asynchronous=True,
            ) as cluster,
            Client(cluster, asynchronous=True) as client,
        ):
            await client.wait_for_workers(2, timeout=30)
            return await client.submit(socket.gethostname, pure=False)

    assert asyncio.run(run()) in {"host1", "host2"}
    assert multi_hosts.leftovers() == {}


def test_adapt_grows_under_a_queue_and_shrinks_when_idle(make_cluster):
    cluster = make_cluster(workers_per_host=2, n_workers=1)
    cluster.adapt(minimum=1, maximum=6, interval="500ms", wait_count=2)
    with Client(cluster) as client:
        futures = client.map(lambda i: time.sleep(1.5) or i, range(24), pure=False)
        peak = asked = 0  # workers registered / workers adapt asked for (on 2 busy cores the
        # work may be done before the last ones register)
        deadline = time.monotonic() + 60
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            peak = max(peak, len(client.scheduler_info(n_workers=-1)["workers"]))
            asked = max(asked, len(cluster.worker_spec))
            time.sleep(0.2)
        assert sorted(client.gather(futures)) == list(range(24))
        assert 4 <= asked <= 6 and 2 <= peak <= asked, (asked, peak)  # grew, within the bound
        # idle: back to the minimum within a few adapt intervals
        assert wait_until(lambda: len(client.scheduler_info(n_workers=-1)["workers"]) == 1, 30)


def _worker_pid(cluster: LazySSHCluster, name: str) -> int:
    return next(p.pid for p in cluster.engine.table.all() if p.name == name)


@pytest.mark.parametrize("mode", ["direct", "tunnelled"])
def test_a_killed_worker_is_replaced_and_the_job_completes(make_cluster, multi_hosts, mode):
    cluster = make_cluster(network_mode=mode)
    with Client(cluster) as client:
        client.wait_for_workers(3, timeout=30)
        futures = client.map(lambda i: time.sleep(0.5) or i, range(24), pure=False)
        victim = "host2-1"
        assert victim in cluster.workers  # killed at once: the cluster must know it started
        pid = _worker_pid(cluster, victim)
        killed = time.monotonic()
        assert victim in " ".join(psutil.Process(pid).cmdline())  # hosts share our pid space
        os.killpg(pid, signal.SIGKILL)
        assert sorted(client.gather(futures)) == list(range(24))
        assert wait_until(
            lambda: (
                "host2" in hosts_of(client).values()
                and len(client.scheduler_info(n_workers=-1)["workers"]) == 3
            ),
            30,
        )
        replaced = time.monotonic() - killed
        assert victim not in cluster.worker_spec
        assert replaced < 30


def test_a_replacement_the_close_stops_as_it_starts_is_no_failure(make_cluster, caplog):
    """A worker that the close kills while it starts (a replacement, here) did not fail: no
    error, and no asyncio "Task exception was never retrieved" from SpecCluster's task."""
    import gc

    caplog.set_level(logging.DEBUG, logger="lazycluster_tasks")
    # host2's workers wait 1 s before Python starts: the close comes while the replacement
    # starts, however fast this machine is
    cluster = make_cluster(["host1", "host2"], setup={"host2": ["sleep 1"]})
    with Client(cluster) as client:
        client.wait_for_workers(2, timeout=30)
        first = set(cluster.engine.table.names())
        os.killpg(_worker_pid(cluster, "host2-1"), signal.SIGKILL)
        assert wait_until(lambda: set(cluster.engine.table.names()) - first, 30, interval=0.01)
    cluster.close()  # the replacement's process was launched, not yet registered here
    gc.collect()  # SpecCluster's finished task: asyncio reports what nobody retrieved
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage()[:300] for r in errors]
    assert "stopped by the close as it started" in caplog.text  # the case the test is about


def test_a_host_cut_off_for_20_s_gets_its_workers_back(make_cluster, multi_hosts, caplog):
    caplog.set_level(logging.INFO, logger="lazycluster_tasks")  # the cluster and its healer
    cluster = make_cluster()
    healing = ClusterWatch(cluster.engine, heals=True)  # the Prefect layer's policy
    strict = ClusterWatch(cluster.engine, heals=False)  # the seed API's policy
    with Client(cluster) as client, healing, strict:
        client.wait_for_workers(3, timeout=30)
        futures = client.map(lambda i: time.sleep(1) or i, range(30), pure=False)
        multi_hosts.cut_host("host3")
        try:
            time.sleep(20)
        finally:
            multi_hosts.restore_host("host3")
        assert sorted(client.gather(futures, errors="raise")) == list(range(30))
        # back on its own host (the wait: the old worker may register again first)
        replaced = "starts on host3 to replace host3-2"
        assert wait_until(lambda: replaced in caplog.text, 60)
        assert wait_until(
            lambda: sorted(hosts_of(client).values()) == ["host1", "host2", "host3"], 60
        )
    assert healing.failure is None  # a run under the healing cluster goes on
    assert strict.failure and "host3" in strict.failure  # without healing: fatal
    text = caplog.text
    assert "worker host3-2 on host3 lost" in text  # silent for worker_ttl, its host unreachable
    assert "host host3 answers again" in text


def test_workers_of_a_host_that_stays_away_move_to_hosts_with_room(
    make_cluster, multi_hosts, caplog
):
    """Tunnelled (the host-cut test above is direct): the replacement's routes skip the absent
    host, which gets them once it answers again."""
    caplog.set_level(logging.INFO, logger="lazycluster_tasks")
    cluster = make_cluster(
        workers_per_host=2, n_workers=3, worker_ttl=3, network_mode="tunnelled", host_lost_after=3
    )
    with Client(cluster) as client:
        client.wait_for_workers(3, timeout=30)
        assert sorted(hosts_of(client).values()) == ["host1", "host2", "host3"]
        futures = client.map(lambda i: time.sleep(0.5) or i, range(30), pure=False)
        multi_hosts.cut_host("host3")
        try:
            assert sorted(client.gather(futures)) == list(range(30))

            def names() -> list[str]:  # asks the scheduler only: host3's worker cannot answer
                return [
                    str(w["name"]) for w in client.scheduler_info(n_workers=-1)["workers"].values()
                ]

            assert wait_until(
                lambda: len(n := names()) == 3 and not any(x.startswith("host3-") for x in n), 40
            ), names()
            lost = "host host3 lost: no answer for"  # reported; the cluster runs on the others
            assert wait_until(lambda: lost in caplog.text, 10)
        finally:
            multi_hosts.restore_host("host3")
        assert wait_until(lambda: "host host3 answers again" in caplog.text, 30)
        moved = [r.getMessage() for r in caplog.records if "to replace host3-" in r.getMessage()]
        assert moved and " on host3 " not in moved[0]  # placed on a host with room
        # host3 is back: a new worker there fetches data from the moved one (tunnelled: through
        # the routes host3 missed while it was away)
        cluster.scale(4)
        client.wait_for_workers(4, timeout=30)
        workers = client.scheduler_info(n_workers=-1)["workers"]
        address = {str(w["name"]): a for a, w in workers.items()}
        (newcomer,) = [a for n, a in address.items() if n.startswith("host3-")]
        mover = address[moved[0].split()[1]]
        data = client.submit(bytes, 1 << 20, workers=[mover], pure=False)
        fetched = client.submit(len, data, workers=[newcomer], allow_other_workers=False)
        assert fetched.result(timeout=30) == 1 << 20
    assert "host host3 does not answer" in caplog.text


def test_the_close_kills_what_is_left_once_the_scheduler_told_the_workers_to_close(
    make_cluster, multi_hosts
):
    """After SpecCluster's terminate every worker was told to close: the cleanup kills what is
    left at once (as SSHCluster's close does), not after ``stop_grace``. A process that ignores
    TERM would hold a 60 s grace; the close ends it at once."""
    cluster = make_cluster(stop_grace=60)
    with Client(cluster) as client:
        client.wait_for_workers(3, timeout=30)
    host1 = cluster.engine.group.runtimes[0]
    folder = cluster.engine.folder(host1)
    argv = ["sh", "-c", "trap '' TERM; sleep 300; :", processes.folder_marker(folder)]
    (stubborn,) = processes.start_processes(host1, folder, [processes.ProcessSpec("tough", argv)])
    started = time.monotonic()
    cluster.close()
    assert time.monotonic() - started < 30  # the 60 s grace was not waited for
    assert stubborn.pid not in {p.pid for p in multi_hosts.processes("host1")}


def test_a_close_whose_scheduler_is_gone_gives_what_is_left_its_grace(make_cluster, multi_hosts):
    """No scheduler told the workers to close: the cleanup sends TERM and waits ``stop_grace``
    before KILL. A process that exits on TERM leaves a mark; a KILL at once would leave none."""
    cluster = make_cluster(stop_grace=10)
    with Client(cluster) as client:
        client.wait_for_workers(3, timeout=30)
    host1 = cluster.engine.group.runtimes[0]
    folder = cluster.engine.folder(host1)
    mark = f"{multi_hosts.tmp_dir}/termed-{cluster.engine.cluster_id}"
    on_term = f"touch {shlex.quote(mark)}; exit 0"
    script = f"trap {shlex.quote(on_term)} TERM; while :; do sleep 0.1; done; :"
    argv = ["sh", "-c", script, processes.folder_marker(folder)]
    processes.start_processes(host1, folder, [processes.ProcessSpec("polite", argv)])
    scheduler = next(p for p in cluster.engine.table.all() if p.role == "master")
    os.killpg(scheduler.pid, signal.SIGKILL)  # this machine's: hosts share our pid space
    try:
        cluster.close()
        # it got TERM and the time to act on it (looked for on host1, where it ran)
        assert multi_hosts.run_in("host1", ["test", "-e", mark]).wait() == 0
    finally:
        assert multi_hosts.run_in("host1", ["rm", "-f", "--", mark]).wait() == 0


@pytest.mark.parametrize("scheduler_host", [None, "host1"])
def test_a_close_kills_the_workers_before_the_scheduler_closes_gracefully(
    make_cluster, tmp_path, scheduler_host
):
    """The workers are killed first (the scheduler then has none to tell to close, whose
    shutdowns would compete with the kill for the CPUs); the scheduler still closes
    gracefully, here or on a host that runs workers too: a plugin's close hook runs, and finds
    every worker's group already killed."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    cluster = make_cluster(scheduler_host=scheduler_host)
    report = tmp_path / "at-close.json"  # hosts share this machine's file system

    class AtClose(SchedulerPlugin):
        name = "lct-test-at-close"

        def __init__(self, path: str, pids: list[int]) -> None:
            self.path, self.pids = path, pids

        async def close(self) -> None:
            import json as json_

            def killed(pid: int) -> bool:  # hosts share this machine's pid space
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    with open(f"/proc/{pid}/status") as f:
                        status = f.read().splitlines()
                except OSError:
                    return True  # gone
                pending = [int(line.split()[1], 16) for line in status
                           if line.startswith(("SigPnd:", "ShdPnd:"))]  # fmt: skip
                exiting = int(fields[6]) & 0x4  # PF_EXITING
                return fields[0] in "ZX" or bool(exiting) or any(p & (1 << 8) for p in pending)

            with open(self.path, "w") as f:
                json_.dump({str(pid): killed(pid) for pid in self.pids}, f)

    with Client(cluster) as client:
        client.wait_for_workers(3, timeout=30)
        pids = [info.pid for info in cluster.engine.worker_processes()]
        client.register_plugin(AtClose(str(report), pids))
    cluster.close()
    assert json.loads(report.read_text()) == {str(pid): True for pid in pids}
