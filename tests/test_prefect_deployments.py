"""A served deployment: triggered runs complete, and a cancelled run leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.states import Cancelling

from lazycluster_tasks.prefect.records import clusters_of_run
from tests.conftest import ROOT, wait_until
from tests.test_dask_cluster import local_leftovers

pytestmark = pytest.mark.slow

SERVE = """
from lazycluster_tasks.prefect.flows import cluster_lifecycle
cluster_lifecycle.serve(name="under-test")
"""
DEPLOYMENT = "cluster-lifecycle/under-test"


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
                    client.read_deployment_by_name(DEPLOYMENT)
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
