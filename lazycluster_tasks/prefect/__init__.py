"""The Prefect layer: lifecycle tasks, flows, blocks and artifacts over the plain-Python core.

The only part of lazycluster_tasks that imports prefect.
"""

from lazycluster_tasks.prefect.blocks import HostGroupBlock, SSHSettingsBlock
from lazycluster_tasks.prefect.flows import (
    ClusterHandle,
    cluster_lifecycle,
    dask_cluster,
    teardown_cluster,
    teardown_hook,
    teardown_run_clusters,
)
from lazycluster_tasks.prefect.records import ClusterRecord, ClusterRecordBlock
from lazycluster_tasks.prefect.shell import SSHCommand, ssh_command
from lazycluster_tasks.prefect.tasks import (
    check_runtimes,
    cleanup_cluster,
    launch_master,
    launch_workers,
    setup_tunnels,
)

__all__ = [
    "ClusterHandle",
    "ClusterRecord",
    "ClusterRecordBlock",
    "HostGroupBlock",
    "SSHCommand",
    "SSHSettingsBlock",
    "check_runtimes",
    "cleanup_cluster",
    "cluster_lifecycle",
    "dask_cluster",
    "launch_master",
    "launch_workers",
    "setup_tunnels",
    "ssh_command",
    "teardown_cluster",
    "teardown_hook",
    "teardown_run_clusters",
]
