"""The Prefect layer against a real API and real SSH test hosts."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prefect import flow, get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentTaskRunId,
    LogFilter,
    LogFilterFlowRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)

from lazycluster_tasks.deprecation import renamed
from lazycluster_tasks.prefect import (
    ClusterHandle,
    HostGroupBlock,
    SSHSettingsBlock,
    check_runtimes,
    cleanup_cluster,
    cluster_lifecycle,
    dask_cluster,
    launch_master,
    launch_workers,
    teardown_cluster,
)
from lazycluster_tasks.prefect.records import clusters_of_run, load_record
from lazycluster_tasks.prefect.tasks import capacity, live_cluster
from lazycluster_tasks.testing.helpers import HTTP_GET, ROOT, local_leftovers, wait_until

pytestmark = pytest.mark.slow

#: Two hosts (host3 is the one a test refuses for a while): a worker on a third host showed
#: nothing more and cost the suite a Prefect import per flow (2-3 s of CPU).
HOSTS = ["host1", "host3"]
#: Remote workers import this test module's tasks from the shared checkout.
WORKER_ENV = {"PYTHONPATH": ROOT}


def hostnames(cluster: ClusterHandle) -> list[str]:
    """A compute job: where every worker of the cluster runs."""
    return sorted(cluster.client.run(socket.gethostname).values())


def broken_job(cluster: ClusterHandle) -> None:
    raise RuntimeError("the compute job failed on purpose")


@pytest.fixture
def hosts_cfg(multi_hosts, prefect_api, no_leftovers) -> str:
    return str(multi_hosts.ssh_config_path)


def test_lifecycle_runs_the_job_on_remote_workers(hosts_cfg):
    result = cluster_lifecycle(
        job=hostnames, hosts=HOSTS, ssh_config_path=hosts_cfg, options={"env": WORKER_ENV}
    )
    assert result == HOSTS


def test_a_failing_job_fails_the_flow_and_still_tears_down(hosts_cfg, multi_hosts):
    state = cluster_lifecycle(
        job=broken_job, hosts=HOSTS[:2], ssh_config_path=hosts_cfg, return_state=True
    )
    assert state.is_failed()
    with pytest.raises(RuntimeError, match="on purpose"):
        state.result()
    assert multi_hosts.leftovers() == {}


class _OnRetry(logging.Handler):
    """Calls ``action`` once, when Prefect announces the first retry of a task run."""

    def __init__(self, action) -> None:
        super().__init__()
        self.action, self.done = action, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "Retry" in record.getMessage() and not self.done.is_set():
            self.done.set()
            self.action()


def test_transient_refusal_is_retried(hosts_cfg, multi_hosts):
    multi_hosts.stop_sshd("host3")  # refused until the first attempt has failed
    on_retry = _OnRetry(lambda: multi_hosts.start_sshd("host3"))
    task_log = logging.getLogger("prefect.task_runs")
    task_log.addHandler(on_retry)
    try:
        state = cluster_lifecycle(
            job=hostnames, hosts=HOSTS, ssh_config_path=hosts_cfg, return_state=True
        )
    finally:
        task_log.removeHandler(on_retry)
        if not on_retry.done.is_set():
            multi_hosts.start_sshd("host3")
    assert state.is_completed(), state
    assert state.result() == HOSTS
    runs = task_runs_of(state.state_details.flow_run_id)
    assert runs["launch-master"].run_count >= 2


def test_authentication_failure_is_not_retried(hosts_cfg, tmp_path):
    key = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    SSHSettingsBlock(private_key=key.read_text(), ssh_config_path=hosts_cfg).save(
        "stranger", overwrite=True
    )
    start = time.monotonic()
    state = cluster_lifecycle(
        job=hostnames, hosts=["host1"], ssh_block="stranger", return_state=True
    )
    assert state.is_failed()
    with pytest.raises(Exception, match="authentication to host1"):
        state.result()
    assert time.monotonic() - start < 30
    assert task_runs_of(state.state_details.flow_run_id)["launch-master"].run_count == 1


def task_run_list(flow_run_id: Any) -> list[Any]:
    with get_client(sync_client=True) as client:
        return list(
            client.read_task_runs(
                task_run_filter=TaskRunFilter(
                    flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])
                )
            )
        )


def task_runs_of(flow_run_id: Any) -> dict[str, Any]:
    """Task runs of a flow run by task name (one run per name expected)."""
    return {run.name.rsplit("-", 1)[0]: run for run in task_run_list(flow_run_id)}


@task
def where_am_i(i: int) -> str:
    host = socket.gethostname()
    get_run_logger().info("item %d computed on %s", i, host)
    return host


@flow
def fan_out_items(addresses: list[str]) -> list[str]:
    import dask

    futures = []
    for i, address in enumerate(addresses):
        with dask.annotate(workers=[address], allow_other_workers=False):
            futures.append(where_am_i.submit(i))
    return [future.result() for future in futures]


@flow
def user_pipeline(ssh_config_path: str) -> list[str]:
    with dask_cluster(HOSTS, ssh_config_path=ssh_config_path, env=WORKER_ENV) as cluster:
        addresses = [w["address"] for w in cluster.cluster.workers.values()]
        return fan_out_items.with_options(task_runner=cluster.task_runner())(addresses)


def test_user_flow_runs_its_tasks_on_the_cluster_and_reports_to_the_api(hosts_cfg):
    state = user_pipeline(hosts_cfg, return_state=True)
    assert sorted(state.result()) == HOSTS
    with get_client(sync_client=True) as client:
        parent = state.state_details.flow_run_id
        parent_tasks = [r.id for r in task_runs_of(parent).values()]
        (inner,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_task_run_id=FlowRunFilterParentTaskRunId(any_=parent_tasks)
            )
        )
        runs = [r for r in task_run_list(inner.id) if r.name.startswith("where_am_i")]
        assert len(runs) == len(HOSTS) and all(r.state.is_completed() for r in runs)
        seen: set[str] = set()

        def hosts_in_logs() -> bool:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[inner.id]))
            )
            seen.update(m.message.rsplit(" ", 1)[-1] for m in logs if "computed on" in m.message)
            return seen == set(HOSTS)

        # the workers' task runs reported to the API, each from its remote host
        assert wait_until(hosts_in_logs, timeout=20), seen


def moved_between_hosts(n: int) -> tuple[str, int]:
    return socket.gethostname(), n


def _bytes(path: str) -> bytes:
    return Path(path).read_bytes() if Path(path).exists() else b""


@flow
def no_host_links(ssh_config_path: str, keys: dict[str, str]) -> dict[str, Any]:
    """A tunnelled cluster with ``host_links=False``: what it did to each host's keys file."""
    with dask_cluster(
        HOSTS,
        ssh_config_path=ssh_config_path,
        network_mode="tunnelled",
        host_links=False,
        env=WORKER_ENV,
    ) as cluster:
        client = cluster.client
        on = {w["host"]: w["address"] for w in cluster.cluster.workers.values()}
        data = client.submit(bytes, 1 << 20, workers=[on["host1"]], pure=False)
        moved = client.submit(len, data, workers=[on[HOSTS[1]]], allow_other_workers=False)
        routing = cluster.cluster.routing
        return {
            "moved": moved.result(timeout=60),
            "mode": cluster.record.network_mode,
            "links": getattr(routing, "links", None) is not None,
            "during": {h: _bytes(path).hex() for h, path in keys.items()},
        }


