"""A served deployment: triggered runs complete, and a cancelled run leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.deployments import run_deployment
from prefect.states import Cancelling

from lazycluster_tasks.prefect.records import clusters_of_run
from lazycluster_tasks.testing.helpers import ROOT, local_leftovers, wait_until

pytestmark = pytest.mark.slow

SERVE = """
from prefect import serve
from lazycluster_tasks.prefect.flows import cluster_lifecycle, teardown_run_clusters
from tests.prefect_jobs import lifecycle_without_hooks
serve(
    cluster_lifecycle.to_deployment(name="under-test"),
    lifecycle_without_hooks.to_deployment(name="no-hooks"),
    teardown_run_clusters.to_deployment(name="teardown-run-clusters"),
)
"""
DEPLOYMENT = "cluster-lifecycle/under-test"
NO_HOOKS = "lifecycle-without-hooks/no-hooks"
TEARDOWN = "teardown-run-clusters/teardown-run-clusters"


@pytest.fixture
def served(prefect_api: str, multi_hosts, no_leftovers) -> Iterator[str]:
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PYTHONPATH": ROOT,
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    }
    proc = subprocess.Popen([sys.executable, "-c", SERVE], env=env, cwd=ROOT)
    try:
        with get_client(sync_client=True) as client:

            def registered() -> bool:
                try:
                    for name in (DEPLOYMENT, NO_HOOKS, TEARDOWN):
                        client.read_deployment_by_name(name)
                    return True
                except Exception:
                    return False

            assert wait_until(registered, timeout=60, interval=0.5)
        yield str(multi_hosts.ssh_config_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _drop_empty_runner_storage()


def _drop_empty_runner_storage() -> None:
    """Prefect's Runner removes its own storage folder but keeps their parent, "runner_storage",
    in the temp dir; it must be empty (anything in it would be a leak)."""
    parent = os.path.join(tempfile.gettempdir(), "runner_storage")
    if os.path.isdir(parent):
        assert os.listdir(parent) == [], os.listdir(parent)
        os.rmdir(parent)


def test_triggered_run_completes(served):
    run = run_deployment(
        DEPLOYMENT,
        parameters={
            "job": "tests.prefect_jobs:hostnames",
            "hosts": ["host1", "host2"],
            "ssh_config_path": served,
        },
        timeout=180,
    )
    assert run.state.is_completed(), run.state


def test_cancelled_run_ends_with_its_remote_processes_gone(served, multi_hosts):
    run = run_deployment(
        DEPLOYMENT,
        parameters={
            "job": "tests.prefect_jobs:hold",
            "hosts": ["host1", "host2"],
            "ssh_config_path": served,
            "network_mode": "tunnelled",
        },
        timeout=0,
    )
    assert wait_until(lambda: clusters_of_run(run.id), timeout=120, interval=0.5)
    (cluster_id,) = clusters_of_run(run.id)
    assert wait_until(lambda: multi_hosts.processes("host1") and multi_hosts.processes("host2"))
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Cancelling())
        assert wait_until(
            lambda: client.read_flow_run(run.id).state.is_cancelled(), timeout=60, interval=0.5
        ), client.read_flow_run(run.id).state
    start = time.monotonic()
    assert wait_until(
        lambda: not multi_hosts.leftovers() and not local_leftovers(cluster_id), timeout=30
    ), (multi_hosts.leftovers(), local_leftovers(cluster_id))
    print(f"cancelled run: hosts clean {time.monotonic() - start:.1f} s after the state change")
    assert clusters_of_run(run.id) == []  # the hook tore it down from its record


def _events(client, what: str, cluster_id: str) -> list[dict]:
    """The API's ``lazycluster.cluster.<what>`` events about cluster ``cluster_id``."""
    query = {
        "event": {"name": [f"lazycluster.cluster.{what}"]},
        "resource": {"id": [f"lazycluster.cluster.{cluster_id}"]},
    }
    found = client._client.post("/events/filter", json={"filter": query, "limit": 50})
    return list(found.json().get("events", []))


