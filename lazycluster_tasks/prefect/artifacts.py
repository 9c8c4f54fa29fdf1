"""Prefect artifacts for a cluster record: a hosts table, a markdown summary, worker progress.

Records are plain dicts (``DaskCluster.record()``). Call the ``publish_*`` functions and create
:class:`WorkerProgress` inside a flow or task run so the artifacts attach to it. They always run
synchronously (``_sync=True``), also inside async flows, where Prefect would otherwise hand back
an un-awaited coroutine.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import re
import socket
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from lazycluster_tasks.environments import HostEnvironment

__all__ = [
    "EnvironmentProgress",
    "WorkerProgress",
    "artifact_key",
    "cluster_markdown",
    "environment_table",
    "flush",
    "hosts_table",
    "later",
    "publish_cluster_markdown",
    "publish_environment_table",
    "publish_hosts_table",
]

logger = logging.getLogger(__name__)

SECRET_KEYS = frozenset({"password", "passphrase", "private_key"})


def artifact_key(*parts: str) -> str:
    """Join ``parts`` with dashes, lowercase, and turn anything but ``[a-z0-9-]`` into ``-``."""
    return re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())


def hosts_table(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per process: host, role, name, pid, ports (comma-joined) and the cluster state
    (a stopped cluster's record keeps the processes it had, so its last table is not empty)."""
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
        f"- **state:** {state_text(record)}",
        f"- **scheduler:** `{record.get('scheduler_address') or 'none'}` on "
        f"{_cell(record.get('scheduler_host') or socket.gethostname() + ' (the flow run)')}",
        f"- **hosts:** {', '.join(_cell(h.get('name')) for h in record.get('hosts') or [])}",
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


def state_text(record: Mapping[str, Any]) -> str:
    """The state as a reader wants it: "running with 4 workers", "failed: <why>", …"""
    state = str(record.get("state"))
    workers = [p for p in record.get("processes") or [] if p.get("role") == "worker"]
    if state == "running":
        return f"running with {len(workers)} worker{'s' if len(workers) != 1 else ''}"
    if record.get("failure"):
        return f"{state}: {_cell(record['failure'])}"
    return state


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
    """Create a markdown artifact of :func:`cluster_markdown` in this run and, when this run is
    a task's or a subflow's, a copy on the root flow run itself (its page's "Flow run" artifacts:
    what the user opens first)."""
    description = f"Dask cluster {record.get('cluster_id')}: {state_text(record)}"
    text = cluster_markdown(record)
    result = create_markdown_artifact(  # type: ignore[call-arg]
        text, key=_key(key), description=description, _sync=True
    )
    _copy_to_root(text, description)
    return cast(UUID, result)


def _copy_to_root(text: str, description: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.runtime import flow_run, task_run

    try:
        root, current = flow_run.root_flow_run_id, flow_run.id
        if not root or (root == current and not task_run.id):
            return  # not in a run, or already an artifact of the root flow run itself
        with get_client(sync_client=True) as client:
            client.create_artifact(
                ArtifactCreate(
                    type="markdown", data=text, description=description, flow_run_id=UUID(root)
                )
            )
    except Exception as exc:  # the run's own artifact exists; the copy is a convenience
        logger.warning("cluster summary not copied to the root flow run: %s", exc)


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
        """Set progress to ``100 * registered / total`` (100 when ``total`` is 0); sent in the
        background (:func:`flush` waits for it), so the registration wait never blocks on it."""
        progress = 100.0 if total <= 0 else min(100.0, max(0.0, 100.0 * registered / total))
        with self._lock:
            self.total = total
            if progress == self.progress:
                return
            self.progress = progress
            description = f"{registered}/{total} workers registered"
            # queued under the lock: the API sees the values in the order they were set
            _sender.send(lambda: self._context.run(self._send, progress, description))

    def _send(self, progress: float, description: str) -> None:
        update_progress_artifact(  # type: ignore[call-arg]
            self.artifact_id, progress, description=description, _sync=True
        )


def environment_table(envs: Sequence[HostEnvironment], key: str) -> list[dict[str, Any]]:
    """One row per host: what its processes run with and what its environment ``key`` cost."""
    rows = []
    for env in sorted(envs, key=lambda e: e.host):
        state = "made" if env.sent else "found"
        if env.shared:
            state = "this machine's (shared files)"
        rows.append(
            {
                "host": env.host,
                "environment": "" if env.shared else key,
                "state": state,
                "MiB sent": round(env.sent / 2**20, 1),
                "seconds": round(env.seconds, 2),
                "python": env.python,
            }
        )
    return rows


def publish_environment_table(
    envs: Sequence[HostEnvironment], env_key: str, key: str | None = None
) -> UUID:
    """Create a table artifact of :func:`environment_table`."""
    sent = sum(e.sent for e in envs) / 2**20
    description = f"Environment {env_key} on {len(envs)} hosts: {sent:.1f} MiB sent"
    result = create_table_artifact(  # type: ignore[call-arg]
        environment_table(envs, env_key), key=_key(key), description=description, _sync=True
    )
    return cast(UUID, result)


class EnvironmentProgress:
    """A progress artifact of hosts whose environment is ready; its ``update`` is the
    cluster's ``on_environment`` hook. Made in the caller's run at the first update (a start
    that needs no environment makes none); API errors are logged, never raised."""

    def __init__(self) -> None:
        self._context = contextvars.copy_context()
        self._lock = threading.Lock()
        self.artifact_id: UUID | None = None

    def update(self, ready: Sequence[HostEnvironment], total: int) -> None:
        progress = 100.0 if total <= 0 else 100.0 * len(ready) / total
        sent = sum(e.sent for e in ready) / 2**20
        description = f"environment ready on {len(ready)}/{total} hosts ({sent:.1f} MiB sent)"
        with self._lock:
            if self.artifact_id is None:
                try:
                    made = self._context.run(self._create, progress, description)
                    self.artifact_id = cast(UUID, made)
                except Exception as exc:
                    logger.warning("environment progress artifact not created: %s", exc)
                return
            artifact = self.artifact_id
            _sender.send(lambda: self._context.run(self._update, artifact, progress, description))

    @staticmethod
    def _create(progress: float, description: str) -> Any:
        return create_progress_artifact(  # type: ignore[call-arg]
            progress, description=description, _sync=True
        )

    @staticmethod
    def _update(artifact: UUID, progress: float, description: str) -> None:
        update_progress_artifact(  # type: ignore[call-arg]
            artifact, progress, description=description, _sync=True
        )


class _Sender:
    """Artifacts off the critical path: one short-lived thread sends them in order, each in a
    copy of its caller's context (so it attaches to the caller's run); ``flush`` waits."""

    def __init__(self) -> None:
        self._queue: deque[tuple[contextvars.Context, Callable[[], Any]]] = deque()
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None

    def send(self, fn: Callable[[], Any]) -> None:
        with self._lock:
            self._queue.append((contextvars.copy_context(), fn))
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lct-artifacts", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._thread = None
                    self._idle.set()
                    return
                context, fn = self._queue.popleft()
            try:
                context.run(fn)
            except Exception as exc:  # an artifact is a report: never fail the cluster for it
                logger.warning("artifact not published: %s", exc)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything sent is published (False: the timeout passed first)."""
        return self._idle.wait(timeout)


_sender = _Sender()


def later(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Publish in the background, in order (e.g. ``later(publish_hosts_table, record)``)."""
    _sender.send(functools.partial(fn, *args, **kwargs))


def flush(timeout: float = 30.0) -> bool:
    """Wait for the artifacts sent with :func:`later` (call before the run ends)."""
    return _sender.flush(timeout)


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
