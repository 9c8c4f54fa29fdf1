"""Workers as sites run them: Dask's option forms, a worker class, GPUs pinned one worker each,
a setup step before the processes, a worker count per host — on real hosts."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client

from lazycluster_tasks import GroupError, LazySSHCluster, WorkerStartError
from lazycluster_tasks.testing.helpers import cluster_on, wait_until
from lazycluster_tasks.testing.hosts import TestHosts

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

HOSTS = ["host1", "host2"]


@pytest.fixture(scope="module")
def gpu_hosts() -> Iterator[TestHosts]:
    """host1 reports two GPUs (a fake nvidia-smi), host2 none."""
    with TestHosts(len(HOSTS), gpus={"host1": 2}) as hosts:
        yield hosts
        assert not hosts.leftovers()


def _workers(client: Client) -> dict[str, dict]:
    return client.scheduler_info(n_workers=-1)["workers"]


def test_worker_and_scheduler_options_in_the_dict_and_the_list_form(gpu_hosts: TestHosts) -> None:
    cluster = cluster_on(
        gpu_hosts,
        HOSTS,
        worker_options={"nthreads": 3, "memory_limit": "1GiB", "lifetime_restart": False},
        scheduler_options={"dashboard_address": ":0", "jupyter": False},
    )
    try:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            found = {(w["nthreads"], w["memory_limit"]) for w in _workers(client).values()}
            assert found == {(3, 2**30)}
    finally:
        cluster.close()
    listed = cluster_on(gpu_hosts, HOSTS, worker_options=["--nthreads", "2"])
    try:
        with Client(listed) as client:
            client.wait_for_workers(2, timeout=60)
            assert {w["nthreads"] for w in _workers(client).values()} == {2}
    finally:
        listed.close()
    for wrong in ({"nthread": 2}, "--nthreads 2"):
        with pytest.raises((TypeError, ValueError), match="worker_options"):
            cluster_on(gpu_hosts, HOSTS, worker_options=wrong)
    assert not gpu_hosts.leftovers()


def test_a_worker_class_from_the_users_code_and_dasks_nanny(
    gpu_hosts: TestHosts, tmp_path: Path, monkeypatch
) -> None:
    project = tmp_path / "site"
    (project / "sitepkg").mkdir(parents=True)
    (project / "sitepkg" / "__init__.py").write_text("")
    (project / "sitepkg" / "workers.py").write_text(
        "from distributed import Worker\n\nclass TaggedWorker(Worker):\n    tag = 'ours'\n"
    )
    monkeypatch.syspath_prepend(str(project))  # the user's code, only here: it goes with the job
    cluster = cluster_on(gpu_hosts, HOSTS, worker_class="sitepkg.workers.TaggedWorker")
    try:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            ran = client.run(lambda dask_worker: getattr(type(dask_worker), "tag", None))
            assert sorted(ran.values()) == ["ours", "ours"]
            assert all(w.get("nanny") for w in _workers(client).values())  # run by a nanny
    finally:
        cluster.close()
    with pytest.raises(GroupError) as info:  # checked before anything starts, named per host
        cluster_on(gpu_hosts, HOSTS, worker_class="sitepkg.workers.Missing")
    assert set(info.value.errors) == set(HOSTS)
    said = str(info.value.errors["host1"])
    assert said.startswith("host1: worker_class 'sitepkg.workers.Missing' does not import")
    assert "AttributeError" in said
    nanny = cluster_on(
        gpu_hosts, HOSTS, worker_class="distributed.Nanny"
    )  # SSHCluster's default spelling
    try:
        with Client(nanny) as client:
            client.wait_for_workers(2, timeout=60)
            assert all(w.get("nanny") for w in _workers(client).values())
    finally:
        nanny.close()
    assert not gpu_hosts.leftovers()


#: A stand-in for dask-cuda on the hosts (no GPUs here): its CLI records how it was started,
#: then runs what ``dask cuda worker`` runs for one visible GPU, a nanny and its worker.
FAKE_CUDA_CLI = """import json, os, sys
os.environ["FAKE_CUDA_ARGV"] = json.dumps(sys.argv)
from distributed.cli.dask_worker import main
if __name__ == "__main__":
    main()