def test_dask_cluster_without_host_links_edits_no_authorized_keys(hosts_cfg, multi_hosts):
    """``dask_cluster(host_links=False)``: a tunnelled cluster whose workers exchange data
    edits no host's authorized_keys, while it runs and after (byte-identical)."""
    keys = {h: str(multi_hosts.ssh_dir(h) / "authorized_keys") for h in HOSTS}
    before = {h: multi_hosts.authorized_keys_bytes(h).hex() for h in HOSTS}
    seen = no_host_links(hosts_cfg, keys)
    assert (seen["moved"], seen["mode"], seen["links"]) == (1 << 20, "tunnelled", False)
    assert seen["during"] == before
    assert {h: multi_hosts.authorized_keys_bytes(h).hex() for h in HOSTS} == before


CONTROLLER = """
import json, sys, time
from prefect import flow
from lazycluster_tasks.prefect import dask_cluster

@flow
def hold(config: str) -> None:
    with dask_cluster(["host1", "host2"], ssh_config_path=config, network_mode="tunnelled") as c:
        print(json.dumps({"cluster_id": c.record.cluster_id}), flush=True)
        time.sleep(600)

hold(sys.argv[1])
"""


def test_teardown_cluster_after_the_controller_was_killed(hosts_cfg, prefect_api, multi_hosts):
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(
        [sys.executable, "-c", CONTROLLER, hosts_cfg], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        line = proc.stdout.readline()
        cluster_id = json.loads(line)["cluster_id"]
        assert multi_hosts.processes("host1") and multi_hosts.processes("host2")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert load_record(cluster_id) is not None
    assert teardown_cluster(cluster_id) == f"cluster {cluster_id} stopped"
    assert multi_hosts.leftovers() == {} and local_leftovers(cluster_id) == []
    assert load_record(cluster_id) is None
    assert teardown_cluster(cluster_id) == "nothing to do"  # idempotent


def test_no_secret_reaches_logs_artifacts_records_or_errors(hosts_cfg, multi_hosts, tmp_path):
    key = tmp_path / "encrypted"
    key.write_text(multi_hosts.identity_file.read_text())
    key.chmod(0o600)
    passphrase = "pass-phrase-s3cret-91e2"
    subprocess.run(["ssh-keygen", "-q", "-p", "-N", passphrase, "-f", str(key)], check=True)
    key_text = key.read_text()
    key_line = key_text.splitlines()[2]  # a line of the key body
    SSHSettingsBlock(
        private_key=key_text, key_passphrase=passphrase, ssh_config_path=hosts_cfg
    ).save("encrypted-key", overwrite=True)
    ok = cluster_lifecycle(
        job=hostnames, hosts=HOSTS[:2], ssh_block="encrypted-key", return_state=True
    )
    assert ok.result() == HOSTS[:2]
    SSHSettingsBlock(
        private_key=key_text, key_passphrase="wrong-" + passphrase, ssh_config_path=hosts_cfg
    ).save("wrong-passphrase", overwrite=True)
    failed = cluster_lifecycle(
        job=hostnames, hosts=HOSTS[:1], ssh_block="wrong-passphrase", return_state=True
    )
    assert failed.is_failed()
    produced = [str(failed.result(raise_on_failure=False))]
    with get_client(sync_client=True) as client:
        for state in (ok, failed):
            run_ids = flow_run_tree(client, state.state_details.flow_run_id)
            produced += [
                line.message
                for line in client.read_logs(
                    log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids))
                )
            ]
            artifacts = client.read_artifacts(  # of these runs: the server is the run's
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=run_ids))
            )
            assert artifacts or state is failed  # the run that started a cluster shows it
            produced += [json.dumps(a.data, default=str) for a in artifacts]
            produced += [
                str(r.state.message)
                for r in client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids))
                )
            ]
    produced.append(json.dumps(ok.result(), default=str))
    text = "\n".join(produced)
    assert "authentication" in text.lower() or "passphrase" in text.lower()
    for secret in (passphrase, key_line):
        assert secret not in text


