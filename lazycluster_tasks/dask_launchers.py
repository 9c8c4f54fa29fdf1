"""Launch strategies for Dask: where the scheduler runs, how workers are spread.

* :class:`LocalMasterLauncher` — scheduler on this machine (lazycluster's default).
* :class:`RemoteMasterLauncher` — scheduler on a chosen runtime.
* :class:`RoundRobinLauncher` — worker ``i`` on runtime ``i mod n``, all hosts started at once.

They do the launching; the :class:`~lazycluster_tasks.dask.DaskCluster` they belong to
keeps the shared state (network plan, processes, tunnels, client). The command lines are built
by the pure functions at the top of this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lazycluster_tasks.cluster import MasterLauncher, WorkerLauncher
from lazycluster_tasks.errors import NoPortsLeftError, PortInUseError
from lazycluster_tasks.group import RuntimeGroup
from lazycluster_tasks.ports import as_port_list

if TYPE_CHECKING:
    from lazycluster_tasks.dask import DaskCluster, DaskOptions
    from lazycluster_tasks.processes import ProcessInfo
    from lazycluster_tasks.runtime import Runtime

SCHEDULER_MODULE = "distributed.cli.dask_scheduler"
WORKER_MODULE = "distributed.cli.dask_worker"
#: Seconds the scheduler lives on after its last client left (read by WATCH_PRELOAD).
CLIENT_TIMEOUT_ENV = "LAZYCLUSTER_CLIENT_TIMEOUT"

#: Scheduler preload (given as text): close the scheduler once no client has been connected for
#: $LAZYCLUSTER_CLIENT_TIMEOUT seconds — the controller holds one for the cluster's lifetime, so
#: a controller that died takes its scheduler with it; workers follow by their death timeout.
#: Until the controller's first client arrives the wait is at least
#: $LAZYCLUSTER_FIRST_CLIENT_GRACE seconds (30): a loaded controller may take longer than a short
#: idle timeout to connect, and a scheduler that closed before then failed the whole start.
WATCH_PRELOAD = """
import asyncio, os, time

def dask_setup(scheduler):
    limit = float(os.environ.get("LAZYCLUSTER_CLIENT_TIMEOUT", "60"))
    first = max(limit, float(os.environ.get("LAZYCLUSTER_FIRST_CLIENT_GRACE", "30")))

    async def watch():
        last, seen = time.monotonic(), False
        while scheduler.status.name not in ("closing", "closed"):
            await asyncio.sleep(0.5)
            if any(c != "fire-and-forget" for c in scheduler.clients):
                last, seen = time.monotonic(), True
            elif time.monotonic() - last > (limit if seen else first):
                await scheduler.close(reason="lazycluster: no client connected")
                return

    scheduler._lazycluster_watch = asyncio.ensure_future(watch())
