"""Prefect artifacts for a cluster record: a hosts table, a markdown summary, worker progress.

Records are plain dicts (``DaskCluster.record()``). Call the ``publish_*`` functions and create
:class:`WorkerProgress` inside a flow or task run so the artifacts attach to it. They always run
synchronously (``_sync=True``), also inside async flows, where Prefect would otherwise hand back
an un-awaited coroutine.
"""

from __future__ import annotations

import contextvars
import logging
import re
import threading
from collections.abc import Mapping
from typing import Any, cast
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

__all__ = [
    "WorkerProgress",
    "artifact_key",
    "cluster_markdown",
    "hosts_table",
    "publish_cluster_markdown",
    "publish_hosts_table",
]

logger = logging.getLogger(__name__)

SECRET_KEYS = frozenset({"password", "passphrase", "private_key"})


def artifact_key(*parts: str) -> str:
    """Join ``parts`` with dashes, lowercase, and turn anything but ``[a-z0-9-]`` into ``-``."""
    return re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())


def hosts_table(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per process: host, role, name, pid, ports (comma-joined) and the cluster state."""
    record = _scrub(record)
    return [
        {
            "host": proc.get("host"),
            "role": proc.get("role"),
            "name": proc.get("name"),
            "pid": proc.get("pid"),
            "ports": ",".join(str(port) for port in proc.get("ports") or []),
            "state": record.get("state"),
        }
        for proc in record.get("processes") or []
    ]


def publish_hosts_table(record: Mapping[str, Any], key: str | None = None) -> UUID:
    """Create a table artifact of :func:`hosts_table`; ``key`` is made valid by artifact_key."""
    description = (
        f"Processes of Dask cluster {record.get('cluster_id')} "
        f"(network mode: {record.get('network_mode')})"
    )
    result = create_table_artifact(  # type: ignore[call-arg]
        hosts_table(record), key=_key(key), description=description, _sync=True
    )
    return cast(UUID, result)


def cluster_markdown(record: Mapping[str, Any]) -> str:
    """Markdown summary: id, network mode, state, scheduler, dashboard link and tunnels."""
    record = _scrub(record)
    dashboard = record.get("dashboard_link")
    lines = [
        f"### Dask cluster `{record.get('cluster_id')}`",
        "",
        f"- **network mode:** {record.get('network_mode')}{_mode_reason(record)}",
        f"- **state:** {record.get('state')}",
        f"- **scheduler:** `{record.get('scheduler_address') or 'none'}`",
        f"- **dashboard:** {f'[{dashboard}]({dashboard})' if dashboard else 'no dashboard'}",
        "",
        "#### Tunnels",
        "",
    ]
    tunnels = record.get("tunnels") or []
    if not tunnels:
        lines.append("no tunnels")
    else:
        lines += ["| host | kind | local port | remote port |", "|---|---|---|---|"]
        for t in tunnels:
            cells = (t.get("host"), t.get("kind"), t.get("local_port"), t.get("remote_port"))
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _mode_reason(record: Mapping[str, Any]) -> str:
    """Why the mode was chosen, from the measured paths (auto mode)."""
    paths = record.get("network_paths") or {}
    reasons = record.get("network_reasons") or []
    if reasons:
        return " — " + "; ".join(_cell(r) for r in reasons[:6]) + (" …" if len(reasons) > 6 else "")
    if paths:
        return f" — all {len(paths)} measured paths open"
    return ""


def publish_cluster_markdown(record: Mapping[str, Any], key: str | None = None) -> UUID:
    """Create a markdown artifact of :func:`cluster_markdown`."""
    description = f"Dask cluster {record.get('cluster_id')}"
    result = create_markdown_artifact(  # type: ignore[call-arg]
        cluster_markdown(record), key=_key(key), description=description, _sync=True
    )
    return cast(UUID, result)


class WorkerProgress:
    """A progress artifact of registered workers, safe to update from any thread.

    The artifact is created at 0 in ``__init__``, in the caller's flow or task run so it
    attaches to that run; ``update`` may then be called from another thread (the cluster's wait
    loop). Updates only reach the API when the value changes; API errors are logged, not raised,
    so progress reporting never breaks a cluster start.
    """

    def __init__(self, total: int, key: str | None = None) -> None:
        self.total = total
        self.progress = 0.0
        self._lock = threading.Lock()
        # Updates run in a copy of the creator's context: same Prefect settings in any thread.
        self._context = contextvars.copy_context()
        result = create_progress_artifact(  # type: ignore[call-arg]
            0.0, key=_key(key), description="workers registered", _sync=True
        )
        self.artifact_id = cast(UUID, result)

    def update(self, registered: int, total: int) -> None:
        """Set progress to ``100 * registered / total`` (100 when ``total`` is 0)."""
        progress = 100.0 if total <= 0 else min(100.0, max(0.0, 100.0 * registered / total))
        with self._lock:
            self.total = total
            if progress == self.progress:
                return
            try:
                self._context.run(self._send, progress, f"{registered}/{total} workers registered")
                self.progress = progress
            except Exception as exc:
                logger.warning("worker progress artifact not updated: %s", exc)

    def _send(self, progress: float, description: str) -> None:
        update_progress_artifact(  # type: ignore[call-arg]
            self.artifact_id, progress, description=description, _sync=True
        )


def _key(key: str | None) -> str | None:
    return artifact_key(key) if key else None


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def _scrub(value: Any) -> Any:
    """A copy of ``value`` without secret keys in any mapping, however deeply nested."""
    if isinstance(value, Mapping):
        return {k: _scrub(v) for k, v in value.items() if k not in SECRET_KEYS}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value