def flow_run_tree(client: Any, flow_run_id: Any) -> list[Any]:
    ids = [flow_run_id]
    tasks = [r.id for r in task_runs_of(flow_run_id).values()]
    if tasks:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_task_run_id=FlowRunFilterParentTaskRunId(any_=tasks)
            )
        )
        for child in children:
            ids += flow_run_tree(client, child.id)
    return ids


def test_records_are_listed_under_the_flow_run(hosts_cfg):
    seen: dict[str, Any] = {}

    @flow
    def peek(config: str) -> None:
        from prefect.runtime import flow_run

        with dask_cluster(["host1"], ssh_config_path=config) as cluster:
            seen["run"] = flow_run.id
            seen["ids"] = clusters_of_run(flow_run.id)
            seen["cluster"] = cluster.record.cluster_id

    peek(hosts_cfg)
    assert seen["ids"] == [seen["cluster"]]
    assert clusters_of_run(seen["run"]) == []  # forgotten after cleanup
    assert wait_until(lambda: local_leftovers(seen["cluster"]) == [])


def test_check_runtimes_and_a_host_group_block(hosts_cfg, multi_hosts):
    @flow
    def usable(hosts: list[str]) -> list[str]:
        return check_runtimes(hosts, ssh_config_path=hosts_cfg, min_cpu_cores=1)

    multi_hosts.stop_sshd("host4")
    try:
        assert usable(["host1", "host2", "host4"]) == ["host1", "host2"]
    finally:
        multi_hosts.start_sshd("host4")

    HostGroupBlock(
        hosts=["host2", "host3"],
        workers_per_host=2,
        network_mode="tunnelled",
        ssh=SSHSettingsBlock(ssh_config_path=hosts_cfg),
    ).save("pair", overwrite=True)

    @flow
    def on_group() -> tuple[str, list[str]]:
        with dask_cluster(host_group="pair") as cluster:
            return cluster.record.network_mode, sorted(w.host for w in cluster.record.workers)

    assert on_group() == ("tunnelled", ["host2", "host2", "host3", "host3"])


