"""Where records are kept between processes: the core's ClusterRecord, persisted as it is.

Tasks take and return records (:class:`~lazycluster_tasks.record.ClusterRecord`), never live
clients. The record is persisted in the Prefect API
(a block document per cluster, and a variable per flow run listing its clusters), so a crash or
cancellation hook running in another process, or the ``teardown_cluster`` flow, can find every
process of a cluster and stop it. Records hold no secrets: those stay in the SSH settings block
whose name the record keeps.
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any, TypeVar, cast

from prefect.blocks.core import Block
from prefect.variables import Variable

from lazycluster_tasks.record import ClusterRecord

if TYPE_CHECKING:
    from lazycluster_tasks.engine import Engine

logger = logging.getLogger(__name__)


def record_of(cluster: Engine, **extra: Any) -> ClusterRecord:
    """The cluster's record with the Prefect layer's fields (blocks, flow runs) set."""
    return cluster.record().replace(**extra)


def updated(record: ClusterRecord, cluster: Engine) -> ClusterRecord:
    """A fresh record of the cluster, keeping the Prefect layer's fields of ``record``."""
    keep = ("ssh_block", "host_group", "flow_run_ids")
    return record_of(cluster, **{key: getattr(record, key) for key in keep})


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
