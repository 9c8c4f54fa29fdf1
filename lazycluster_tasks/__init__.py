"""lazycluster_tasks: Dask clusters on plain SSH hosts, launched and torn down by Prefect tasks."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import Any

from lazycluster_tasks.cluster import (
    MasterLauncher,
    MasterWorkerCluster,
    RuntimeCluster,
    WorkerLauncher,
)
from lazycluster_tasks.dask import DaskCluster, DaskOptions, teardown
from lazycluster_tasks.dask_launchers import (
    LocalMasterLauncher,
    RemoteMasterLauncher,
    RoundRobinLauncher,
)
from lazycluster_tasks.environment import Environment, ExecutionFileLogUtil, Timestamp
from lazycluster_tasks.errors import (
    AuthenticationError,
    ClusterLostError,
    EnvironmentSyncError,
    GroupError,
    HostConnectionError,
    HostKeyError,
    InvalidRuntimeError,
    LazyclusterError,
    MasterStartError,
    NetworkPathError,
    NoPortsLeftError,
    NoRuntimesDetectedError,
    OperationTimeoutError,
    PathCreationError,
    PortInUseError,
    RemoteEnvironmentError,
    TaskExecutionError,
    TunnelError,
    WorkerStartError,
    is_transient,
)
from lazycluster_tasks.group import RuntimeGroup
from lazycluster_tasks.manager import RuntimeManager
from lazycluster_tasks.record import ClusterState
from lazycluster_tasks.runtime import Runtime, RuntimeProcess
from lazycluster_tasks.task import RuntimeTask

#: Names of the Prefect layer, imported on first use: the core works without importing prefect.
PREFECT_NAMES = (
    "ClusterHandle",
    "ClusterRecord",
    "HostGroupBlock",
    "SSHSettingsBlock",
    "check_runtimes",
    "cleanup_cluster",
    "cluster_lifecycle",
    "dask_cluster",
    "launch_master",
    "launch_workers",
    "setup_tunnels",
    "teardown_cluster",
)


def __getattr__(name: str) -> Any:
    if name == "LazySSHCluster":  # imported on use: it pulls in distributed.deploy
        from lazycluster_tasks.ssh_cluster import LazySSHCluster

        return LazySSHCluster
    if name in PREFECT_NAMES:
        from lazycluster_tasks import prefect

        return getattr(prefect, name)
    raise AttributeError(f"module 'lazycluster_tasks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *PREFECT_NAMES, "LazySSHCluster"])


try:
    __version__ = _version("lazycluster-tasks")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AuthenticationError",
    "ClusterLostError",
    "ClusterState",
    "DaskCluster",
    "DaskOptions",
    "Environment",
    "EnvironmentSyncError",
    "ExecutionFileLogUtil",
    "GroupError",
    "HostConnectionError",
    "HostKeyError",
    "InvalidRuntimeError",
    "LazySSHCluster",
    "LazyclusterError",
    "LocalMasterLauncher",
    "MasterLauncher",
    "MasterStartError",
    "MasterWorkerCluster",
    "NetworkPathError",
    "NoPortsLeftError",
    "NoRuntimesDetectedError",
    "OperationTimeoutError",
    "PathCreationError",
    "PortInUseError",
    "RemoteEnvironmentError",
    "RemoteMasterLauncher",
    "RoundRobinLauncher",
    "Runtime",
    "RuntimeCluster",
    "RuntimeGroup",
    "RuntimeManager",
    "RuntimeProcess",
    "RuntimeTask",
    "TaskExecutionError",
    "Timestamp",
    "TunnelError",
    "WorkerLauncher",
    "WorkerStartError",
    "__version__",
    "is_transient",
    "teardown",
]