"""


def scheduler_argv(
    python: str, address: str, port: int, folder: str, options: DaskOptions
) -> list[str]:
    """``dask scheduler`` bound to ``address:port``, dashboard pinned to 127.0.0.1."""
    argv = [
        python,
        "-m",
        SCHEDULER_MODULE,
        "--host",
        address,
        "--port",
        str(port),
        "--dashboard-address",
        "127.0.0.1:0",
        "--scheduler-file",  # written once the scheduler listens: our readiness signal
        f"{folder}/scheduler.json",
        "--preload",
        WATCH_PRELOAD,
    ]
    if not options.dashboard:
        argv.append("--no-dashboard")
    return argv + list(options.scheduler_options)


def worker_argv(
    python: str,
    scheduler_address: str,
    name: str,
    folder: str,
    options: DaskOptions,
    *,
    address: str,
    port: int,
    nanny_port: int | None,
    loopback: bool,
    resources: Mapping[str, float] | None = None,
) -> list[str]:
    """``dask worker`` with explicit addresses: the host's own address (direct) or 127.0.0.1 with
    the same port on every node (``loopback``: tunnelled)."""
    argv = [python, "-m", WORKER_MODULE, scheduler_address, "--name", name]
    if loopback:
        contact = f"tcp://127.0.0.1:{port}"
        argv += ["--listen-address", contact, "--contact-address", contact]
    else:
        argv += ["--host", address, "--worker-port", str(port)]
    if options.nanny:
        argv += ["--nanny", "--nanny-port", str(nanny_port)]
    else:
        argv.append("--no-nanny")
    argv += [
        "--no-dashboard",
        "--death-timeout",
        str(options.death_timeout),
        "--local-directory",
        f"{folder}/{name}",
    ]
    if options.threads_per_worker:
        argv += ["--nthreads", str(options.threads_per_worker)]
    if options.memory_limit is not None:
        argv += ["--memory-limit", str(options.memory_limit)]
    if resources:
        argv += ["--resources", " ".join(f"{k}={v}" for k, v in resources.items())]
    return argv + list(options.worker_options)


class _DaskLauncher:
    """Mixin: the cluster a Dask launcher belongs to (set by DaskCluster)."""

    _cluster: DaskCluster | None = None

    def _dask(self) -> DaskCluster:
        if self._cluster is None:
            raise ValueError(f"{type(self).__name__} must be used through a DaskCluster")
        return self._cluster


def _port_order(ports: list[int] | int, used: set[int], where: str) -> tuple[bool, list[int]]:
    single = isinstance(ports, int)
    candidates = as_port_list(ports)
    if single and candidates[0] in used:
        raise PortInUseError(candidates[0], where)
    order = [p for p in candidates if p not in used]
    if not order:
        raise NoPortsLeftError(f"none of the given ports is free {where}: {candidates}")
    return single, order


class LocalMasterLauncher(_DaskLauncher, MasterLauncher):
    """The scheduler runs on this machine; remote workers reach it directly or by -R forwards."""

    #: Where the scheduler runs: None is this machine.
    host: str | None = None

    def start(self, ports: list[int] | int, timeout: int = 3, debug: bool = False) -> list[int]:
        return self._start_on(self.host, ports, timeout, debug)

    def launch(self, ports: list[int] | int, debug: bool) -> tuple[Runtime, ProcessInfo, list[int]]:
        """Start the scheduler on the first free port without waiting for it (the cluster
        awaits it); returns its runtime, its process and the ports left."""
        cluster = self._dask()
        candidates = as_port_list(ports)
        runtime, single, order = self._choose(ports, candidates)
        info = cluster.launch_scheduler(runtime, order[0], debug)
        return runtime, info, [] if single else [p for p in candidates if p != order[0]]

    def _choose(
        self, ports: list[int] | int, candidates: list[int]
    ) -> tuple[Runtime, bool, list[int]]:
        cluster = self._dask()
        cluster.ensure_plan(candidates)
        host = self.host
        runtime = cluster.controller if host is None else cluster.runtime_group.get_runtime(host)
        hosts = cluster.port_scope(runtime)
        used = cluster.taken_ports(hosts, include_local=cluster.routing.needs_local_port(runtime))
        where = "here" if host is None else f"on {host}"
        single, order = _port_order(ports, used, f"{where} (and on the hosts it must reach)")
        return runtime, single, order

    def _start_on(
        self, host: str | None, ports: list[int] | int, timeout: float, debug: bool
    ) -> list[int]:
        cluster = self._dask()
        candidates = as_port_list(ports)
        runtime, single, order = self._choose(ports, candidates)
        for port in order:
            info = cluster.start_scheduler(runtime, port, timeout, debug)
            if info is not None:
                self._port, self._process = port, info
                break
            if single:
                raise PortInUseError(port, runtime.host)
        else:
            raise NoPortsLeftError(f"every free-looking port was taken when binding: {order}")
        return [] if single else [p for p in candidates if p != self._port]

    def cleanup(self) -> None:
        if self._cluster is not None:
            self._cluster.stop_master()


class RemoteMasterLauncher(LocalMasterLauncher):
    """The scheduler runs on one runtime of the group (``host``, default: the first)."""

    def __init__(self, runtime_group: RuntimeGroup, host: str | None = None) -> None:
        super().__init__(runtime_group)
        self.host = host or runtime_group.hosts[0]
        runtime_group.get_runtime(self.host)  # ValueError if not in the group


class RoundRobinLauncher(_DaskLauncher, WorkerLauncher):
    """Worker ``i`` goes to runtime ``i mod n``; every host's workers start in one call, and
    all hosts at once."""

    def start(
        self, worker_count: int, master_port: int, ports: list[int], debug: bool = False
    ) -> list[int]:
        cluster = self._dask()
        used = cluster.start_workers_round_robin(worker_count, list(ports), debug)
        self.add_ports(used)
        taken = {p for host_ports in used.values() for p in host_ports}
        return [p for p in ports if p not in taken]

    def add_ports(self, used: dict[str, list[int]]) -> None:
        for host, host_ports in used.items():
            self._ports_per_host.setdefault(host, []).extend(host_ports)

    def setup_worker_ssh_tunnels(self) -> None:
        """Done by the cluster as workers start (tunnelled mode); kept for API compatibility."""
        self._dask().route_worker_ports()

    def cleanup(self) -> None:
        if self._cluster is not None:
            self._cluster.stop_workers()


def attach(launcher: Any, cluster: DaskCluster) -> None:
    if isinstance(launcher, _DaskLauncher):
        launcher._cluster = cluster
