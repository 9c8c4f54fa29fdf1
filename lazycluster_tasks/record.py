"""ClusterRecord: a cluster as frozen, serializable data, and ``teardown(record)``.

The one record type: ``DaskCluster.record()`` and ``LazySSHCluster.record()`` make it, the Prefect
layer persists it as it is (``model_dump(mode="json")``) and reads it back
(``ClusterRecord.model_validate``), and :func:`teardown` stops a cluster from it alone — from
another process, after the controller died. Records hold no secrets: those come back from where
they live (``connection_kwargs``, or the SSH settings block the record names).
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lazycluster_tasks import link_commands, processes
from lazycluster_tasks.errors import LazyclusterError
from lazycluster_tasks.group import run_parallel
from lazycluster_tasks.network import NetworkMode
from lazycluster_tasks.processes import ProcessInfo
from lazycluster_tasks.runtime import Runtime

#: Key of this machine (the controller) in records, next to the host names.
CONTROLLER_KEY = "(controller)"
SECRET_KWARGS = ("password", "passphrase", "private_key")


class ClusterState(str, Enum):
    """Where a cluster is in its life (the values are what records and the UI show; a state
    compares equal to its text, so ``cluster.state == "running"`` keeps working)."""

    created = "created"
    starting = "starting"
    running = "running"
    failed = "failed"  # running, but its scheduler is gone
    stopping = "stopping"
    stopped = "stopped"
    cleanup_failed = "cleanup failed"  # a host kept processes on record: cleanup() again

    def __str__(self) -> str:
        return self.value


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class HostSpec(_Frozen):
    """How to reach a host again (no secrets)."""

    name: str
    ssh_config_path: str | None = None
    connection_kwargs: dict[str, Any] = Field(default_factory=dict)
    python_executable: str | None = None

    @classmethod
    def of(cls, runtime: Runtime) -> HostSpec:
        kwargs = runtime.connection_kwargs
        return cls(
            name=runtime.host,
            ssh_config_path=runtime.ssh_config_path,
            connection_kwargs={k: v for k, v in kwargs.items() if k not in SECRET_KWARGS},
            python_executable=runtime.python_executable,
        )


class FolderRecord(_Frozen):
    """The cluster's folder on a host (and its working dir, removed too when temporary)."""

    folder: str
    working_dir: str
    temporary: bool = False
    #: the interpreter the cluster ran there (the edit of authorized_keys runs with it)
    python: str | None = None


class TunnelRecord(_Frozen):
    host: str
    kind: str
    local_port: int
    remote_port: int


class ClusterRecord(_Frozen):
    """Everything known about a cluster: hosts, processes (roles, ports, pids, pid files),
    folders, tunnels, addresses, network mode and paths, state."""

    cluster_id: str
    state: ClusterState
    network_mode: NetworkMode
    hosts: list[HostSpec]
    scheduler_host: str | None = None
    scheduler_address: str | None = None
    dashboard_link: str | None = None
    processes: list[ProcessInfo] = Field(default_factory=list)
    folders: dict[str, FolderRecord] = Field(default_factory=dict)
    tunnels: list[TunnelRecord] = Field(default_factory=list)
    #: "from -> to" -> "open" or why not, as the preflight probe measured them (auto mode)
    network_paths: dict[str, str] = Field(default_factory=dict)
    network_reasons: list[str] = Field(default_factory=list)  # why tunnelled was chosen
    failure: str | None = None  # why a running cluster failed (None while healthy)
    #: Set by the Prefect layer: the blocks holding the secrets and the host group, by name,
    #: and the flow runs whose crash or cancellation hooks tear the cluster down.
    ssh_block: str | None = None
    host_group: str | None = None
    flow_run_ids: list[str] = Field(default_factory=list)

    @property
    def workers(self) -> list[ProcessInfo]:
        return [p for p in self.processes if p.role == "worker"]

    def core(self) -> dict[str, Any]:
        """As plain JSON-able data (what the Prefect layer persists and artifacts show)."""
        return self.model_dump(mode="json")

    def replace(self, **changes: Any) -> ClusterRecord:
        """A copy with some fields changed (validated)."""
        return ClusterRecord.model_validate({**self.model_dump(), **changes})


def teardown(
    record: ClusterRecord | Mapping[str, Any],
    connection_kwargs: Mapping[str, Any] | None = None,
    grace: float = 0.5,
) -> dict[str, str]:
    """Stop a cluster from its record alone — from another process, after the controller died.

    Every ``*.pid`` file in the cluster's folders is honoured (workers added after the record was
    written included), the folders are removed, and temporary working dirs with them. Idempotent.
    ``connection_kwargs`` adds secrets (password, key) the record does not hold. Returns a line
    per host; hosts that cannot be reached are reported in a GroupError.
    """
    if not isinstance(record, ClusterRecord):
        record = ClusterRecord.model_validate(record)
    specs = {spec.name: spec for spec in record.hosts}

    def stop(item: tuple[str, FolderRecord]) -> str:
        key, folder = item
        spec = specs.get(key, HostSpec(name=key))
        if key == CONTROLLER_KEY or spec.name in ("localhost", "127.0.0.1"):
            runtime = Runtime("localhost")
        else:
            kwargs = {**spec.connection_kwargs, **dict(connection_kwargs or {})}
            runtime = Runtime(spec.name, None, kwargs, spec.ssh_config_path)
        revoke = None
        if not runtime.is_local:
            python = folder.python or spec.python_executable or "python3"
            revoke = processes.Revoke(python, link_commands.peer_marker(record.cluster_id))
        try:
            remove = folder.working_dir if folder.temporary else folder.folder
            left = processes.stop_folder(runtime, folder.folder, grace, remove, revoke)
            if left:
                raise LazyclusterError(f"{runtime.host}: process groups survived SIGKILL: {left}")
            return f"{key}: stopped"
        finally:
            runtime.cleanup()

    folders = dict(record.folders)
    known = {f.folder.rstrip("/") for f in folders.values()}
    for info in record.processes:  # a host whose cleanup failed may keep its processes only
        where = posixpath.dirname(info.pid_file)
        if where not in known and info.host not in folders:
            folders[info.host] = FolderRecord(folder=where, working_dir=where)
            known.add(where)
    return run_parallel(
        f"teardown of cluster {record.cluster_id}",
        {key: (key, folder) for key, folder in folders.items()},
        stop,
    )
