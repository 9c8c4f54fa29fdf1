"""Compute jobs for the deployment tests, by import path ("tests.prefect_jobs:...")."""

from __future__ import annotations

import socket
import time

from prefect import flow

from lazycluster_tasks.prefect import ClusterHandle, dask_cluster


def hostnames(cluster: ClusterHandle) -> list[str]:
    return sorted(cluster.client.run(socket.gethostname).values())


def hold(cluster: ClusterHandle, seconds: float = 600) -> None:
    """Keep the cluster up (until the run is cancelled)."""
    time.sleep(seconds)


@flow(name="lifecycle-without-hooks")
def lifecycle_without_hooks(hosts: list[str], ssh_config_path: str) -> None:
    """A cluster held by a flow with no crash or cancellation hook: what a killed process leaves
    to the server-side safety net."""
    with dask_cluster(hosts, ssh_config_path=ssh_config_path) as cluster:
        hold(cluster)
