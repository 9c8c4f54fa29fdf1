"""lazycluster_tasks: Dask clusters on plain SSH hosts, launched and torn down by Prefect tasks."""

from lazycluster_tasks.environment import Environment
from lazycluster_tasks.errors import (
    AuthenticationError,
    GroupError,
    HostConnectionError,
    HostKeyError,
    InvalidRuntimeError,
    LazyclusterError,
    MasterStartError,
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
from lazycluster_tasks.runtime import Runtime
from lazycluster_tasks.task import RuntimeTask

__all__ = [
    "AuthenticationError",
    "Environment",
    "GroupError",
    "HostConnectionError",
    "HostKeyError",
    "InvalidRuntimeError",
    "LazyclusterError",
    "MasterStartError",
    "NoPortsLeftError",
    "NoRuntimesDetectedError",
    "OperationTimeoutError",
    "PathCreationError",
    "PortInUseError",
    "RemoteEnvironmentError",
    "Runtime",
    "RuntimeGroup",
    "RuntimeManager",
    "RuntimeTask",
    "TaskExecutionError",
    "TunnelError",
    "WorkerStartError",
    "is_transient",
]
