"""DaskCluster: a dask.distributed scheduler and workers on a RuntimeGroup, nothing left after.

Lifecycle: a preflight probe per host (python, distributed, ports, reachability) fixes the network
plan; the scheduler starts (here or on a runtime) and is waited for on its port; workers start on
all hosts at once, routed through SSH forwards in tunnelled mode; ``start()`` returns when the
scheduler has registered every worker. ``cleanup()`` closes clients, stops every process group on
every host at once (TERM, grace, KILL, verified), closes tunnels and removes the cluster folders.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import re
import shlex
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lazycluster_tasks import dask_launchers, processes
from lazycluster_tasks.cluster import MasterLauncher, MasterWorkerCluster, WorkerLauncher
from lazycluster_tasks.connection import tail
from lazycluster_tasks.dask_launchers import (
    CLIENT_TIMEOUT_ENV,
    LocalMasterLauncher,
    RoundRobinLauncher,
    scheduler_argv,
    worker_argv,
)
from lazycluster_tasks.errors import (
    GroupError,
    LazyclusterError,
    MasterStartError,
    NetworkPathError,
    NoPortsLeftError,
    WorkerStartError,
)
from lazycluster_tasks.group import RuntimeGroup, fan_out, run_parallel
from lazycluster_tasks.network import NETWORK_MODES, NetworkPlan, plan_network
from lazycluster_tasks.ports import free_ports
from lazycluster_tasks.processes import ProcessInfo, ProcessSpec
from lazycluster_tasks.record import (
    CONTROLLER_KEY,
    ClusterRecord,
    FolderRecord,
    HostSpec,
    TunnelRecord,
    teardown,  # noqa: F401 - it was always importable from here
)
from lazycluster_tasks.routing import DirectRouting, make_routing
from lazycluster_tasks.runtime import Runtime, check_path
from lazycluster_tasks.task import RuntimeTask

logger = logging.getLogger(__name__)

ADDRESS_IN_USE = ("Address already in use", "[Errno 98]")
#: A worker whose first connection to the scheduler dropped while it registered (seen through
#: busy SSH forwards): started again, like one that lost its port at bind time.
DROPPED_AT_START = ("StreamClosedError", "Connection reset by peer")
MISSING_DISTRIBUTED = "No module named 'distributed'"
LIVENESS_INTERVAL = 2.0
PORT_RETRIES = 3
#: Upper bound (s) of the end-to-end readiness check once every worker registered.
PATH_CHECK_TIMEOUT = 30.0
#: Seconds a question to the scheduler may take before it counts as unanswered.
IDENTITY_TIMEOUT = 5.0


@dataclass
class DaskOptions:
    """How the scheduler and workers are run (all optional)."""

    network_mode: str = "auto"  # "auto", "direct" or "tunnelled"
    workers_per_host: int = 1  # default worker count = runtimes x this
    threads_per_worker: int | None = None  # None: Dask's default (the host's cores)
    memory_limit: str | int | None = None  # None: Dask's default ("auto")
    #: Worker resources, e.g. {"GPU": 1}, or a function of the runtime (per host).
    resources: Mapping[str, float] | Callable[[Runtime], Mapping[str, float]] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    scheduler_options: Sequence[str] = ()
    worker_options: Sequence[str] = ()
    death_timeout: float = 60.0  # a worker without scheduler exits after this
    idle_timeout: float = 60.0  # the scheduler exits this long after its last client left
    nanny: bool = True
    #: Interpreter on the hosts: one path for all, or host -> path (default: the runtime's).
    python_executable: str | Mapping[str, str] | None = None
    dashboard: bool = True
    #: Ports of this machine (e.g. a Prefect API) to expose as 127.0.0.1:<port> on every host.
    forward_ports: Sequence[int] = ()
    start_timeout: float = 120.0  # for all workers to register
    stop_grace: float = 0.3  # seconds between TERM and KILL


class DaskCluster(MasterWorkerCluster):
    """A Dask cluster on the hosts of a RuntimeGroup (lazycluster's DaskCluster, grown up).

    ``DaskCluster(group).start()`` puts the scheduler on this machine and one worker per host;
    keyword options (see :class:`DaskOptions`) pick the network mode, workers per host, threads,
    memory, resources, env and extra CLI options.
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
        self.options = options or DaskOptions(**option_values)
        if options is not None and option_values:
            raise ValueError("give either options= or option keywords, not both")
        _check_options(self.options)
        self.cluster_id = uuid.uuid4().hex[:12]
        self.controller = Runtime("localhost")
        self._plan: NetworkPlan | None = None
        self._reserved: dict[str, set[int]] = {}
        self._processes: dict[str, ProcessInfo] = {}
        self._owners: dict[str, Runtime] = {}
        self._routes: DirectRouting | None = None
        self._next_worker = 0  # index of the next worker (names are "<host>-<index>")
        self._begun: tuple[Runtime, ProcessInfo, list[int], int | None] | None = None
        #: Called with (registered, requested) as workers register (e.g. a progress artifact).
        self.on_progress: Callable[[int, int], None] | None = None
        #: Called once the scheduler answers (e.g. to let a Dask cluster object connect).
        self.on_scheduler_up: Callable[[], None] | None = None
        self._client: Any = None
        self._user_clients: list[Any] = []
        self._scheduler_host: str | None = None  # None: this machine
        self._scheduler_bind: str | None = None
        self._scheduler_port: int | None = None
        self._dashboard_port: int | None = None
        self._lock = threading.RLock()
        self._client_lock = threading.Lock()
        self._monitor_thread: threading.Thread | None = None
        self._state = "created"
        #: Why a running cluster failed (None while it is healthy).
        self.failure: str | None = None
        super().__init__(runtime_group, ports, master_launcher, worker_launcher)
        dask_launchers.attach(self._master_launcher, self)
        dask_launchers.attach(self._worker_launcher, self)

    def default_master_launcher(self) -> MasterLauncher:
        return LocalMasterLauncher(self._group)

    def default_worker_launcher(self) -> WorkerLauncher:
        return RoundRobinLauncher(self._group)

    def __repr__(self) -> str:
        return f"DaskCluster({self.cluster_id}, hosts={self._group.hosts}, state={self.state})"

    # -- lifecycle (seed API) ------------------------------------------------------------

    def start(
        self, worker_count: int | None = None, master_port: int | None = None, debug: bool = False
    ) -> None:
        """Start the scheduler and ``worker_count`` workers (default: runtimes x workers_per_host);
        returns once the scheduler has registered every worker."""
        if worker_count is None:
            worker_count = self._group.runtime_count * self.options.workers_per_host
        _check_count("worker_count", worker_count)
        self.state = "starting"
        try:
            if worker_count and self.begin(master_port, debug):
                self.complete(worker_count, debug)
            else:
                super().start(worker_count, master_port, debug)
            if worker_count:
                self.verify_paths()
        except BaseException:
            self.cleanup()
            raise
        self.state = "running"

    def begin(self, master_port: int | None = None, debug: bool = False) -> bool:
        """First half of an overlapped start: launch the scheduler without waiting for it.

        Only with this package's own launchers (True); others return False and start the seed's
        way, ``start_master`` then ``start_workers``. Follow with :meth:`complete`.
        """
        master = self._master_launcher
        if not isinstance(master, LocalMasterLauncher):
            return False
        if type(self._worker_launcher) is not RoundRobinLauncher:
            return False
        self.state, self._cleaned = "starting", False
        runtime, info, remaining = master.launch(self._master_ports(master_port), debug)
        if master_port is not None:  # a single port leaves the cluster's list as it was
            remaining = [p for p in self._ports if p != master_port]
        remaining = [p for p in remaining if p != self.DEFAULT_MASTER_PORT]
        self._begun = (runtime, info, remaining, master_port)
        return True

    @property
    def begun(self) -> bool:
        """True between :meth:`begin` and :meth:`complete`."""
        return self._begun is not None

    def complete(self, count: int, debug: bool = False) -> None:
        """Second half: start ``count`` workers while the scheduler boots (workers retry until
        it answers), await the scheduler, then the workers. A scheduler that lost its port at
        bind time makes it stop what it started and start one after the other instead."""
        self.complete_named(self._place(count), debug)

    def complete_named(self, placement: dict[str, list[str]], debug: bool = False) -> None:
        """:meth:`complete` with the workers named: host -> names of its workers."""
        if self._begun is None:
            raise ValueError("call begin() first")
        runtime, info, remaining, master_port = self._begun
        self._begun = None
        master, workers = self._master_launcher, self._worker_launcher
        assert isinstance(master, LocalMasterLauncher) and isinstance(workers, RoundRobinLauncher)
        used: dict[str, list[int]] = {}
        started = self._launch(self._worker_specs(placement, remaining, used), debug)
        if not self.await_scheduler(runtime, info, self.MASTER_START_TIMEOUT, debug):
            self._stop_processes(list(started))
            self.start_master(master_port, self.MASTER_START_TIMEOUT, debug)
            self._ports = self._finish_named(placement, self._ports, debug)
            return
        master._port, master._process = self._scheduler_port, info
        self._finish_workers(started, remaining, used, debug)
        workers.add_ports(used)
        taken = {p for host_ports in used.values() for p in host_ports}
        self._ports = [p for p in remaining if p not in taken]

    def verify_paths(self, timeout: float | None = None) -> None:
        """End-to-end readiness: a tiny task pinned to every worker with its result fetched here
        through the scheduler, and a ring of tasks that makes each worker fetch the previous
        one's result (worker -> worker, across hosts). Raises NetworkPathError naming every
        path that failed within ``timeout`` (default: min(start_timeout, 30 s))."""
        from distributed import as_completed

        timeout = (
            min(self.options.start_timeout, PATH_CHECK_TIMEOUT) if timeout is None else timeout
        )
        client = self._monitor()
        registered = self._registered()  # bounded, unlike the client's own scheduler_info
        ours = [(n, registered[n]["address"]) for n in self._worker_names() if n in registered]
        if not ours:
            return
        started = time.monotonic()
        first = {
            name: client.submit(
                socket.gethostname, workers=[address], allow_other_workers=False, pure=False
            )
            for name, address in ours
        }
        ring = {}
        if len(ours) > 1:
            for i, (name, _) in enumerate(ours):
                target, address = ours[(i + 1) % len(ours)]
                ring[(name, target)] = client.submit(
                    len, first[name], workers=[address], allow_other_workers=False, pure=False
                )
        futures = [*first.values(), *ring.values()]
        try:
            with contextlib.suppress(TimeoutError):
                for _ in as_completed(futures, timeout=timeout, loop=client.loop):
                    pass
            addresses = dict(ours)
            here = "this machine" if self._scheduler_host is None else self._scheduler_host
            failed: dict[str, str] = {}
            for name, future in first.items():
                where = f"{name} on {self._processes[name].host} ({addresses[name]})"
                if future.status != "finished":
                    failed[where] = f"ran no task within {timeout:.0f} s ({future.status})"
                    continue
                left = max(1.0, timeout - (time.monotonic() - started))
                try:
                    future.result(timeout=left)
                except Exception as exc:
                    failed[f"scheduler on {here} -> {where}"] = (
                        f"its result could not be fetched ({type(exc).__name__})"
                    )
            for (source, target), future in ring.items():
                if future.status != "finished" and first[source].status == "finished":
                    failed[
                        f"{target} on {self._processes[target].host} -> {source} on "
                        f"{self._processes[source].host} ({addresses[source]})"
                    ] = f"data not fetched within {timeout:.0f} s"
        finally:
            client.cancel(futures, force=True)
        logger.info(
            "end-to-end check: %d workers reached from here and from each other in %.2f s",
            len(ours),
            time.monotonic() - started,
        )
        if failed:
            lines = "\n".join(f"  {path}: {why}" for path, why in failed.items())
            hint = self.routing.hint
            raise NetworkPathError(
                f"the workers registered, but {len(failed)} path(s) the cluster needs are "
                f"blocked ({self.network_mode} mode):\n{lines}\n{hint}",
                failed,
            )

    def cleanup(self) -> None:
        """Stop everything this cluster started, on every host at once; verify nothing is left."""
        if self._cleaned:
            return
        if self._state == "cleanup failed":  # a retry: reach the hosts again
            for runtime in self._group.runtimes:
                runtime.reopen()
        self.state = "stopping"
        self._close_clients()
        error: BaseException | None = None
        try:
            self._stop_processes(list(self._processes), remove_folders=True)
        except Exception as exc:  # hosts that failed keep their processes on record
            error = exc
        try:
            if error is None:
                super().cleanup()  # the launchers (nothing left to stop), then every connection
            else:  # the launchers would only try the failed hosts again: release, retry later
                self._group.cleanup()
        except Exception as exc:
            error = error or exc
        finally:
            self.controller.cleanup()
        if error is not None:
            self._cleaned = False  # a later cleanup() or teardown(record) tries again
            self.state = "cleanup failed"
            left = sorted({i.host for i in self._processes.values()})
            logger.error("cleanup incomplete: processes kept on record on %s", ", ".join(left))
            raise error
        self.state = "stopped"

    # -- plan and ports (used by the launchers) ------------------------------------------

    def ensure_plan(self, ports: list[int]) -> NetworkPlan:
        with self._lock:
            if self._plan is None:
                mode = self.options.network_mode
                self._plan = plan_network(self._group, mode, ports, self._python)
                self._routes = make_routing(self._plan, self._group, self.controller)
            return self._plan

    @property
    def routing(self) -> DirectRouting:
        """How traffic is routed (direct or tunnelled), once the plan is made."""
        if self._routes is None:
            raise ValueError("the cluster has not been started")
        return self._routes

    @property
    def plan(self) -> NetworkPlan:
        if self._plan is None:
            raise ValueError("the cluster has not been started")
        return self._plan

    @property
    def network_mode(self) -> str:
        """The resolved mode ("direct" or "tunnelled"), or the requested one before start."""
        return self._plan.mode if self._plan else self.options.network_mode

    def port_scope(self, runtime: Runtime) -> list[str]:
        """Hosts whose ports must be free for a port bound on ``runtime``."""
        return self.routing.port_scope(runtime)

    def taken_ports(self, hosts: Sequence[str], include_local: bool) -> set[int]:
        used = self.plan.taken(hosts, include_local)
        for host in [*hosts, *([""] if include_local else [])]:
            used |= self._reserved.get(host, set())
        return used

    def _reserve(self, hosts: Sequence[str], include_local: bool, ports: Sequence[int]) -> None:
        for host in [*hosts, *([""] if include_local else [])]:
            self._reserved.setdefault(host, set()).update(ports)

    def folder(self, runtime: Runtime) -> str:
        return posixpath.join(runtime.working_dir, f"lazycluster-{self.cluster_id}")

    def _python(self, runtime: Runtime) -> str:
        choice = self.options.python_executable
        if isinstance(choice, str):
            return choice
        if isinstance(choice, Mapping) and runtime.host in choice:
            return choice[runtime.host]
        return runtime.python_executable

    # -- scheduler ------------------------------------------------------------------------

    def start_scheduler(
        self, runtime: Runtime, port: int, timeout: float, debug: bool
    ) -> ProcessInfo | None:
        """Start the scheduler on ``runtime`` and wait until it is up; None when the port was
        taken at bind time (the caller moves on to the next port)."""
        info = self.launch_scheduler(runtime, port, debug)
        return info if self.await_scheduler(runtime, info, timeout, debug) else None

    def launch_scheduler(self, runtime: Runtime, port: int, debug: bool) -> ProcessInfo:
        """Start the scheduler process, not waiting for it (see ``await_scheduler``)."""
        bind = self.routing.bind_address(runtime)
        folder = self.folder(runtime)
        spec = ProcessSpec(
            "scheduler",
            scheduler_argv(self._python(runtime), bind, port, folder, self.options),
            role="master",
            env={CLIENT_TIMEOUT_ENV: str(self.options.idle_timeout), **self.options.env},
            ports=[port],
        )
        (info,) = processes.start_processes(runtime, folder, [spec])
        self._register(runtime, info)
        self._scheduler_host = None if runtime is self.controller else runtime.host
        self._scheduler_bind, self._scheduler_port = bind, port
        self._reserve(self.port_scope(runtime), self.routing.needs_local_port(runtime), [port])
        self._follow_logs(runtime, [info], debug)
        return info

    def await_scheduler(
        self, runtime: Runtime, info: ProcessInfo, timeout: float, debug: bool
    ) -> bool:
        """Wait until the scheduler wrote its file and its port answers. False when it lost its
        port at bind time; MasterStartError when it exited otherwise or was not up in time."""
        folder = self.folder(runtime)
        bind, port = self._scheduler_bind or "", self._scheduler_port or 0
        state, waited = processes.wait_ready(
            runtime,
            self._python(runtime),
            f"{folder}/scheduler.json",
            bind,
            port,
            info.pid,
            timeout,
        )
        if state != "up":
            log = processes.read_logs(runtime, [info], lines=None).get("scheduler", "")
            self._stop_processes(["scheduler"])
            self._scheduler_port = self._scheduler_bind = None
            if state == "dead" and any(text in log for text in ADDRESS_IN_USE):
                logger.info("port %s on %s was taken at bind time; trying the next", port, runtime)
                return False
            reason = "exited" if state == "dead" else f"was not up within {timeout} s"
            raise MasterStartError(
                f"the Dask scheduler on {runtime.host} {reason}:\n{tail(log)}",
                host=runtime.host,
                output=tail(log),
            )
        logger.info(
            "scheduler up on %s port %s after %.2f s (pid %s)", runtime, port, waited, info.pid
        )
        self.routing.route_scheduler(runtime, port)  # only now: it listens
        self._log_output([info], debug)
        self._connect_monitor()
        if self.on_scheduler_up is not None:
            self.on_scheduler_up()
        return True

    @property
    def scheduler_address(self) -> str | None:
        """The scheduler's address as seen from this machine (and from every host: tunnelled
        mode puts it on 127.0.0.1 everywhere, direct mode uses the address it is bound to)."""
        if self._scheduler_port is None or self._scheduler_bind is None:
            return None
        host = self.routing.contact_host(self._scheduler_bind)
        return f"tcp://{host}:{self._scheduler_port}"

    def _scheduler_address_for(self, runtime: Runtime) -> str:
        """The scheduler's address as seen from ``runtime``."""
        address = self.scheduler_address
        if address is None:
            raise ValueError("the scheduler is not running")
        return address

    def stop_master(self) -> None:
        if "scheduler" in self._processes:
            self._stop_processes(["scheduler"])
        self._scheduler_port = self._scheduler_bind = None

    # -- workers --------------------------------------------------------------------------

    def start_workers_round_robin(
        self, count: int, ports: list[int], debug: bool
    ) -> dict[str, list[int]]:
        """Start ``count`` more workers and wait until they registered; returns host -> the
        worker ports taken from ``ports``."""
        if count == 0:
            return {}
        if self.scheduler_address is None:
            raise ValueError("start the scheduler first")
        self.ensure_plan(ports)
        used: dict[str, list[int]] = {}
        started = self._launch(self._worker_specs(self._place(count), ports, used), debug)
        self._finish_workers(started, ports, used, debug)
        return used

    def _finish_named(
        self, placement: dict[str, list[str]], ports: list[int], debug: bool
    ) -> list[int]:
        """Start the named workers and wait for them; returns ``ports`` without those taken."""
        used: dict[str, list[int]] = {}
        started = self._launch(self._worker_specs(placement, ports, used), debug)
        self._finish_workers(started, ports, used, debug)
        if isinstance(self._worker_launcher, RoundRobinLauncher):
            self._worker_launcher.add_ports(used)
        taken = {p for host_ports in used.values() for p in host_ports}
        return [p for p in ports if p not in taken]

    def start_named_workers(
        self, placement: dict[str, list[str]], debug: bool = False
    ) -> dict[str, str]:
        """Start these workers (host -> names) and wait until they registered, all hosts at
        once. Partial failure is data: returns name -> why, for each worker that did not come
        up (its processes stopped); the others run."""
        if self.scheduler_address is None:
            raise ValueError("start the scheduler first")
        scope = {h for host in placement for h in self.port_scope(self._group.get_runtime(host))}
        self._refresh_ports(sorted(scope))  # only where the new ports must be free
        try:
            self._ports = self._finish_named(placement, self._ports, debug)
            return {}
        except (WorkerStartError, GroupError, NoPortsLeftError) as exc:
            failure = exc
        registered = self._registered()
        names = [n for host_names in placement.values() for n in host_names]
        failed = [n for n in names if n not in registered]
        self._stop_processes([n for n in failed if n in self._processes])
        return {name: str(failure) for name in failed}

    def _place(self, count: int) -> dict[str, list[str]]:
        """Round robin: host -> names of its next workers ("<host>-<index>")."""
        runtimes = self._group.runtimes
        placement: dict[str, list[str]] = {}
        first, self._next_worker = self._next_worker, self._next_worker + count
        for index in range(first, first + count):
            runtime = runtimes[index % len(runtimes)]
            placement.setdefault(runtime.host, []).append(f"{runtime.host}-{index}")
        return placement

    def _finish_workers(
        self,
        started: dict[str, ProcessInfo],
        ports: list[int],
        used: dict[str, list[int]],
        debug: bool,
    ) -> None:
        """Wait for the started workers; restart those that lost their port at bind time."""
        for _ in range(PORT_RETRIES):
            # routed while they register: they dial out first
            with self.routing.while_registering(self._worker_infos):
                raced = self._wait_for_workers(started, self.options.start_timeout)
            if not raced:
                self._log_output(list(started.values()), debug)
                return
            pending: dict[str, list[str]] = {}
            for name in raced:
                pending.setdefault(self._processes[name].host, []).append(name)
                self._forget(name)
            started = self._launch(self._worker_specs(pending, ports, used), debug)
        raise WorkerStartError(f"workers kept losing their ports to other processes: {raced}")

    def _worker_specs(
        self, placement: dict[str, list[str]], ports: list[int], used: dict[str, list[int]]
    ) -> dict[str, list[ProcessSpec]]:
        routing = self.routing
        per_worker = 2 if self.options.nanny else 1
        specs: dict[str, list[ProcessSpec]] = {}
        for host, names in placement.items():
            runtime = self._group.get_runtime(host)
            scope = self.port_scope(runtime)
            include_local = routing.needs_local_port(runtime)
            taken = self.taken_ports(scope, include_local)
            chosen = free_ports(ports, taken, per_worker * len(names), f"for workers on {host}")
            self._reserve(scope, include_local, chosen)
            used.setdefault(host, []).extend(chosen[::per_worker])
            resources = self.options.resources
            if callable(resources):
                resources = resources(runtime)
            folder = self.folder(runtime)
            specs[host] = [
                ProcessSpec(
                    name,
                    worker_argv(
                        self._python(runtime),
                        self._scheduler_address_for(runtime),
                        name,
                        folder,
                        self.options,
                        address=routing.bind_address(runtime),
                        port=chosen[i * per_worker],
                        nanny_port=chosen[i * per_worker + 1] if self.options.nanny else None,
                        loopback=routing.loopback,
                        resources=resources,
                    ),
                    env=dict(self.options.env),
                    ports=chosen[i * per_worker : (i + 1) * per_worker],
                )
                for i, name in enumerate(names)
            ]
        return specs

    def _launch(self, specs: dict[str, list[ProcessSpec]], debug: bool) -> dict[str, ProcessInfo]:
        """Start the workers of every host at once, one command per host."""
        self.routing.forward_to_hosts(self.options.forward_ports)
        runtimes = [self._group.get_runtime(h) for h in specs]

        def start(runtime: Runtime) -> list[ProcessInfo]:
            infos = processes.start_processes(runtime, self.folder(runtime), specs[runtime.host])
            for info in infos:
                self._register(runtime, info)
            self._follow_logs(runtime, infos, debug)
            return infos

        started = fan_out("start workers", runtimes, start)
        return {info.name: info for infos in started.values() for info in infos}

    def route_worker_ports(self) -> None:
        """Tunnelled mode: make every started worker reachable from every node."""
        self.routing.route_workers(self._worker_infos())

    def _worker_infos(self) -> list[ProcessInfo]:
        with self._lock:
            return [i for i in self._processes.values() if i.role == "worker"]

    def _wait_for_workers(self, started: dict[str, ProcessInfo], timeout: float) -> list[str]:
        """Wait until the scheduler lists every started worker. Returns the workers that died
        because their port was taken at bind time; raises WorkerStartError for other failures."""
        deadline = time.monotonic() + timeout
        pending = dict(started)
        next_check = time.monotonic() + LIVENESS_INTERVAL
        known = -1
        while True:
            count = self._monitor().scheduler_info(n_workers=0)["n_workers"]  # cheap
            registered = self._registered() if count != known else {}
            known = count
            for name in [n for n in pending if n in registered]:
                pending.pop(name)
                logger.info("worker %s ready on %s", name, started[name].host)
                if self.on_progress is not None:
                    self.on_progress(len(started) - len(pending), len(started))
            now = time.monotonic()
            if not pending:
                return []
            if now >= next_check or now >= deadline:
                next_check = now + LIVENESS_INTERVAL
                dead = self._dead(list(pending.values()))
                if dead or now >= deadline:
                    return self._start_failure(pending, dead, timeout, late=now >= deadline)
            time.sleep(0.05)

    def _start_failure(
        self, pending: dict[str, ProcessInfo], dead: list[str], timeout: float, late: bool
    ) -> list[str]:
        """Workers that lost their port at bind time or their first scheduler connection are
        returned for a retry; anything else raises WorkerStartError naming each host with its
        first error and the tail of its log."""
        logs = self._logs(list(pending.values()), lines=None)
        raced = [n for n in dead if _retriable(logs.get(n, ""))]
        if raced and len(raced) == len(dead) and not late:
            for name in raced:
                logger.info(
                    "worker %s on %s exited at start (%s); starting it again",
                    name,
                    pending[name].host,
                    first_error(logs.get(name, "")),
                )
            return raced
        failed = dead or list(pending)
        why = "exited" if dead else f"did not register within {timeout} s"
        if any(MISSING_DISTRIBUTED in logs.get(n, "") for n in failed):
            why += " (dask.distributed is not importable by their Python there; nothing is "
            why += "installed for you)"
        details = {pending[n].host: _failure_text(n, logs.get(n, "")) for n in failed}
        if "scheduler" in self._processes:
            scheduler_log = self._logs([self._processes["scheduler"]]).get("scheduler", "")
            details["scheduler"] = tail(scheduler_log, 800)
        lines = "\n".join(f"--- {h}\n{text}" for h, text in details.items())
        names, hosts = ", ".join(failed), ", ".join(details)
        raise WorkerStartError(f"workers {names} {why} (hosts: {hosts}):\n{lines}", missing=details)

    def _by_runtime(self, infos: list[ProcessInfo]) -> dict[str, tuple[Runtime, list[ProcessInfo]]]:
        """Processes grouped by the runtime that owns them, keyed as in records."""
        jobs: dict[str, tuple[Runtime, list[ProcessInfo]]] = {}
        for info in infos:
            owner = self._owners.get(info.name)
            if owner is not None:
                jobs.setdefault(self._key(owner), (owner, []))[1].append(info)
        return jobs

    def _dead(self, infos: list[ProcessInfo]) -> list[str]:
        """Names of the processes that no longer run (all runtimes at once)."""
        states = run_parallel(
            "liveness", self._by_runtime(infos), lambda job: processes.alive(*job)
        )
        return [name for result in states.values() for name, up in result.items() if not up]

    def _logs(
        self, infos: list[ProcessInfo], lines: int | None = processes.LOG_TAIL_LINES
    ) -> dict[str, str]:
        """Each process's log (or its tail), all runtimes at once."""

        def read(job: tuple[Runtime, list[ProcessInfo]]) -> dict[str, str]:
            runtime, owned = job
            try:
                return processes.read_logs(runtime, owned, lines)
            except LazyclusterError as exc:
                return {i.name: f"(log unavailable: {exc})" for i in owned}

        logs: dict[str, str] = {}
        for part in run_parallel("read logs", self._by_runtime(infos), read).values():
            logs.update(part)
        return logs

    def stop_named(self, names: Sequence[str]) -> None:
        """Stop these processes (all hosts at once); a host that fails keeps them on record."""
        self._stop_processes(list(names))

    def reach(self, host: str, timeout: float) -> None:
        """One bounded round trip to ``host``; raises when it does not answer."""
        self._group.get_runtime(host).connection.check("true", timeout=timeout)

    def liveness(self, names: Sequence[str], timeout: float) -> dict[str, str]:
        """name -> "alive", "gone", or "unreachable: why" (each host asked once, bounded)."""
        infos = [self._processes[n] for n in names if n in self._processes]
        jobs = self._by_runtime(infos)

        def ask(job: tuple[Runtime, list[ProcessInfo]]) -> dict[str, str]:
            runtime, owned = job
            try:
                states = processes.alive(runtime, owned, timeout=timeout)
            except LazyclusterError as exc:
                return {i.name: f"unreachable: {exc}".splitlines()[0] for i in owned}
            return {name: "alive" if up else "gone" for name, up in states.items()}

        result = {n: "gone" for n in names if n not in self._processes}
        for part in run_parallel("liveness", jobs, ask).values():
            result.update(part)
        return result

    def stop_workers(self) -> None:
        self._stop_processes([n for n, i in self._processes.items() if i.role == "worker"])

    # -- Dask-style surface ---------------------------------------------------------------

    def monitor_client(self) -> Any:
        """The controller's own client (kept by the cluster, do not close it)."""
        return self._monitor()

    def _monitor(self) -> Any:
        """The controller's own client: it keeps the scheduler alive (see WATCH_PRELOAD)."""
        with self._client_lock:
            if self._client is None:
                from distributed import Client

                address = self.scheduler_address
                if address is None:  # Client(None) would start a local cluster in this process
                    raise ValueError("the scheduler is not running")
                self._client = Client(address, timeout=30, set_as_default=False)
            return self._client

    def _connect_monitor(self) -> None:
        """Connect the monitor client in the background while the workers start."""

        def connect() -> None:
            try:
                self._monitor()
            except Exception as exc:  # the next _monitor() call raises it where it matters
                logger.debug("monitor client not connected yet: %s", exc)

        self._monitor_thread = threading.Thread(target=connect, name="lct-monitor", daemon=True)
        self._monitor_thread.start()

    def _registered(self, timeout: float = IDENTITY_TIMEOUT) -> dict[str, dict[str, Any]]:
        """Workers the scheduler lists (asked with a bounded wait, never the client's 30 s)."""
        client = self._monitor()
        info = client.sync(client.scheduler.identity, n_workers=-1, callback_timeout=timeout)
        return {str(w.get("name")): {**w, "address": a} for a, w in info["workers"].items()}

    @property
    def state(self) -> str:
        """created, starting, running, stopping, stopped, cleanup failed — or failed once the
        scheduler of a running cluster is gone (see ``failure``)."""
        if self._state == "running" and not self._scheduler_ok():
            self._state = "failed"
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value

    def _scheduler_ok(self) -> bool:
        """Whether the scheduler still serves: free while the monitor client is connected;
        otherwise one liveness round trip to the scheduler's host decides."""
        client = self._client
        if client is not None and client.status == "running":
            return True
        info = self._processes.get("scheduler")
        if info is None:
            self.failure = self.failure or "the scheduler is not running"
            return False
        try:
            dead = bool(self._dead([info]))
        except LazyclusterError as exc:
            self.failure = f"the scheduler's host {info.host} cannot be reached: {exc}"
            return False
        if dead:
            self.failure = f"the scheduler (pid {info.pid} on {info.host}) is gone"
        return not dead

    def get_client(self, timeout: int = 2) -> Any:
        """A new ``distributed.Client`` connected to the scheduler (closed by cleanup)."""
        from distributed import Client

        address = self.scheduler_address
        if address is None:
            raise ValueError("the cluster is not running")
        client = Client(address, timeout=timeout, set_as_default=False)
        self._user_clients.append(client)
        return client

    @property
    def workers(self) -> dict[str, dict[str, Any]]:
        """Workers the scheduler currently knows: name -> host, pid, address ({} once the
        scheduler is gone: ``state`` then says "failed")."""
        if self.scheduler_address is None or not self._scheduler_ok():
            return {}
        try:
            registered = self._registered()
        except (OSError, TimeoutError) as exc:
            self.failure = f"the scheduler does not answer: {type(exc).__name__} {exc}"
            return {}
        return {
            name: {
                "host": self._processes[name].host,
                "pid": self._processes[name].pid,
                "address": w["address"],
            }
            for name, w in registered.items()
            if name in self._processes
        }

    @property
    def dashboard_link(self) -> str | None:
        """The scheduler's dashboard, reachable from this machine (tunnelled when needed)."""
        if self.scheduler_address is None or not self.options.dashboard:
            return None
        with self._lock:
            if self._dashboard_port is None:
                services = self._monitor().scheduler_info(n_workers=0).get("services", {})
                port = services.get("dashboard")
                if port is None:
                    return None
                if self._scheduler_host is not None:
                    runtime = self._group.get_runtime(self._scheduler_host)
                    port = runtime.expose_port_from_runtime(int(port))
                self._dashboard_port = int(port)
        return f"http://127.0.0.1:{self._dashboard_port}/status"

    def scale(self, n: int) -> None:
        """Grow or shrink to ``n`` running workers; removed workers are retired (their data
        moved) and their processes stopped. Workers that died are cleared away first."""
        _check_count("n", n)
        registered = self._registered()
        ours = self._worker_names()
        self._stop_processes([w for w in ours if w not in registered])
        running = [w for w in ours if w in registered]
        if n > len(running):
            self._refresh_ports()
            self.start_workers(n - len(running))
            self.verify_paths()
        elif n < len(running):
            remove = running[n:]
            addresses = [registered[w]["address"] for w in remove]
            self._monitor().retire_workers(workers=addresses, close_workers=True)
            self._stop_processes(remove)

    def _worker_names(self) -> list[str]:
        """Our workers in the order they were started."""
        names = [n for n, i in self._processes.items() if i.role == "worker"]
        return sorted(names, key=lambda name: int(name.rsplit("-", 1)[1]))

    def _refresh_ports(self, hosts: Sequence[str] | None = None) -> None:
        """Probe the hosts' ports again (default: every host); a host that does not answer
        keeps its last probe (its workers cannot start there anyway, and it must not stop
        those elsewhere)."""
        runtimes = [rt for rt in self._group.runtimes if hosts is None or rt.host in hosts]
        try:
            used = fan_out("port probe", runtimes, lambda rt: rt.used_ports())
        except GroupError as exc:
            logger.debug("port probe incomplete: %s", exc)
            used = exc.results
        self.plan.used_ports.update(used)

    def get_logs(self) -> dict[str, str]:
        """Every process's log by name ("scheduler", "<host>-<i>")."""
        return self._logs(list(self._processes.values()), lines=None)

    # -- bookkeeping and teardown ---------------------------------------------------------

    def _register(self, runtime: Runtime, info: ProcessInfo) -> None:
        with self._lock:
            self._processes[info.name] = info
            self._owners[info.name] = runtime

    def _forget(self, name: str) -> None:
        with self._lock:
            info = self._processes.pop(name, None)
            self._owners.pop(name, None)
        if info is not None and self._routes is not None:
            self._routes.forget(info)

    def _follow_logs(self, runtime: Runtime, infos: list[ProcessInfo], debug: bool) -> None:
        """debug: print the processes' output live on our stdout (until cleanup)."""
        if not debug:
            return
        files = shlex.join(i.log_file for i in infos)
        task = RuntimeTask(f"follow-{infos[0].name}").run_command(f"exec tail -n +1 -F {files}")
        runtime.execute_task(task, execute_async=True, omit_on_join=True, debug=True)

    def _log_output(self, infos: list[ProcessInfo], debug: bool) -> None:
        """Without debug: the processes' startup output goes to our logger at debug level."""
        if debug or not logger.isEnabledFor(logging.DEBUG):
            return
        for name, text in self._logs(infos).items():
            logger.debug("[%s] %s", name, text.rstrip())

    def _stop_processes(self, names: list[str], remove_folders: bool = False) -> None:
        """Stop processes grouped by runtime, all runtimes at once, one round trip each; verify
        none survived. ``remove_folders`` (cleanup) also removes the cluster folder — or the
        whole working dir when it is a temporary one — in that same round trip."""
        infos = [self._processes[n] for n in names if n in self._processes]
        jobs = self._by_runtime(infos)
        owners = [self.controller, *self._group.runtimes] if remove_folders else []
        for owner in owners:
            if owner._working_dir is not None:
                jobs.setdefault(self._key(owner), (owner, []))

        def stop(job: tuple[Runtime, list[ProcessInfo]]) -> None:
            runtime, infos = job
            folder = self.folder(runtime)
            remove = None
            if remove_folders:
                remove = runtime.working_dir if runtime._working_dir_is_temp else folder
            marker = processes.folder_marker(folder)
            left = processes.stop_processes(runtime, infos, marker, self.options.stop_grace, remove)
            if remove_folders and runtime._working_dir_is_temp:
                runtime.forget_working_dir()  # removed here; its cleanup need not do it again
            if left:
                raise LazyclusterError(f"process groups {left} survived SIGKILL on {runtime.host}")

        failed: set[str] = set()
        try:
            run_parallel("stop processes", jobs, stop)
        except GroupError as exc:
            failed = set(exc.errors)
            raise
        finally:
            for name in names:  # a host that failed keeps its processes on record
                keeper = self._owners.get(name)
                if keeper is None or self._key(keeper) not in failed:
                    self._forget(name)
            if self._routes is not None and not remove_folders:  # cleanup closes every tunnel
                self._routes.unroute(infos)
            self._release_ports([i for i in infos if i.name not in self._processes])

    def _release_ports(self, stopped: list[ProcessInfo]) -> None:
        """Ports of stopped workers (their forwards closed) serve the next workers."""
        for info in stopped:
            if info.role != "worker":
                continue
            for reserved in self._reserved.values():
                reserved.difference_update(info.ports)
            self._ports.extend(p for p in info.ports if p not in self._ports)

    def _key(self, runtime: Runtime) -> str:
        return CONTROLLER_KEY if runtime is self.controller else runtime.host

    def record(self) -> ClusterRecord:
        """This cluster as frozen plain data: enough to find, show and stop it later (no
        secrets); ``teardown(record)`` stops it from that alone."""
        owners = [self.controller, *self._group.runtimes]
        folders = {
            self._key(rt): FolderRecord(
                folder=self.folder(rt),
                working_dir=rt.working_dir,
                temporary=rt._working_dir_is_temp,
            )
            for rt in owners
            if rt._working_dir is not None
        }
        tunnels = [
            TunnelRecord(
                host=rt.host, kind=t.kind, local_port=t.local_port, remote_port=t.remote_port
            )
            for rt in self._group.runtimes
            for t in rt.tunnels
        ]
        return ClusterRecord(
            cluster_id=self.cluster_id,
            state=self.state,
            network_mode=self.network_mode,
            network_paths=dict(self._plan.paths) if self._plan else {},
            network_reasons=list(self._plan.reasons) if self._plan else [],
            hosts=[HostSpec.of(rt) for rt in self._group.runtimes],
            scheduler_host=self._scheduler_host,
            scheduler_address=self.scheduler_address,
            dashboard_link=(
                f"http://127.0.0.1:{self._dashboard_port}/status" if self._dashboard_port else None
            ),
            processes=list(self._processes.values()),
            folders=folders,
            tunnels=tunnels,
        )

    def close_clients(self) -> None:
        """Close the controller's client and those handed out (the cluster keeps running)."""
        self._close_clients()

    def _close_clients(self) -> None:
        if self._monitor_thread is not None:
            self._monitor_thread.join()
        for client in [*self._user_clients, self._client]:
            if client is not None:
                try:
                    client.close(timeout=2)
                except Exception as exc:
                    logger.debug("closing a client failed: %s", exc)
        self._user_clients = []
        self._client = None


def _retriable(log: str) -> bool:
    """A worker that lost its port at bind time, or its first connection to the scheduler."""
    cause = first_error(log) or ""
    return any(t in log for t in ADDRESS_IN_USE) or any(t in cause for t in DROPPED_AT_START)


def first_error(log: str) -> str | None:
    """The first line of a log that reports an error: usually the cause, where the last lines
    show only what followed from it."""
    for line in log.splitlines():
        text = line.strip()
        if re.search(r"\b\w*(Error|Exception)\b:|\berror:", text):
            return text
    return None


def _failure_text(name: str, log: str) -> str:
    cause = first_error(log)
    head = f"{name}: first error: {cause}\n" if cause else f"{name}: "
    return head + tail(log, 800)


def _check_options(options: DaskOptions) -> None:
    """Refuse options that would start a useless or broken cluster, naming the option."""
    if options.network_mode not in NETWORK_MODES:
        raise ValueError(
            f"network_mode must be one of {NETWORK_MODES}, not {options.network_mode!r}"
        )
    _check_count("workers_per_host", options.workers_per_host, minimum=1)
    if options.threads_per_worker is not None:
        _check_count("threads_per_worker", options.threads_per_worker, minimum=1)
    for name in ("death_timeout", "idle_timeout", "start_timeout"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number of seconds > 0, not {value!r}")
    if isinstance(options.stop_grace, bool) or not options.stop_grace >= 0:
        raise ValueError(f"stop_grace must be >= 0, not {options.stop_grace!r}")
    for key in options.env:
        check_path(key, "env name")
        if "=" in key or not key:
            raise ValueError(f"env name must be non-empty without '=': {key!r}")


def _check_count(name: str, value: object, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, not {value!r}")
