"""Prefect events of a cluster's life: ``lazycluster.cluster.<what>``.

``started``, ``worker-lost``, ``worker-replaced``, ``stopped`` and ``teardown-failed``; the
resource is the cluster (``lazycluster.cluster.<id>``), the related resources its hosts and the
flow runs it belongs to. Automations match on them (see ``deployments/automation.py``). Sending
is best effort: an event that cannot be sent is logged, never raised into the cluster's work.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from prefect.events import emit_event

from lazycluster_tasks.record import ClusterRecord

logger = logging.getLogger(__name__)

EVENTS = ("started", "worker-lost", "worker-replaced", "stopped", "teardown-failed")


def resource(cluster_id: str) -> dict[str, str]:
    return {
        "prefect.resource.id": f"lazycluster.cluster.{cluster_id}",
        "prefect.resource.name": f"Dask cluster {cluster_id}",
    }


def related(record: ClusterRecord) -> list[dict[str, str]]:
    hosts = [
        {
            "prefect.resource.id": f"lazycluster.host.{h.name}",
            "prefect.resource.role": "host",
            "prefect.resource.name": h.name,
        }
        for h in record.hosts
    ]
    runs = [
        {"prefect.resource.id": f"prefect.flow-run.{run}", "prefect.resource.role": "flow-run"}
        for run in record.flow_run_ids
    ]
    return hosts + runs


def emit(what: str, record: ClusterRecord, payload: Mapping[str, Any] | None = None) -> None:
    """Send ``lazycluster.cluster.<what>`` about ``record``'s cluster."""
    if what not in EVENTS:
        raise ValueError(f"unknown cluster event {what!r}; one of {EVENTS}")
    body = {"network_mode": record.network_mode, "state": record.state, **dict(payload or {})}
    try:
        emit_event(
            event=f"lazycluster.cluster.{what}",
            resource=resource(record.cluster_id),
            related=related(record),
            payload=body,
        )
    except Exception as exc:
        logger.warning("event lazycluster.cluster.%s not sent: %s", what, exc)