def _flow_process(run_id) -> psutil.Process | None:
    """The engine process the runner started for flow run ``run_id`` (not the scheduler it
    started in turn, which inherited the run's id in its environment too)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if "prefect.engine" in (proc.info["cmdline"] or []) and proc.environ().get(
                "PREFECT__FLOW_RUN_ID"
            ) == str(run_id):
                return proc
    return None


def test_the_automation_tears_down_a_crashed_runs_cluster_when_no_hook_can_run(served, multi_hosts):
    """The server-side safety net: the flow's process is killed (SIGKILL: no hook, no finally
    runs); the Automation reacts to the run's Crashed event by running teardown-run-clusters."""
    from deployments.automation import NAME, SILENT_NAME, create

    automations = create(TEARDOWN, heartbeat=30)
    assert [a.name for a in automations] == [NAME, SILENT_NAME]  # both accepted by the API
    run = run_deployment(
        NO_HOOKS,
        parameters={"hosts": ["host1", "host2"], "ssh_config_path": served},
        timeout=0,
    )
    try:
        assert wait_until(lambda: clusters_of_run(run.id), timeout=120, interval=0.5)
        (cluster_id,) = clusters_of_run(run.id)
        assert wait_until(lambda: multi_hosts.processes("host1") and multi_hosts.processes("host2"))
        with get_client(sync_client=True) as client:
            assert wait_until(lambda: _events(client, "started", cluster_id), 20)
            process = _flow_process(run.id)
            assert process is not None
            process.kill()
            assert wait_until(
                lambda: client.read_flow_run(run.id).state.is_crashed(), timeout=60, interval=0.5
            ), client.read_flow_run(run.id).state
            start = time.monotonic()

            def torn_down() -> list:
                teardowns = FlowFilter(name=FlowFilterName(any_=[TEARDOWN.split("/")[0]]))
                runs = client.read_flow_runs(flow_filter=teardowns)  # of the run's server
                return [
                    r for r in runs
                    if r.parameters.get("flow_run") == f"prefect.flow-run.{run.id}"
                    and r.state is not None and r.state.is_completed()
                ]  # fmt: skip

            assert wait_until(torn_down, timeout=60, interval=0.5)
            # well before the scheduler's idle timeout or the workers' death timeout (60 s)
            assert wait_until(lambda: not multi_hosts.leftovers(), timeout=10)
            print(f"automation: hosts clean {time.monotonic() - start:.1f} s after Crashed")
            (teardown_run,) = torn_down()
            assert teardown_run.state.result() == [cluster_id]
            assert wait_until(lambda: _events(client, "stopped", cluster_id), 20)
            stopped = _events(client, "stopped", cluster_id)
            assert stopped[0]["resource"]["prefect.resource.id"] == (
                f"lazycluster.cluster.{cluster_id}"
            )
            started = _events(client, "started", cluster_id)
            related = {r["prefect.resource.id"] for r in started[0]["related"]}
            assert {"lazycluster.host.host1", f"prefect.flow-run.{run.id}"} <= related
        assert clusters_of_run(run.id) == []
    finally:
        with get_client(sync_client=True) as client:
            for automation in automations:
                client.delete_automation(automation.id)


def test_prefect_deploy_from_the_yaml_works_from_a_fresh_checkout(prefect_api: str) -> None:
    """The documented commands, nothing else set: every deployment lands, run from here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAZYCLUSTER_PROJECT")}
    env["PREFECT_API_URL"] = prefect_api
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    steps = [
        [prefect, "work-pool", "create", "lazycluster", "--type", "process", "--overwrite"],
        [prefect, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all"],
    ]
    for argv in steps:
        done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = [
        "example-pipeline/example-pipeline-nightly",
        "cluster-lifecycle/cluster-lifecycle",
        "teardown-cluster/teardown-cluster",
        "teardown-run-clusters/teardown-run-clusters",
    ]
    with get_client(sync_client=True) as client:
        for name in names:
            deployment = client.read_deployment_by_name(name)
            (step,) = deployment.pull_steps or [{}]
            assert step["prefect.deployments.steps.set_working_directory"]["directory"] == ROOT
            client.delete_deployment(deployment.id)
