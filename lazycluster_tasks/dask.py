"""DaskCluster: lazycluster's Dask cluster API, a thin layer over the :class:`Engine`.

``DaskCluster(group).start()`` puts the scheduler on this machine and workers on the hosts. Its
launchers are strategies that decide where (scheduler host and ports, worker placement); the
engine starts, watches and stops the processes — the same engine ``LazySSHCluster`` drives.
"""

from __future__ import annotations

import logging
from typing import Any

from lazycluster_tasks import dask_launchers
from lazycluster_tasks.checks import check_count
from lazycluster_tasks.cluster import MasterLauncher, MasterWorkerCluster, WorkerLauncher
from lazycluster_tasks.dask_launchers import LocalMasterLauncher, RoundRobinLauncher
from lazycluster_tasks.dask_options import DaskOptions
from lazycluster_tasks.engine import Engine
from lazycluster_tasks.group import RuntimeGroup
from lazycluster_tasks.network import NetworkMode, NetworkPlan
from lazycluster_tasks.record import CONTROLLER_KEY, ClusterRecord, ClusterState, teardown
from lazycluster_tasks.routing import Routing
from lazycluster_tasks.runtime import Runtime
from lazycluster_tasks.startup import first_error

__all__ = ["CONTROLLER_KEY", "DaskCluster", "DaskOptions", "first_error", "teardown"]

logger = logging.getLogger(__name__)


