"""A cluster another process owns, used from this one: ``LazySSHCluster.from_name(id)``.

``Client(cluster)``, ``DaskTaskRunner(address=cluster.scheduler_address,
client_kwargs={"security": cluster.security})``, ``scheduler_info``, ``get_logs()`` and the
notebook widget talk to the scheduler directly, with the client certificate the owner left in
the state folder (see :mod:`~lazycluster_tasks.control`). ``scale``, ``adapt`` and — with
``shutdown_on_close`` — ``close`` are asked of the owner, which does them as for its own
cluster (placement, capacity, healing, the cleanup that leaves nothing behind); an adaptive
policy set here keeps running there after this process ends.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Generator
from typing import Any

from distributed.core import Status, rpc
from distributed.deploy.cluster import Cluster

from lazycluster_tasks import control
from lazycluster_tasks.errors import LazyclusterError

#: Seconds the owner gets to close the cluster (its processes on every host) when asked.
CLOSE_TIMEOUT = 120.0


class ClusterNotFoundError(LazyclusterError, LookupError):
    """No running cluster of that id on this machine (for this user)."""


def find(cluster_id: str) -> control.Entry:
    """The running cluster ``cluster_id`` (its owner alive); a clear error otherwise."""
    if not isinstance(cluster_id, str) or not cluster_id.strip():
        raise ValueError(f"a cluster id is a non-empty string, not {cluster_id!r}")
    known = control.entries()
    entry = known.get(cluster_id.strip())
    if entry is None:
        names = ", ".join(sorted(known)) or "none"
        raise ClusterNotFoundError(
            f"no running cluster {cluster_id!r} started by this user on this machine "
            f"(running: {names}; state folder {control.state_folder()})"
        )
    return entry


class AttachedCluster(Cluster):
    """A running cluster, attached by id (see the module)."""

    def __init__(
        self,
        cluster_id: str,
        *,
        shutdown_on_close: bool = False,
        asynchronous: bool = False,
        loop: Any = None,
    ) -> None:
        self.entry = find(cluster_id)
        self.cluster_id = self.entry.cluster_id
        self.shutdown_on_close = shutdown_on_close
        info = self.entry.info
        self._address = str(info["scheduler_address"])
        self._dashboard = str(info.get("dashboard_link") or "")
        self.network_mode = str(info.get("network_mode") or "")
        self.security = _security(info.get("tls"))
        super().__init__(asynchronous=asynchronous, loop=loop, name=str(info.get("name") or ""))
        args = self.security.get_connection_args("client") if self.security else {}
        self.scheduler_comm = rpc(self._address, connection_args=args)
        self._loop_runner.start()
        if not asynchronous:
            try:
                self.sync(self._start)
            except BaseException:
                self.close()
                raise

    def __await__(self) -> Generator[Any, None, AttachedCluster]:
        async def started() -> AttachedCluster:
            if self.status == Status.created:
                await self._start()
            return self

        return started().__await__()

    @property
    def scheduler_address(self) -> str:
        return self._address

    @property
    def dashboard_link(self) -> str:
        return self._dashboard

    async def _sync_cluster_info(self) -> None:
        """The owner keeps the cluster's name and type on the scheduler; not this view."""

    def scale(self, n: int = 0, memory: Any = None, cores: Any = None) -> Any:
        """Ask the owner to grow or shrink to ``n`` workers (or what memory/cores need)."""
        return self._ask("scale", n=n, memory=memory, cores=cores)

    def adapt(  # type: ignore[override]
        self, minimum: float = 0, maximum: float = math.inf, **kwargs: Any
    ) -> Any:
        """Ask the owner to adapt between ``minimum`` and ``maximum`` workers (its capacity
        caps it); the policy runs there, also after this process has gone."""
        top = None if maximum == math.inf else maximum
        return self._ask("adapt", minimum=minimum, maximum=top, **kwargs)

    def _ask(self, op: str, **args: Any) -> Any:
        if self.asynchronous:
            return asyncio.to_thread(self.entry.request, op, **args)
        return self.entry.request(op, **args)

    async def _close(self) -> None:
        if self.status == Status.closed:
            return
        if self.shutdown_on_close:
            await asyncio.to_thread(self.entry.request, "close", timeout=CLOSE_TIMEOUT)
        await super()._close()

    def close(self, timeout: float | None = None) -> Any:
        result = super().close(timeout)
        if not self.asynchronous:
            self._loop_runner.stop()
        return result

    def __repr__(self) -> str:
        return (
            f"AttachedCluster({self.cluster_id!r}, {self._address}, "
            f"workers={len(self.scheduler_info.get('workers', {}))}, status={self.status.name})"
        )


def _security(tls: Any) -> Any:
    """``distributed.Security`` from the owner's client files (read now: the owner removes
    them when the cluster closes); None for a cluster without TLS."""
    if not tls:
        return None
    from distributed import Security

    contents = {}
    for name in ("ca", "cert", "key"):
        value = str(tls[name])
        try:
            with open(value) as handle:
                contents[name] = handle.read()
        except OSError as exc:
            raise ClusterNotFoundError(
                f"the cluster's client file {value} is not readable: {exc}"
            ) from None
    return Security(
        require_encryption=True,
        tls_ca_file=contents["ca"],
        tls_client_cert=contents["cert"],
        tls_client_key=contents["key"],
    )
