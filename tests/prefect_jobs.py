"""Compute jobs for the deployment tests, by import path ("tests.prefect_jobs:...")."""

from __future__ import annotations

import socket
import time

from lazycluster_tasks.prefect import ClusterHandle


def hostnames(cluster: ClusterHandle) -> list[str]:
    return sorted(cluster.client.run(socket.gethostname).values())


def hold(cluster: ClusterHandle, seconds: float = 600) -> None:
    """Keep the cluster up (until the run is cancelled)."""
    time.sleep(seconds)