class DaskCluster(MasterWorkerCluster):
    """A Dask cluster on the hosts of a RuntimeGroup (lazycluster's DaskCluster, grown up).

    ``DaskCluster(group).start()`` puts the scheduler on this machine and one worker per host;
    ``engine`` runs the processes.

    Parameters
    ----------
    runtime_group
        The hosts.
    ports
        The ports the cluster's processes may use (default: lazycluster's range).
    master_launcher, worker_launcher
        How the scheduler and the workers start (default: the scheduler here, the workers
        round-robin over the hosts); lazycluster's launcher classes.
    options
        A :class:`DaskOptions`: network mode, workers per host, threads, memory, resources,
        env, TLS, extra command-line options, ...
    **option_values
        The same as keywords, instead of ``options``.
    """

    DEFAULT_MASTER_PORT = 8786
    MASTER_START_TIMEOUT = 30

    def __init__(
        self,
        runtime_group: RuntimeGroup,
        ports: list[int] | None = None,
        master_launcher: MasterLauncher | None = None,
        worker_launcher: WorkerLauncher | None = None,
        *,
        options: DaskOptions | None = None,
        **option_values: Any,
    ) -> None:
        if options is not None and option_values:
            raise ValueError("give either options= or option keywords, not both")
        options = options or DaskOptions.of(option_values)
        options.check()
        super().__init__(runtime_group, ports, master_launcher, worker_launcher)
        self.engine = Engine(runtime_group, options, self._ports)
        dask_launchers.attach(self._master_launcher, self.engine)
        dask_launchers.attach(self._worker_launcher, self.engine)

    # The cluster's port list is the engine's pool (the seed's code assigns it).
    @property
    def _ports(self) -> list[int]:
        engine = self.__dict__.get("engine")
        return engine.ports if engine is not None else self.__dict__["_initial_ports"]

    @_ports.setter
    def _ports(self, value: list[int]) -> None:
        engine = self.__dict__.get("engine")
        if engine is not None:
            engine.ports = list(value)
        else:
            self.__dict__["_initial_ports"] = list(value)

    def default_master_launcher(self) -> MasterLauncher:
        return LocalMasterLauncher(self._group)

    def default_worker_launcher(self) -> WorkerLauncher:
        return RoundRobinLauncher(self._group)

    def __repr__(self) -> str:
        return f"DaskCluster({self.cluster_id}, hosts={self._group.hosts}, state={self.state})"

    # -- lifecycle ------------------------------------------------------------------------

    def start(
        self, worker_count: int | None = None, master_port: int | None = None, debug: bool = False
    ) -> None:
        """Start the scheduler and ``worker_count`` workers (default: runtimes x workers_per_host);
        returns once the scheduler has registered every worker and every path carries data."""
        if worker_count is None:
            worker_count = sum(self.engine.slots(h) for h in self._group.hosts)
        check_count("worker_count", worker_count)
        engine = self.engine
        engine.state, self._cleaned = ClusterState.starting, False
        master, workers = self._master_launcher, self._worker_launcher
        try:
            with engine.links_after():
                if isinstance(master, LocalMasterLauncher) and isinstance(
                    workers, RoundRobinLauncher
                ):  # both strategies are ours: workers boot while the scheduler does
                    candidates = self._master_ports(master_port)
                    self._ports = [
                        p for p in self._ports if p not in (self.DEFAULT_MASTER_PORT, master_port)
                    ]
                    used = engine.start(
                        workers.place(worker_count),
                        scheduler_on=master.runtime(),
                        scheduler_ports=candidates,
                        timeout=self.MASTER_START_TIMEOUT,
                        debug=debug,
                        checked=bool(worker_count),
                    )
                    master.adopt()
                    workers.add_ports(used)
                else:  # the seed's way: the master, then the workers, each by its launcher
                    super().start(worker_count, master_port, debug)
                if worker_count:
                    engine.verify_paths()
        except BaseException:
            self.cleanup()
            raise
        engine.state = ClusterState.running

    def scale(self, n: int) -> None:
        """Grow or shrink to ``n`` running workers; removed workers are retired (their data
        moved) and their processes stopped. Workers that died are cleared away first."""
        check_count("n", n)
        engine = self.engine
        registered = engine.registered()
        ours = engine.worker_names()
        engine.stop([w for w in ours if w not in registered])
        running = [w for w in ours if w in registered]
        if n > len(running):
            engine._refresh_ports()
            self.start_workers(n - len(running))
            engine.verify_paths()
        elif n < len(running):
            remove = running[n:]
            addresses = [registered[w]["address"] for w in remove]
            engine.clients.monitor().retire_workers(workers=addresses, close_workers=True)
            engine.stop(remove)

    def sync_code(self) -> dict[str, list[str]]:
        """Ship the user's changed code and have the running workers read it (see
        ``Engine.sync_code``). Returns worker address -> the modules it will read again."""
        return self.engine.sync_code()

    def cleanup(self) -> None:
        """Stop everything this cluster started, on every host at once; verify nothing is left.
        A host that failed keeps its processes on record: cleanup() or teardown(record) again."""
        if self._cleaned:
            return
        error: BaseException | None = None
        try:
            # a running cluster: its scheduler closes itself while the hosts KILL the workers
            self.engine.stop_all(close_scheduler=self.engine.state is ClusterState.running)
            super().cleanup()  # the launchers (ours have nothing left) and the group
        except Exception as exc:
            self._cleaned, error = False, exc
        self.engine.release(error)

    # -- what the engine knows ------------------------------------------------------------

    @property
    def cluster_id(self) -> str:
        return self.engine.cluster_id

    @property
    def options(self) -> DaskOptions:
        return self.engine.options

    @property
    def controller(self) -> Runtime:
        return self.engine.controller

    @property
    def state(self) -> ClusterState:
        """See :class:`~lazycluster_tasks.record.ClusterState` (``failed``: the scheduler of a
        running cluster is gone; see ``failure``)."""
        return self.engine.state

    @property
    def failure(self) -> str | None:
        return self.engine.failure

    @property
    def plan(self) -> NetworkPlan:
        return self.engine.plan

    @property
    def routing(self) -> Routing:
        return self.engine.routing

    @property
    def network_mode(self) -> NetworkMode:
        return self.engine.network_mode

    def ensure_plan(self, ports: list[int]) -> NetworkPlan:
        return self.engine.ensure_plan(ports)

    @property
    def scheduler_address(self) -> str | None:
        return self.engine.scheduler_address

    @property
    def workers(self) -> dict[str, dict[str, Any]]:
        return self.engine.workers

    @property
    def dashboard_link(self) -> str | None:
        return self.engine.dashboard_link

    def verify_paths(self, timeout: float | None = None) -> None:
        self.engine.verify_paths(timeout)

    def get_client(self, timeout: int = 2) -> Any:
        """A new ``distributed.Client`` connected to the scheduler (closed by cleanup)."""
        if self.scheduler_address is None:
            raise ValueError("the cluster is not running")
        return self.engine.clients.new(timeout)

    def get_logs(self) -> dict[str, str]:
        return self.engine.get_logs()

    def stop_master(self) -> None:
        self.engine.stop_scheduler()

    def record(self) -> ClusterRecord:
        return self.engine.record()
