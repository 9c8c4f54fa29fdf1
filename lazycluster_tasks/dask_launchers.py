"""Launch strategies for Dask: where the scheduler runs, how workers are spread.

* :class:`LocalMasterLauncher` — scheduler on this machine (lazycluster's default).
* :class:`RemoteMasterLauncher` — scheduler on a chosen runtime.
* :class:`RoundRobinLauncher` — worker ``i`` on runtime ``i mod n``, all hosts started at once.

They decide *where*; the :class:`~lazycluster_tasks.engine.Engine` of the cluster they belong to
starts and stops the processes (its one start path). The command lines are built in
:mod:`lazycluster_tasks.commands`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lazycluster_tasks.cluster import MasterLauncher, WorkerLauncher
from lazycluster_tasks.dask_argv import (  # noqa: F401 - importable from here as before
    CLIENT_TIMEOUT_ENV,
    SCHEDULER_MODULE,
    WATCH_PRELOAD,
    WORKER_MODULE,
    scheduler_argv,
    worker_argv,
)
from lazycluster_tasks.group import RuntimeGroup
from lazycluster_tasks.ports import as_port_list

if TYPE_CHECKING:
    from lazycluster_tasks.engine import Engine
    from lazycluster_tasks.runtime import Runtime


class _DaskLauncher:
    """Mixin: the engine a Dask launcher drives (set by DaskCluster)."""

    _engine: Engine | None = None

    def _dask(self) -> Engine:
        if self._engine is None:
            raise ValueError(f"{type(self).__name__} must be used through a DaskCluster")
        return self._engine


#: Seconds a scheduler is always given to come up (more when the caller's timeout is longer).
MIN_MASTER_WAIT = 20.0


class LocalMasterLauncher(_DaskLauncher, MasterLauncher):
    """The scheduler runs on this machine; remote workers reach it directly or by -R forwards."""

    #: Where the scheduler runs: None is this machine.
    host: str | None = None

    def runtime(self) -> Runtime:
        """The runtime the scheduler runs on."""
        engine = self._dask()
        return engine.controller if self.host is None else engine.runtime(self.host)

    def start(self, ports: list[int] | int, timeout: int = 3, debug: bool = False) -> list[int]:
        """Start the scheduler on the first free port of ``ports``; returns the others.

        ``timeout`` (lazycluster's, 3 s by default) is a floor of :data:`MIN_MASTER_WAIT`: a
        scheduler that loads its dashboard takes 2-3 s on an idle machine, more on a busy one."""
        engine = self._dask()
        wait = max(float(timeout), MIN_MASTER_WAIT)
        engine.start(
            {}, scheduler_on=self.runtime(), scheduler_ports=ports, timeout=wait, debug=debug
        )
        self.adopt()
        if isinstance(ports, int):
            return []
        return [p for p in as_port_list(ports) if p != self._port]

    def adopt(self) -> None:
        """Take the port and process of the scheduler the engine started."""
        engine = self._dask()
        self._port, self._process = engine.scheduler_port, engine.scheduler_process

    def cleanup(self) -> None:
        if self._engine is not None:
            self._engine.stop_scheduler()


class RemoteMasterLauncher(LocalMasterLauncher):
    """The scheduler runs on one runtime of the group (``host``, default: the first)."""

    def __init__(self, runtime_group: RuntimeGroup, host: str | None = None) -> None:
        super().__init__(runtime_group)
        self.host = host or runtime_group.hosts[0]
        runtime_group.get_runtime(self.host)  # ValueError if not in the group


class RoundRobinLauncher(_DaskLauncher, WorkerLauncher):
    """Worker ``i`` goes to runtime ``i mod n``; every host's workers start in one call, and
    all hosts at once."""

    _next = 0  # index of the next worker (names are "<host>-<index>")

    def place(self, count: int) -> dict[str, list[str]]:
        """Round robin over the hosts with room (workers_per_host, GPUs; once all are full,
        over every host): host -> names of its next ``count`` workers."""
        engine = self._dask()
        hosts = [rt.host for rt in self._group.runtimes]
        room = {h: engine.slots(h) for h in hosts}
        for info in engine.worker_processes():
            room[info.host] = room.get(info.host, 0) - 1
        placement: dict[str, list[str]] = {}
        first, self._next = self._next, self._next + count
        turn = first
        for index in range(first, first + count):
            open_hosts = [h for h in hosts if room[h] > 0] or hosts
            host = min(open_hosts, key=lambda h: (hosts.index(h) - turn) % len(hosts))
            turn = hosts.index(host) + 1
            room[host] -= 1
            placement.setdefault(host, []).append(f"{host}-{index}")
        return placement

    def start(
        self, worker_count: int, master_port: int, ports: list[int], debug: bool = False
    ) -> list[int]:
        """Start ``worker_count`` workers and wait until they registered; returns the ports
        left."""
        if worker_count == 0:
            return list(ports)
        used = self._dask().start(self.place(worker_count), ports=list(ports), debug=debug)
        self.add_ports(used)
        taken = {p for host_ports in used.values() for p in host_ports}
        return [p for p in ports if p not in taken]

    def add_ports(self, used: dict[str, list[int]]) -> None:
        for host, host_ports in used.items():
            self._ports_per_host.setdefault(host, []).extend(host_ports)

    def setup_worker_ssh_tunnels(self) -> None:
        """Done by the engine as workers start (tunnelled mode); kept for API compatibility."""
        self._dask().route_workers()

    def cleanup(self) -> None:
        if self._engine is not None:
            self._engine.stop_workers()


def attach(launcher: Any, engine: Engine) -> None:
    if isinstance(launcher, _DaskLauncher):
        launcher._engine = engine
