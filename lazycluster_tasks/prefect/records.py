"""ClusterRecord: a cluster as plain data, and where records are kept between processes.

Tasks take and return records, never live clients. The record is persisted in the Prefect API
(a block document per cluster, and a variable per flow run listing its clusters), so a crash or
cancellation hook running in another process, or the ``teardown_cluster`` flow, can find every
process of a cluster and stop it. Records hold no secrets: those stay in the SSH settings block
whose name the record keeps.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, TypeVar, cast

from prefect.blocks.core import Block
from prefect.variables import Variable
from pydantic import BaseModel, ConfigDict, Field

from lazycluster_tasks.dask import DaskCluster
from lazycluster_tasks.processes import ProcessInfo

logger = logging.getLogger(__name__)


class HostSpec(BaseModel):
    name: str
    ssh_config_path: str | None = None
    connection_kwargs: dict[str, Any] = Field(default_factory=dict)
    python_executable: str | None = None


class FolderRecord(BaseModel):
    folder: str
    working_dir: str
    temporary: bool = False


class TunnelRecord(BaseModel):
    host: str
    kind: str
    local_port: int
    remote_port: int


class ClusterRecord(BaseModel):
    """Everything known about a cluster: hosts, roles, ports, pids, pid files, tunnels, addresses,
    network mode and state."""

    model_config = ConfigDict(extra="ignore")

    cluster_id: str
    state: str
    network_mode: str
    hosts: list[HostSpec]
    scheduler_host: str | None = None
    scheduler_address: str | None = None
    dashboard_link: str | None = None
    processes: list[ProcessInfo] = Field(default_factory=list)  # the core's dataclass
    folders: dict[str, FolderRecord] = Field(default_factory=dict)
    tunnels: list[TunnelRecord] = Field(default_factory=list)
    #: "from -> to" -> "open" or why not, as the preflight probe measured them (auto mode)
    network_paths: dict[str, str] = Field(default_factory=dict)
    network_reasons: list[str] = Field(default_factory=list)  # why tunnelled was chosen
    ssh_block: str | None = None  # SSH settings block with the secrets, by name
    host_group: str | None = None  # host group block, by name
    flow_run_ids: list[str] = Field(default_factory=list)  # runs whose hooks tear it down

    @classmethod
    def of(cls, cluster: DaskCluster, **extra: Any) -> ClusterRecord:
        return cls.model_validate({**cluster.record(), **extra})

    def updated(self, cluster: DaskCluster) -> ClusterRecord:
        keep = {"ssh_block": self.ssh_block, "host_group": self.host_group}
        return ClusterRecord.of(cluster, **keep, flow_run_ids=self.flow_run_ids)

    def core(self) -> dict[str, Any]:
        """The plain dict the core's ``teardown`` takes."""
        return self.model_dump(mode="json")

    @property
    def workers(self) -> list[ProcessInfo]:
        return [p for p in self.processes if p.role == "worker"]


class ClusterRecordBlock(Block):
    """Storage of one cluster's record in the Prefect API (internal to lazycluster_tasks)."""

    _block_type_name = "Lazycluster Cluster Record"
    _block_type_slug = "lazycluster-cluster-record"
    _description = "The persisted record of a running lazycluster_tasks Dask cluster."

    record: dict[str, Any]


B = TypeVar("B", bound=Block)


def load_block(cls: type[B], name: str) -> B:
    """``cls.load(name)`` from sync code (Prefect's load is sync-or-async by context)."""
    block = cls.load(name)
    if inspect.isawaitable(block):
        raise RuntimeError(f"{cls.__name__}.load must be called from sync code here")
    return cast(B, block)


def _document_name(cluster_id: str) -> str:
    return f"cluster-{cluster_id}"


def _run_variable(flow_run_id: str) -> str:
    return f"lazycluster-run-{flow_run_id}".lower()


def save_record(record: ClusterRecord) -> None:
    """Persist the record and list it under each of its flow runs."""
    ClusterRecordBlock(record=record.core()).save(_document_name(record.cluster_id), overwrite=True)
    for run_id in record.flow_run_ids:
        ids = clusters_of_run(run_id)
        if record.cluster_id not in ids:
            Variable.set(_run_variable(run_id), [*ids, record.cluster_id], overwrite=True)


def load_record(cluster_id: str) -> ClusterRecord | None:
    try:
        block = load_block(ClusterRecordBlock, _document_name(cluster_id))
    except ValueError:  # no such document
        return None
    return ClusterRecord.model_validate(block.record)


def forget_record(record: ClusterRecord) -> None:
    """Remove a stopped cluster's record and its entries in the flow-run lists."""
    try:
        ClusterRecordBlock.delete(_document_name(record.cluster_id))
    except (ValueError, Exception) as exc:  # already gone
        logger.debug("record %s not deleted: %s", record.cluster_id, exc)
    for run_id in record.flow_run_ids:
        ids = [i for i in clusters_of_run(run_id) if i != record.cluster_id]
        if ids:
            Variable.set(_run_variable(run_id), ids, overwrite=True)
        else:
            Variable.unset(_run_variable(run_id))


def clusters_of_run(flow_run_id: str) -> list[str]:
    value = Variable.get(_run_variable(flow_run_id), default=None)
    return [str(v) for v in value] if isinstance(value, list) else []
