"""Compute jobs for the deployment tests, by import path ("tests.prefect_jobs:...")."""

from __future__ import annotations

import socket
import time

from prefect import flow, task

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


@task
def where_am_i(i: int) -> tuple[str, str]:
    """Where a task run ran: the host and the interpreter."""
    import sys

    return socket.gethostname(), sys.executable


@flow(name="tasks-on-the-hosts")
def tasks_on_the_hosts(hosts: list[str], ssh_config_path: str) -> list[tuple[str, str]]:
    """Prefect task runs on the cluster's workers, one per host."""
    with dask_cluster(hosts, ssh_config_path=ssh_config_path) as cluster:
        run = fan_out.with_options(task_runner=cluster.task_runner())
        return run(len(hosts))


@flow
def fan_out(count: int) -> list[tuple[str, str]]:
    futures = [where_am_i.submit(i) for i in range(count * 4)]
    return [future.result() for future in futures]


@task
def which_gpu(seconds: float) -> tuple[str, str]:
    """Where a task run ran: the host and the GPU its worker is pinned to."""
    import os

    time.sleep(seconds)
    return socket.gethostname(), os.environ.get("CUDA_VISIBLE_DEVICES", "")


@flow(name="tasks-on-gpus")
def tasks_on_gpus(hosts: list[str], ssh_config_path: str) -> list[tuple[str, str]]:
    """Prefect task runs that each need a GPU, on a cluster with one worker per GPU."""
    with dask_cluster(hosts, ssh_config_path=ssh_config_path, gpus="auto") as cluster:
        return gpu_tasks.with_options(task_runner=cluster.task_runner())(4)


@flow
def gpu_tasks(count: int) -> list[tuple[str, str]]:
    import dask

    with dask.annotate(resources={"GPU": 1}):
        futures = [which_gpu.submit(0.5) for _ in range(count)]
    return [future.result() for future in futures]