"""


def test_dask_cudas_worker_class_starts_through_its_own_command_one_gpu_each(
    gpu_hosts: TestHosts, tmp_path: Path, monkeypatch
) -> None:
    package = tmp_path / "site" / "dask_cuda"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("class CUDAWorker:\n    pass\n")
    (package / "cli.py").write_text(FAKE_CUDA_CLI)
    monkeypatch.syspath_prepend(str(package.parent))  # the user's code: it goes to the hosts
    with pytest.raises(ValueError, match="runs one worker per GPU: host2 has none"):
        cluster_on(gpu_hosts, HOSTS, worker_class="dask_cuda.CUDAWorker")
    cluster = cluster_on(gpu_hosts, ["host1"], worker_class="dask_cuda.CUDAWorker")
    try:
        assert cluster.capacity == 2  # one per GPU, as gpus="auto"
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            ran = client.run(
                lambda: (
                    os.environ.get("CUDA_VISIBLE_DEVICES"),
                    json.loads(os.environ.get("FAKE_CUDA_ARGV", "null")),
                )
            )
            assert sorted(gpu for gpu, _ in ran.values()) == ["0", "1"]
            for _, argv in ran.values():
                assert argv is not None and argv[0].endswith("/dask_cuda/cli.py"), argv
                assert "--worker-class" not in argv and "--nanny-port" not in argv, argv
                assert argv[argv.index("--resources") + 1] == "GPU=1"
            assert all(w.get("nanny") for w in _workers(client).values())
    finally:
        cluster.close()
    assert not gpu_hosts.leftovers()


def _gpu_task(seconds: float) -> tuple[str, str]:
    time.sleep(seconds)
    return socket.gethostname(), os.environ.get("CUDA_VISIBLE_DEVICES", "")


def test_one_worker_per_gpu_pinned_and_tagged_kept_by_healing(gpu_hosts: TestHosts) -> None:
    cluster = cluster_on(gpu_hosts, HOSTS, gpus="auto", workers_per_host=1)
    try:
        assert cluster.capacity == 3  # host1: its 2 GPUs; host2: none, its one worker
        with Client(cluster) as client:
            client.wait_for_workers(3, timeout=60)
            seen = client.run(
                lambda: (socket.gethostname(), os.environ.get("CUDA_VISIBLE_DEVICES"))
            )
            assert sorted(seen.values()) == [("host1", "0"), ("host1", "1"), ("host2", None)]
            tagged = {a for a, w in _workers(client).items() if w["resources"] == {"GPU": 1}}
            assert len(tagged) == 2
            futures = [
                client.submit(_gpu_task, 0.5, resources={"GPU": 1}, pure=False) for _ in range(4)
            ]
            ran = client.gather(futures)
            assert sorted(set(ran)) == [("host1", "0"), ("host1", "1")]  # one task per GPU
            assert {who for f in futures for who in client.who_has(f)[f.key]} <= tagged
            # a GPU worker lost: its replacement takes that GPU again
            lost = next(n for n, i in cluster.engine.workers.items() if i["host"] == "host1")
            pid = cluster.engine.workers[lost]["pid"]
            assert gpu_hosts.run_in("host1", ["kill", "-KILL", "--", f"-{pid}"]).wait() == 0
            assert wait_until(lambda: lost not in cluster.engine.workers, timeout=60)
            client.wait_for_workers(3, timeout=60)
            assert wait_until(lambda: len(_workers(client)) == 3, timeout=60)
            seen = client.run(
                lambda: (socket.gethostname(), os.environ.get("CUDA_VISIBLE_DEVICES"))
            )
            assert sorted(seen.values()) == [("host1", "0"), ("host1", "1"), ("host2", None)]
    finally:
        cluster.close()
    assert not gpu_hosts.leftovers()


def test_gpus_per_host_a_count_or_auto_and_more_than_a_host_has_refused(
    gpu_hosts: TestHosts,
) -> None:
    # a count below what host1 has: that many pinned workers; host2 keeps its worker count
    cluster = cluster_on(
        gpu_hosts, HOSTS, gpus={"host1": 1}, workers_per_host={"host1": 3, "host2": 2}
    )
    try:
        assert cluster.capacity == 3
        with Client(cluster) as client:
            client.wait_for_workers(3, timeout=60)
            seen = client.run(
                lambda: (socket.gethostname(), os.environ.get("CUDA_VISIBLE_DEVICES"))
            )
            pinned = [("host1", "0"), ("host2", None), ("host2", None)]
            assert sorted(seen.values(), key=str) == pinned
            resources = sorted((w["resources"] for w in _workers(client).values()), key=len)
            assert resources == [{}, {}, {"GPU": 1}]
    finally:
        cluster.close()
    auto = cluster_on(gpu_hosts, HOSTS, gpus={"host1": "auto"}, n_workers=0)  # host1's 2, host2's 1
    try:
        assert auto.capacity == 3
        assert [auto.engine.gpus(h) for h in HOSTS] == [[0, 1], []]
    finally:
        auto.close()
    for asked, host, has in (({"host1": 3}, "host1", 2), ({"host2": 1}, "host2", 0)):
        with pytest.raises(ValueError) as info:
            cluster_on(gpu_hosts, HOSTS, gpus=asked)
        said = str(info.value)
        assert f"gpus: {host} has {has} GPU(s)" in said and f"{asked[host]} asked for" in said
    assert not gpu_hosts.leftovers()


def test_setup_lines_run_before_the_processes_and_a_failing_one_is_named(
    gpu_hosts: TestHosts,
) -> None:
    cluster = cluster_on(
        gpu_hosts,
        HOSTS,
        scheduler_host="host2",
        setup={"host1": ["export SITE_STEP=one"], "host2": ["export SITE_STEP=two"]},
    )
    try:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            ran = client.run(lambda: (socket.gethostname(), os.environ.get("SITE_STEP")))
            assert sorted(ran.values()) == [("host1", "one"), ("host2", "two")]
            on_scheduler = client.run_on_scheduler(lambda: os.environ.get("SITE_STEP"))
            assert on_scheduler == "two"
            logs = cluster.engine.get_logs()  # the processes' own log files: setup said there
            assert all("[lazycluster] setup step 1: export SITE_STEP" in t for t in logs.values())
    finally:
        cluster.close()
    started = time.monotonic()
    with pytest.raises(WorkerStartError) as info:
        cluster_on(gpu_hosts, HOSTS, setup=["true", "module load cuda/12"])
    said = str(info.value)
    assert "host1: setup step 2 (module load cuda/12) failed (exit 127)" in said, said
    assert "module: not found" in said
    assert time.monotonic() - started < 30
    assert not gpu_hosts.leftovers()


def test_a_worker_count_per_host_through_start_scale_and_adapt(gpu_hosts: TestHosts) -> None:
    cluster = cluster_on(gpu_hosts, HOSTS, workers_per_host={"host1": 2}, n_workers=1)
    try:
        assert cluster.capacity == 3
        with Client(cluster) as client:
            cluster.scale(10)  # capped at the capacity
            cluster.wait_started()
            client.wait_for_workers(3, timeout=60)
            hosts = sorted(i["host"] for i in cluster.engine.workers.values())
            assert hosts == ["host1", "host1", "host2"]
            adaptive = cluster.adapt(minimum=1, maximum=10)
            assert adaptive.maximum == 3
    finally:
        cluster.close()
    with pytest.raises(ValueError, match="not in the cluster"):
        cluster_on(gpu_hosts, HOSTS, workers_per_host={"host9": 2})
    assert not gpu_hosts.leftovers()


def _spec_hosts(cluster: LazySSHCluster) -> list[str]:
    return sorted(v["options"]["host"] for v in cluster.worker_spec.values())


def _only_worker_on(cluster: LazySSHCluster, host: str) -> str:
    (name,) = [n for n, v in cluster.worker_spec.items() if v["options"]["host"] == host]
    return name


def _registered_hosts(client: Client) -> list[str]:
    """The hosts of the workers the scheduler knows (from their names: <host>-<n>)."""
    return sorted(str(w["name"]).rsplit("-", 1)[0] for w in _workers(client).values())


def test_healing_honours_the_worker_count_of_each_host(gpu_hosts: TestHosts, caplog) -> None:
    caplog.set_level(logging.INFO, logger="lazycluster_tasks")
    cluster = cluster_on(
        gpu_hosts, HOSTS, workers_per_host={"host1": 2, "host2": 1}, n_workers=2, worker_ttl=3
    )
    try:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            assert _registered_hosts(client) == ["host1", "host2"]
            first = _only_worker_on(cluster, "host2")
            # host2 away: its worker moves to host1, which has room for a second one
            gpu_hosts.cut_host("host2")
            try:
                moved = f"starts on host1 to replace {first}"
                assert wait_until(lambda: moved in caplog.text, 60), caplog.text[-2000:]
                assert wait_until(lambda: _registered_hosts(client) == ["host1", "host1"], 60)
                cluster.scale(3)  # host1 is full and host2 away: capped, none above host1's 2
                assert _spec_hosts(cluster) == ["host1", "host1"]
            finally:
                gpu_hosts.restore_host("host2")
            assert wait_until(lambda: "host host2 answers again" in caplog.text, 60)
            cluster.scale(3)
            cluster.wait_started()
            assert wait_until(
                lambda: _registered_hosts(client) == ["host1", "host1", "host2"], 60
            ), _workers(client)
            # full: host2's worker lost again has nowhere to go but host2, once it answers
            second = _only_worker_on(cluster, "host2")
            gpu_hosts.cut_host("host2")
            try:
                lost = f"worker {second} on host2 lost"
                assert wait_until(lambda: lost in caplog.text, 60), caplog.text[-2000:]
                for _ in range(4):  # a few checks of the healer: nothing placed above a count
                    time.sleep(1)
                    assert _spec_hosts(cluster) == ["host1", "host1"]
                assert f"to replace {second}" not in caplog.text
            finally:
                gpu_hosts.restore_host("host2")
            back = f"starts on host2 to replace {second}"
            assert wait_until(lambda: back in caplog.text, 60), caplog.text[-2000:]
            assert wait_until(
                lambda: _registered_hosts(client) == ["host1", "host1", "host2"], 60
            ), _workers(client)
            assert _spec_hosts(cluster) == ["host1", "host1", "host2"]
    finally:
        cluster.close()
    assert wait_until(lambda: not gpu_hosts.leftovers(), 30), gpu_hosts.leftovers()


def test_prefect_tasks_that_need_a_gpu_run_one_per_gpu(
    gpu_hosts: TestHosts, prefect_api: str
) -> None:
    from tests.prefect_jobs import tasks_on_gpus

    ran = tasks_on_gpus(HOSTS, str(gpu_hosts.ssh_config_path))
    assert len(ran) == 4 and set(ran) == {("host1", "0"), ("host1", "1")}
    assert not gpu_hosts.leftovers()
