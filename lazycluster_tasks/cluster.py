"""The seed's cluster API: launcher strategies and the master/worker cluster.

Names, signatures, return values and raise conditions follow lazycluster's ``runtime_cluster``
module, so code written for it (including custom launcher subclasses) runs here. What is new:
``with cluster:`` cleans up, ``cleanup()`` is idempotent and safe after a failed start, and a
failed ``start()`` cleans up what it had started before it re-raises.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from abc import ABC, abstractmethod
from typing import Any

from lazycluster_tasks.checks import check_count
from lazycluster_tasks.group import RuntimeGroup
from lazycluster_tasks.ports import as_port_list
from lazycluster_tasks.settings import settings

logger = logging.getLogger(__name__)


class MasterLauncher(ABC):
    """Strategy for launching the master instance of a cluster."""

    def __init__(self, runtime_group: RuntimeGroup) -> None:
        self._group = runtime_group
        self._port: int | None = None
        self._process: Any = None

    @property
    def port(self) -> int | None:
        """The port the master listens on; None before it started."""
        return self._port

    @property
    def process(self) -> Any:
        """The process the master runs in; None before it started."""
        return self._process

    @abstractmethod
    def start(self, ports: list[int] | int, timeout: int = 3, debug: bool = False) -> list[int]:
        """Launch the master.

        ``ports``: a port, or a list to take the first free one from. Returns the updated list
        (the used port removed), or ``[]`` when a single port was given. Raises
        ``PortInUseError`` (single port taken), ``NoPortsLeftError`` (none of the list free),
        ``MasterStartError`` (not up after ``timeout`` seconds).
        """

    def cleanup(self) -> None:  # noqa: B027 - a hook; launchers without resources keep it
        """Release all resources."""


class WorkerLauncher(ABC):
    """Strategy for launching worker instances in a RuntimeGroup."""

    def __init__(self, runtime_group: RuntimeGroup) -> None:
        self._group = runtime_group
        self._ports_per_host: dict[str, list[int]] = {}

    @property
    def ports_per_host(self) -> dict[str, list[int]]:
        """Host -> ports where a worker is reachable on that host."""
        return self._ports_per_host

    @abstractmethod
    def start(
        self, worker_count: int, master_port: int, ports: list[int], debug: bool = False
    ) -> list[int]:
        """Launch ``worker_count`` workers; return ``ports`` without the ones used.

        Implementations must fill ``self._ports_per_host``. Raises ``NoPortsLeftError`` when
        there are not enough free ports.
        """

    def setup_worker_ssh_tunnels(self) -> None:
        """Route worker traffic through this machine so every entity reaches every worker on
        ``127.0.0.1:<worker port>`` (needed where workers talk to each other, e.g. Dask)."""
        for host, ports in self._ports_per_host.items():
            for port in ports:
                self._group.expose_port_from_runtime_to_group(host, port, port)

    def cleanup(self) -> None:  # noqa: B027 - a hook; launchers without resources keep it
        """Release all resources."""


class RuntimeCluster(ABC):
    """Base of every cluster implementation."""

    @abstractmethod
    def cleanup(self) -> None:
        """Release all resources."""


class MasterWorkerCluster(RuntimeCluster):
    """A cluster with one master and many workers, launched by pluggable strategies.

    Meant to be subclassed (see :class:`~lazycluster_tasks.dask.DaskCluster`);
    ``default_master_launcher``/``default_worker_launcher`` give a subclass's defaults.
    """

    DEFAULT_MASTER_PORT = 60000
    DEFAULT_PORT_RANGE_START = 60001
    DEFAULT_PORT_RANGE_END = 60200
    #: Seconds ``start()`` gives the master (``start_master`` keeps the seed's default of 3).
    MASTER_START_TIMEOUT = 3

    def __init__(
        self,
        runtime_group: RuntimeGroup,
        ports: list[int] | None = None,
        master_launcher: MasterLauncher | None = None,
        worker_launcher: WorkerLauncher | None = None,
    ) -> None:
        if not isinstance(runtime_group, RuntimeGroup):
            raise ValueError(f"runtime_group must be a RuntimeGroup, got {runtime_group!r}")
        if runtime_group.runtime_count == 0:
            raise ValueError("the runtime group is empty")
        self._group = runtime_group
        self._ports = (
            as_port_list(ports)
            if ports is not None
            else settings().port_list(
                range(self.DEFAULT_PORT_RANGE_START, self.DEFAULT_PORT_RANGE_END)
            )
        )
        master = master_launcher or self.default_master_launcher()
        workers = worker_launcher or self.default_worker_launcher()
        if master is None or workers is None:
            raise ValueError(f"{type(self).__name__} needs a master_launcher and a worker_launcher")
        self._master_launcher = master
        self._worker_launcher = workers
        self._cleaned = False
        _live_clusters.add(self)

    def default_master_launcher(self) -> MasterLauncher | None:
        return None

    def default_worker_launcher(self) -> WorkerLauncher | None:
        return None

    @property
    def master_port(self) -> int | None:
        return self._master_launcher.port

    @property
    def runtime_group(self) -> RuntimeGroup:
        return self._group

    @property
    def ports(self) -> list[int]:
        """Ports still available to this cluster."""
        return list(self._ports)

    def start(
        self, worker_count: int | None = None, master_port: int | None = None, debug: bool = False
    ) -> None:
        """Start the master, then the workers; on failure clean up and re-raise."""
        try:
            self.start_master(master_port, timeout=self.MASTER_START_TIMEOUT, debug=debug)
            self.start_workers(worker_count, debug)
        except BaseException:
            self.cleanup()
            raise

    def start_master(
        self, master_port: int | None = None, timeout: int = 3, debug: bool = False
    ) -> None:
        """Start the master on ``master_port`` or, by default, on ``DEFAULT_MASTER_PORT`` or the
        next free port of the cluster's list."""
        self._cleaned = False
        ports = self._master_ports(master_port)
        remaining = self._master_launcher.start(ports, timeout, debug)
        if master_port is not None:
            remaining = [p for p in self._ports if p != master_port]
        self._ports = [p for p in remaining if p != self.DEFAULT_MASTER_PORT]

    def _master_ports(self, master_port: int | None) -> list[int] | int:
        """The given master port, or DEFAULT_MASTER_PORT followed by the cluster's list."""
        if master_port is not None:
            return master_port
        return [
            self.DEFAULT_MASTER_PORT,
            *(p for p in self._ports if p != self.DEFAULT_MASTER_PORT),
        ]

    def start_workers(self, count: int | None = None, debug: bool = False) -> None:
        """Start ``count`` workers (default: one per runtime)."""
        if self.master_port is None:
            raise ValueError("start the master before the workers")
        count = self._group.runtime_count if count is None else count
        check_count("worker count", count)
        self._ports = self._worker_launcher.start(count, self.master_port, self._ports, debug)

    def print_log(self) -> None:
        self._group.print_log()

    def cleanup(self) -> None:
        """Stop workers, then the master, then release the group. Safe to call twice."""
        if self._cleaned:
            return
        errors = []
        for part in (
            self._worker_launcher.cleanup,
            self._master_launcher.cleanup,
            self._group.cleanup,
        ):
            try:
                part()
            except Exception as exc:  # go on: the other layers still need cleaning
                logger.error("cleanup step %s failed: %s", part.__qualname__, exc)
                errors.append(exc)
        self._cleaned = True
        if errors:
            raise errors[0]

    def __enter__(self) -> MasterWorkerCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


_live_clusters: weakref.WeakSet[MasterWorkerCluster] = weakref.WeakSet()


@atexit.register
def _cleanup_at_exit() -> None:
    """Last line of defence, as in lazycluster: clusters never cleaned up are cleaned at exit."""
    for cluster in list(_live_clusters):
        if not cluster._cleaned and cluster.master_port is not None:
            try:
                cluster.cleanup()
            except Exception as exc:
                logger.error("cleanup at exit failed: %s", exc)