@task
def slow_where(i: int) -> str:
    time.sleep(0.5)
    return where_am_i.fn(i)


@flow
def mapped_items(count: int) -> list[str]:
    return [future.result() for future in slow_where.map(range(count))]


def test_dask_task_runner_starts_our_cluster_class_on_the_hosts(hosts_cfg, multi_hosts):
    from prefect_dask import DaskTaskRunner

    HostGroupBlock(hosts=HOSTS, ssh=SSHSettingsBlock(ssh_config_path=hosts_cfg)).save(
        "runner-hosts", overwrite=True
    )
    runner = DaskTaskRunner(
        cluster_class="lazycluster_tasks.LazySSHCluster",
        cluster_kwargs={  # plain data, hosts and SSH settings by block name
            "host_group": "runner-hosts",
            "env": WORKER_ENV,
            "threads_per_worker": 1,
            "n_workers": 1,
        },
        adapt_kwargs={"minimum": 3, "maximum": 8},  # 8 is capped at the capacity, 3
    )
    state = mapped_items.with_options(task_runner=runner)(9, return_state=True)
    hosts = state.result()
    assert len(hosts) == 9 and set(hosts) <= set(HOSTS) and len(set(hosts)) >= 2
    runs = [r for r in task_run_list(state.state_details.flow_run_id) if "slow_where" in r.name]
    assert len(runs) == 9 and all(r.state.is_completed() for r in runs)
    with get_client(sync_client=True) as client:
        flow_run_id = state.state_details.flow_run_id
        seen: set[str] = set()

        def hosts_in_logs() -> bool:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            seen.update(m.message.rsplit(" ", 1)[-1] for m in logs if "computed on" in m.message)
            return seen == set(hosts)

        assert wait_until(hosts_in_logs, timeout=20), seen  # sent by the remote workers
    assert multi_hosts.leftovers() == {}  # the runner closed the cluster with the flow


def test_the_forwarded_api_answers_the_workers_only(hosts_cfg, prefect_api, multi_hosts):
    """A Prefect API on this machine's loopback (the ephemeral one, a local server) answers
    anyone who reaches it, and hands out block secrets: forwarded to the hosts for the workers,
    a connection from another local user of a cluster host is closed before it reaches the API;
    the workers' task runs report (see the test above) and so does the login user."""

    port = int(prefect_api.split(":")[2].split("/")[0])

    def ask(*user: str) -> str:  # host1's unprivileged user asks the forwarded API
        argv = [sys.executable, "-c", HTTP_GET, str(port), "/api/health"]
        proc = multi_hosts.run_in("host1", [*user, *argv], stdout=subprocess.PIPE, text=True)
        return proc.communicate(timeout=30)[0]

    @flow
    def ask_while_a_cluster_runs(ssh_config_path: str) -> dict[str, str]:
        with dask_cluster(HOSTS[:2], ssh_config_path=ssh_config_path):
            nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            return {"outsider": ask(*nobody), "login user": ask()}

    answers = ask_while_a_cluster_runs(hosts_cfg)
    assert not answers["outsider"].startswith("HTTP"), answers
    assert answers["login user"].startswith("HTTP/1.1 200"), answers  # the control


# -- one vocabulary: the old keywords work for one release, with a DeprecationWarning ----------


