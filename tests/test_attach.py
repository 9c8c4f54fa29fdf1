"""Attach to a running cluster from another process: ``LazySSHCluster.from_name(id)`` for
clusters started by Python code, by ``lazycluster up`` and by a flow; the client certificate
kept private in the state folder and gone with the cluster."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from distributed import Client

from lazycluster_tasks import LazySSHCluster
from lazycluster_tasks.attached import AttachedCluster, ClusterNotFoundError
from lazycluster_tasks.control import ControlError, entries, state_folder
from lazycluster_tasks.testing.helpers import wait_until

pytestmark = pytest.mark.slow

ROOT = str(Path(__file__).resolve().parents[1])

#: A second process: attaches, runs a task, asks for more workers, reads logs, detaches.
SECOND = textwrap.dedent(
    """
    import json, socket, sys
    from distributed import Client
    from lazycluster_tasks import LazySSHCluster

    cluster = LazySSHCluster.from_name(sys.argv[1])
    with Client(cluster) as client:
        where = client.submit(socket.gethostname, pure=False).result(timeout=60)
        cluster.scale(int(sys.argv[2]))
        client.wait_for_workers(int(sys.argv[2]), timeout=90)
        logs = cluster.get_logs()
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
    cluster.close()  # detaches; the cluster stays
    print(json.dumps({"where": where, "workers": workers, "logs": sorted(logs)}))
    """
)


def run_second(*args: str, timeout: float = 180) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SECOND, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


@pytest.mark.parametrize("network_mode", ["direct", "tunnelled"])
def test_a_second_process_attaches_scales_and_detaches(make_cluster, multi_hosts, network_mode):
    cluster = make_cluster(n_workers=1, workers_per_host=2, network_mode=network_mode)
    cid = cluster.engine.cluster_id
    folder = state_folder() / cid
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    assert files == [
        "cluster.json",
        "control.sock",
        "tls",
        "tls/client-ca.pem",
        "tls/client-cert.pem",
        "tls/client-key.pem",
    ]
    assert all(private(p) for p in [folder, *folder.rglob("*")])
    info = json.loads((folder / "cluster.json").read_text())
    assert "PRIVATE KEY" not in json.dumps(info)  # paths only

    seen = run_second(cid, "3")
    assert seen["where"] in ("host1", "host2", "host3")  # computed on a host
    assert seen["workers"] == 3
    assert seen["logs"]  # the scheduler's and workers' logs
    with Client(cluster) as client:  # the owner sees what the attached process asked for
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 3
        assert len(cluster.worker_spec) == 3
    assert cluster.status.name == "running" and folder.exists()

    attached = LazySSHCluster.from_name(cid, shutdown_on_close=True)
    assert isinstance(attached, AttachedCluster)
    assert attached.scheduler_address == cluster.scheduler_address
    attached.close()  # asked to: the owner closes the cluster
    assert wait_until(lambda: cluster.status.name == "closed", 30)
    assert not folder.exists()
    assert multi_hosts.leftovers() == {}


def test_without_the_client_certificate_nothing_connects(make_cluster):
    cluster = make_cluster(["host1"], n_workers=1)
    # the CA alone (the scheduler's identity) but no client certificate: refused
    host, port = cluster.scheduler_address.removeprefix("tls://").rsplit(":", 1)
    context = ssl.create_default_context(cadata=cluster.engine.tls.ca)
    context.check_hostname = False
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        try:
            with context.wrap_socket(raw) as stream:
                got = stream.recv(1)  # TLS 1.3: the refusal comes as the first read
        except (ssl.SSLError, ConnectionError) as exc:
            got = str(exc).encode()
    assert got == b"" or b"CERTIFICATE_REQUIRED" in got.upper() or b"reset" in got
    attached = LazySSHCluster.from_name(cluster.engine.cluster_id)
    try:
        with Client(attached) as client:
            assert client.submit(lambda: 2, pure=False).result(timeout=30) == 2
    finally:
        attached.close()
    assert cluster.status.name == "running"


def test_unknown_ids_and_dead_owners_are_named_and_cleared(make_cluster, tmp_path):
    with pytest.raises(ClusterNotFoundError, match="no running cluster 'nope'"):
        LazySSHCluster.from_name("nope")
    with pytest.raises(ValueError, match="non-empty"):
        LazySSHCluster.from_name("")
    # an entry whose owner was killed: removed by the next look, never attached to
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = state_folder() / "killedowner"
    folder.mkdir(mode=0o700)
    (folder / "cluster.json").write_text(
        json.dumps({"cluster_id": "killedowner", "pid": dead.pid, "started": time.time()})
    )
    with pytest.raises(ClusterNotFoundError, match="killedowner"):
        LazySSHCluster.from_name("killedowner")
    assert not folder.exists()
    # a request the owner refuses is an error naming why
    cluster = make_cluster(["host1"], n_workers=1, workers_per_host=1)
    entry = entries()[cluster.engine.cluster_id]
    with pytest.raises(ControlError, match=r"scale's number of workers must be an integer >= 0"):
        entry.request("scale", n=-1)
    with pytest.raises(ControlError, match="unknown request 'explode'"):
        entry.request("explode")
    assert entry.request("info")["status"] == "running"


def test_attach_to_a_cluster_started_by_up(multi_hosts, no_leftovers, no_local_leaks, tmp_path):
    env = {
        **os.environ,
        "LAZYCLUSTER_SSH_CONFIG": str(multi_hosts.ssh_config_path),
        "LAZYCLUSTER_STATE_DIR": str(tmp_path / "state"),
    }
    script = Path(sys.executable).parent / "lazycluster"
    started = subprocess.run(
        [str(script), "up", "host1", "host2", "--detach", "--workers-per-host", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert started.returncode == 0, started.stderr
    cid = started.stdout.split()[1]
    try:
        shown = subprocess.run(
            [str(script), "attach", cid], capture_output=True, text=True, env=env, timeout=60
        )
        assert shown.returncode == 0, shown.stderr
        assert f'LazySSHCluster.from_name("{cid}")' in shown.stdout
        assert "DaskTaskRunner(" in shown.stdout
        # the snippet it prints runs as it is, in another process
        snippet = shown.stdout.split("```python")[1].split("```")[0]
        ran = subprocess.run(
            [sys.executable, "-c", snippet + "\nprint(client.submit(sum, [1, 2]).result())"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert ran.returncode == 0, ran.stderr[-3000:]
        assert ran.stdout.strip().splitlines()[-1] == "3"
        listed = subprocess.run(
            [str(script), "attach"], capture_output=True, text=True, env=env, timeout=60
        )
        assert listed.returncode == 0 and cid in listed.stdout, listed.stderr
        missing = subprocess.run(
            [str(script), "attach", "nope"], capture_output=True, text=True, env=env, timeout=60
        )
        assert missing.returncode == 2 and "no running cluster 'nope'" in missing.stderr
    finally:
        stopped = subprocess.run(
            [str(script), "down", cid], capture_output=True, text=True, env=env, timeout=120
        )
    assert stopped.returncode == 0, stopped.stderr
    assert not (tmp_path / "state" / cid).exists()
    assert multi_hosts.leftovers() == {}


#: A flow that starts a cluster and holds it until told to finish.
HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from prefect import flow
    from prefect.runtime import flow_run
    from lazycluster_tasks.prefect.flows import dask_cluster

    @flow
    def hold(config: str, signal: str) -> None:
        with dask_cluster(["host2", "host3"], ssh_config_path=config, threads_per_worker=1):
            Path(signal + ".run").write_text(flow_run.id)
            deadline = time.monotonic() + 120
            while not Path(signal).exists() and time.monotonic() < deadline:
                time.sleep(0.2)

    hold(sys.argv[1], sys.argv[2])
    """
)


def test_attach_to_a_cluster_a_flow_started_and_use_it_from_another_flow(
    prefect_api, multi_hosts, no_leftovers, tmp_path
):
    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    from lazycluster_tasks.prefect.records import clusters_of_run

    signal = tmp_path / "finish"
    owner = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(multi_hosts.ssh_config_path), str(signal)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        run_file = Path(str(signal) + ".run")
        assert wait_until(run_file.exists, 180, interval=0.2), owner.stdout and owner.poll()
        (cid,) = clusters_of_run(run_file.read_text())  # the record in the API names it
        cluster = LazySSHCluster.from_name(cid)
        try:

            @task
            def where(index: int) -> str:
                import socket

                return socket.gethostname()

            runner = DaskTaskRunner(
                address=cluster.scheduler_address, client_kwargs={"security": cluster.security}
            )

            @flow(task_runner=runner)
            def use() -> list[str]:
                return [f.result() for f in where.map(range(4))]

            assert set(use()) <= {"host2", "host3"}
        finally:
            cluster.close()
        signal.write_text("done")
        assert owner.wait(120) == 0
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        assert owner.stdout is not None
        owner.stdout.close()
    assert cid not in entries()
    assert multi_hosts.leftovers() == {}