def test_renamed_maps_an_old_keyword_warns_and_refuses_both() -> None:
    kwargs = {"master_host": "h1", "n_workers": None}
    with pytest.deprecated_call(match="master_host is deprecated: use scheduler_host"):
        assert renamed(kwargs, "master_host", "scheduler_host") == "h1"
    assert kwargs == {"scheduler_host": "h1", "n_workers": None}
    assert renamed(kwargs, "workers", "n_workers") is None  # not given: nothing to say
    with pytest.raises(TypeError, match="both master_host= and scheduler_host="):
        renamed({"master_host": "a", "scheduler_host": "b"}, "master_host", "scheduler_host")


def test_old_keywords_of_dask_cluster_and_the_tasks_without_a_cluster() -> None:
    """Mapped (or refused) when called, before anything connects: no API, no host needed."""
    with pytest.deprecated_call() as caught:
        opened = dask_cluster(["localhost"], master_host="localhost", workers=1, env={"A": "1"})
    assert {str(w.message).split(" ")[0] for w in caught} >= {"master_host", "workers"}
    assert all(w.filename == __file__ for w in caught)  # the warning names the caller's line
    given = opened.kwds  # type: ignore[attr-defined]  # what the cluster would start with
    assert (given["scheduler_host"], given["n_workers"]) == ("localhost", 1)
    assert given["options"] == {"env": {"A": "1"}}
    with pytest.raises(TypeError, match="master_host= and scheduler_host="):
        dask_cluster(["localhost"], master_host="a", scheduler_host="b")
    with pytest.raises(TypeError, match="workers= and n_workers="):
        dask_cluster(["localhost"], workers=1, n_workers=2)
    with pytest.raises(TypeError, match="master_timeout= and scheduler_timeout="):
        launch_master.fn(["localhost"], master_timeout=5, scheduler_timeout=5)
    with pytest.raises(TypeError, match="count= and n_workers="):
        launch_workers.fn(None, 1, count=2)  # type: ignore[arg-type]
    # the capacity that prelaunch needs before the cluster exists: a count, or host -> count
    assert capacity(["a", "b"], None) == 2 and capacity(["a", "b"], 3) == 6
    assert capacity(["gpu1", "cpu1", "cpu2"], {"gpu1": 4, "cpu1": 2}) == 7


def test_old_keywords_of_the_tasks_and_the_flow_map_to_the_new_ones(prefect_api: str) -> None:
    """One small cluster on this machine, started and grown by the tasks under their old
    keywords (workers per host by host); the flow's master_host reaches the cluster as
    scheduler_host."""

    @flow
    def old_words() -> dict[str, Any]:
        record = launch_master(
            ["localhost"],
            master_host="localhost",
            master_timeout=45,
            workers=1,
            workers_per_host={"localhost": 2},  # passed on as given: capacity 2
        )
        try:
            cluster = live_cluster(record.cluster_id)
            assert cluster is not None
            seen = {
                "scheduler_host": cluster.launcher.scheduler_host,
                "scheduler_timeout": cluster.launcher.scheduler_timeout,
                "capacity": cluster.capacity,
            }
            record = launch_workers(record, count=1)
            seen["workers"] = len(record.workers)
        finally:
            cleanup_cluster(record)
        seen["cluster_id"] = record.cluster_id
        return seen

    with pytest.warns(DeprecationWarning) as caught:
        seen = old_words()
    said = {str(w.message).split(" ")[0] for w in caught if "deprecated: use" in str(w.message)}
    assert said == {"master_host", "master_timeout", "workers", "count"}
    cluster_id = seen.pop("cluster_id")
    assert seen == {
        "scheduler_host": "localhost",
        "scheduler_timeout": 45,
        "capacity": 2,
        "workers": 1,  # not the capacity: workers= and count= were read as n_workers
    }
    assert wait_until(lambda: local_leftovers(cluster_id) == [])

    # the flow: master_host becomes scheduler_host (here a host the cluster refuses by name,
    # so nothing starts); both names given fail the run, naming both
    with pytest.deprecated_call(match="master_host is deprecated: use scheduler_host"):
        state = cluster_lifecycle(
            job=hostnames, hosts=["localhost"], master_host="elsewhere", return_state=True
        )
    with pytest.raises(ValueError, match="host 'elsewhere' is not in the group"):
        state.result()
    state = cluster_lifecycle(
        job=hostnames,
        hosts=["localhost"],
        master_host="localhost",
        scheduler_host="localhost",
        return_state=True,
    )
    with pytest.raises(TypeError, match="master_host= and scheduler_host="):
        state.result()
