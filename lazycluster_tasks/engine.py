"""Engine: the machinery under every cluster class — one start path, one stop path.

Both :class:`~lazycluster_tasks.ssh_cluster.LazySSHCluster` and the seed API's
:class:`~lazycluster_tasks.dask.DaskCluster` drive one Engine. It owns the network plan and
routing, the port pool, the processes it started (by name: ``scheduler``, ``<host>-<n>``), the
controller's clients and the record. Launch strategies only decide *where*; the engine does *how*:

``start(placement, scheduler_on=..., scheduler_ports=...)`` launches the scheduler (when asked),
launches the placed workers while it boots, awaits the scheduler (a port lost at bind time moves it
to the next port), then awaits every worker. ``stop(names)`` and ``cleanup()`` stop process groups
on all hosts at once and verify nothing survived.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import posixpath
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import cloudpickle

from lazycluster_tasks import commands, hostside, limits, link_commands, processes, startup
from lazycluster_tasks.clients import IDENTITY_TIMEOUT, Clients
from lazycluster_tasks.cluster_environments import ClusterEnvironments, given_python
from lazycluster_tasks.connection import tail
from lazycluster_tasks.dask_argv import (
    CLIENT_TIMEOUT_ENV,
    cuda_worker,
    scheduler_argv,
    server_env,
    worker_argv,
)
from lazycluster_tasks.dask_options import DaskOptions
from lazycluster_tasks.environments import HostEnvironment, Manifest
from lazycluster_tasks.errors import (
    GroupError,
    LazyclusterError,
    MasterStartError,
    NetworkPathError,
    NoPortsLeftError,
    PortInUseError,
    RemoteEnvironmentError,
    WorkerStartError,
)
from lazycluster_tasks.group import Background, RuntimeGroup, fan_out, run_parallel
from lazycluster_tasks.hostside import code
from lazycluster_tasks.links import ON_DEMAND_ABOVE, Links
from lazycluster_tasks.network import (
    NetworkMode,
    NetworkPlan,
    last_mode,
    plan_network,
    quick_probes,
    remember_mode,
)
from lazycluster_tasks.paths_check import PathCheck
from lazycluster_tasks.ports import (
    PortPool,
    as_port_list,
    bindable_here,
    free_ports,
    local_used_ports,
)
from lazycluster_tasks.process_table import ProcessTable
from lazycluster_tasks.processes import Guard, ProcessInfo, ProcessSpec, Revoke
from lazycluster_tasks.record import (
    CONTROLLER_KEY,
    ClusterRecord,
    ClusterState,
    FolderRecord,
    HostSpec,
    TunnelRecord,
)
from lazycluster_tasks.routing import (
    Routing,
    TunnelledRouting,
    make_routing,
    scheduler_bind_before_plan,
    start_masters,
)
from lazycluster_tasks.runtime import Runtime
from lazycluster_tasks.security import ClusterTLS, cluster_tls
from lazycluster_tasks.task import RuntimeTask

logger = logging.getLogger(__name__)

LIVENESS_INTERVAL = 2.0
PORT_RETRIES = 3
#: Upper bound (s) of the end-to-end readiness check once every worker registered.
PATH_CHECK_TIMEOUT = 30.0
#: Seconds a scheduler started before the plan may wait for it: the scheduler closes when no
#: client came within 30 s (hostside/watch.py), and the monitor client connects after the plan.
EARLY_SCHEDULER_KEEP = 15.0
#: Seconds workers have to answer a request about their connections (code.drop_idle_connections,
#: code.retire_connections).
RETIRE_TIMEOUT = 10.0
#: Seconds a host has to import the worker class (after its setup lines).
CLASS_CHECK_TIMEOUT = 60.0
#: Seconds a cleanup waits for the scheduler's own close before its host's stop goes on
#: regardless (the close itself is bounded: Clients.close_scheduler).
CLOSE_WAIT = 8.0


class SchedulerClose(threading.Thread):
    """The scheduler asked to close itself, in a thread (a cleanup's); ``closed``: it said it
    did (see Clients.close_scheduler)."""

    def __init__(self, clients: Clients) -> None:
        super().__init__(name="lct-close-scheduler", daemon=True)
        self._clients = clients
        self.closed = False

    def run(self) -> None:
        self.closed = self._clients.close_scheduler()


class Engine:
    """The processes of one Dask cluster on a RuntimeGroup, from start to verified cleanup."""

    def __init__(self, group: RuntimeGroup, options: DaskOptions, ports: Sequence[int]) -> None:
        options.check()
        self.group = group
        self.options = options
        limits.ensure_open_files(limits.open_files_for(len(group.hosts)))
        #: Candidate ports for the cluster's processes (lazycluster's list; shrinks as used).
        self.pool = PortPool(ports)  # the candidate ports and those our processes hold
        self.cluster_id = uuid.uuid4().hex[:12]
        self.controller = Runtime("localhost")
        #: Called with (registered, requested) as workers register (e.g. a progress artifact).
        self.on_progress: Callable[[int, int], None] | None = None
        #: The hosts' environments (made at the start, the user's code synced later).
        self.envs = ClusterEnvironments(lease=self.folder_name)
        #: Called once the scheduler answers (e.g. to let a Dask cluster object connect).
        self.on_scheduler_up: Callable[[], None] | None = None
        #: Why a running cluster failed (None while it is healthy).
        self.failure: str | None = None
        #: Hosts that do not answer now (a healing cluster sets it): routes to them wait.
        self.unreachable: Callable[[], Collection[str]] = tuple
        #: The cluster's certificates (None: security=False, plain tcp://).
        self.tls: ClusterTLS | None = cluster_tls(options.security)
        #: This machine's ``distributed.Security`` for the cluster (None without TLS).
        self.security: Any = self.tls.security() if self.tls is not None else None
        self.clients = Clients(lambda: self.scheduler_address, self.security)
        self._plan: NetworkPlan | None = None
        self._routes: Routing | None = None
        #: the cluster's processes by name (see processes.ProcessTable)
        self.table = ProcessTable(self._key)
        self._host_locks: dict[str, threading.Lock] = {}
        self._scheduler_host: str | None = None  # None: this machine
        self._scheduler_bind: str | None = None
        self._scheduler_port: int | None = None
        self._dashboard_port: int | None = None
        self._lock = threading.RLock()
        self._state = ClusterState.created
        self._links_held = False  # see links_after
        #: the end-to-end check follows this start (see start's ``checked``)
        self._check_early = False
        self._early: PathCheck | None = None  # its tasks sent to the workers that registered
        self._unchecked: dict[str, tuple[str, str]] = {}  # registered, not routed yet
        self._masters: threading.Thread | None = None  # see ensure_plan

    def __repr__(self) -> str:
        return f"Engine({self.cluster_id}, hosts={self.group.hosts}, state={self._state})"

    # -- the plan -------------------------------------------------------------------------

    def ensure_plan(self, ports: Sequence[int]) -> NetworkPlan:
        """Make the hosts' environments, probe the hosts once (python, distributed, ports,
        paths) and fix the routing."""
        with self._lock:
            if self._plan is None:
                mode = self.options.network_mode
                if mode == "tunnelled":
                    # known to be needed: the masters come up beside the environments (the
                    # routing's own start of them then finds them up)
                    self._masters = start_masters(self.group.runtimes)
                probes = self._probe_beside_environments(mode)
                try:
                    self._environments()
                finally:
                    if probes is not None:  # over the cluster's connections: never left running
                        probes.join()
                probed = probes.result() if probes is not None else None
                self._plan = plan_network(
                    self.group, mode, list(ports), self.options.python, probed=probed
                )
                if mode == "auto":
                    remember_mode(self.group, self._plan.mode)
                self._routes = make_routing(self._plan, self.group, self.controller)
                self._routes.unreachable = lambda: self.unreachable()
                if isinstance(self._routes, TunnelledRouting) and self.options.host_links:
                    self._routes.use_links(
                        Links(
                            self.group.runtimes,
                            self._plan.addresses,
                            self.folder,
                            link_commands.peer_marker(self.cluster_id),
                            self._register,
                            python=self.options.python,
                            guard=self._guard,
                            ports=self._link_ports,
                            host_lock=self._host_lock,
                            on_demand=self._links_on_demand(),
                        )
                    )
                    self._routes.on_moved = self._retire_relayed
                if self.options.worker_class:
                    self._check_worker_class(self.options.worker_class)
            return self._plan

    def _probe_beside_environments(self, mode: NetworkMode) -> Background | None:
        """An explicit mode's quick probes, started while the environments are checked (one
        round trip less per host before the first worker starts): they ask for no interpreter
        the environment check finds, only for one the user gave (used as it is where a host
        shares this machine's files). None where the plan probes by itself."""
        if mode == "auto" or self.options.environment_parts() is None:
            return None
        options = self.options

        def python(runtime: Runtime) -> str | None:
            return options.python(runtime) if runtime.is_local else given_python(options, runtime)

        return Background(lambda: quick_probes(self.group, python))

    def _links_on_demand(self) -> bool:
        """Whether the links' pairs are dialled when their workers first talk (host_links)."""
        chosen = self.options.host_links
        remote = [rt for rt in self.group.runtimes if not rt.is_local]
        return chosen == "on-demand" or (chosen is True and len(remote) > ON_DEMAND_ABOVE)

    def _check_worker_class(self, name: str) -> None:
        """The worker class imports on every host (after its setup lines), or GroupError
        naming each host where it does not, and why."""
        source = hostside.source("importable")

        def check(runtime: Runtime) -> None:
            lines = self.options.setup_on(runtime.host)
            exports = commands.export_env(self._code_env(runtime))
            line = f"{exports}\n" if exports else ""
            line += commands.python_call(self.options.python(runtime), source, [name])
            if lines:
                line = commands.setup_file(lines) + line
            result = runtime.connection.run(line, timeout=CLASS_CHECK_TIMEOUT)
            setup = startup.setup_failure(result.output)
            if setup is not None:
                raise WorkerStartError(f"{runtime.host}: {setup}")
            try:
                why = json.loads(result.stdout.strip().splitlines()[-1])[name]
            except (ValueError, IndexError, KeyError):
                why = tail(result.output, 300).strip() or f"exit {result.exit_code}"
            if why:
                raise RemoteEnvironmentError(
                    f"{runtime.host}: worker_class {name!r} does not import there ({why})",
                    host=runtime.host,
                )

        run_parallel("worker class check", {rt.host: rt for rt in self.group.runtimes}, check)

    @property
    def routing(self) -> Routing:
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
    def network_mode(self) -> NetworkMode:
        """The resolved mode ("direct" or "tunnelled"), or the requested one before start."""
        return self._plan.mode if self._plan else self.options.network_mode

    @property
    def ports(self) -> list[int]:
        """The candidate ports a start may still take (a copy; see ``pool``)."""
        return self.pool.candidates

    @ports.setter
    def ports(self, ports: Sequence[int]) -> None:
        self.pool.candidates = ports

    @property
    def folder_name(self) -> str:
        """The name of the cluster's folder in each runtime's working dir."""
        return f"lazycluster-{self.cluster_id}"

    def folder(self, runtime: Runtime) -> str:
        return posixpath.join(runtime.working_dir, self.folder_name)

    def _taken(self, runtime: Runtime) -> tuple[list[str], bool, set[int]]:
        """For a port bound on ``runtime``: the hosts where it must be free, whether this
        machine's too, and the ports taken there (probed or reserved by us)."""
        scope = self.routing.port_scope(runtime)
        local = self.routing.needs_local_port(runtime)
        used = self.plan.taken(scope, local) | self.pool.held([*scope, *([""] if local else [])])
        return scope, local, used

    def _reserve(self, runtime: Runtime, ports: Sequence[int]) -> None:
        scope = self.routing.port_scope(runtime)
        local = self.routing.needs_local_port(runtime)
        self.pool.hold([*scope, *([""] if local else [])], ports)

    # -- the one start path ---------------------------------------------------------------

    def start(
        self,
        placement: dict[str, list[str]],
        *,
        scheduler_on: Runtime | None = None,
        scheduler_ports: list[int] | int | None = None,
        timeout: float = 30.0,
        ports: list[int] | None = None,
        debug: bool = False,
        checked: bool = False,
    ) -> dict[str, list[int]]:
        """Start the workers of ``placement`` (host -> worker names) and, when
        ``scheduler_ports`` is given, the scheduler on ``scheduler_on`` (default: this machine)
        on the first of them that is free. Workers launch while the scheduler boots (they retry
        its address). Returns once the scheduler and every worker answer: host -> the worker
        ports taken from ``ports`` (default: the cluster's pool, which loses them).
        ``checked``: :meth:`verify_paths` follows; each worker gets its part of the check as
        it registers, once it is routed, so that little of it is left once the last one did."""
        self._check_early = checked
        try:
            return self._start(placement, scheduler_on, scheduler_ports, timeout, ports, debug)
        except BaseException:
            self._drop_early_check()
            raise
        finally:
            self._check_early = False

    def _drop_early_check(self) -> None:
        self._unchecked.clear()
        early, self._early = self._early, None
        if early is not None:
            with contextlib.suppress(Exception):  # a client closed meanwhile took them along
                early.cancel()

    def _start(
        self,
        placement: dict[str, list[str]],
        scheduler_on: Runtime | None,
        scheduler_ports: list[int] | int | None,
        timeout: float,
        ports: list[int] | None,
        debug: bool,
    ) -> dict[str, list[int]]:
        new_scheduler = scheduler_ports is not None
        if not new_scheduler and self.scheduler_address is None:
            raise ValueError("start the scheduler first")
        pool = self.ports if ports is None else ports
        candidates = [] if scheduler_ports is None else as_port_list(scheduler_ports)
        runtime = scheduler_on or self.controller
        early = None  # when a scheduler started before the plan (it boots meanwhile)
        if scheduler_ports is not None:
            early = self._launch_scheduler_early(runtime, candidates, debug)
        order: list[int] = []
        kept = False
        try:
            self.ensure_plan(candidates or pool)
            if scheduler_ports is not None:
                order = self._scheduler_order(runtime, scheduler_ports, early is not None)
            kept = early is not None and self._keeps(runtime, early, order)
        finally:
            if early is not None and not kept:  # the plan put it elsewhere, or failed
                self._drop_scheduler()
        used: dict[str, list[int]] = {}
        started: dict[str, ProcessInfo] = {}
        if scheduler_ports is not None:
            info = (
                self.table["scheduler"]
                if kept
                else self._launch_scheduler(runtime, order[0], debug)
            )
            if placement:
                started = self._launch_workers(placement, pool, used, debug)
            while not self._await_scheduler(runtime, info, timeout, debug):
                self._stop(list(started))  # they were given the lost address
                started, used = {}, {}
                if isinstance(scheduler_ports, int):
                    raise PortInUseError(scheduler_ports, runtime.host)
                order.pop(0)
                if not order:
                    raise NoPortsLeftError(
                        f"every free-looking port was taken when binding: {candidates}"
                    )
                info = self._launch_scheduler(runtime, order[0], debug)
        if placement and not started:
            started = self._launch_workers(placement, pool, used, debug)
        if started:
            self._finish_workers(started, pool, used, debug)
        self.pool.take(p for host_ports in used.values() for p in host_ports)
        return used

    @contextlib.contextmanager
    def links_after(self) -> Iterator[None]:
        """The host-to-host links are set up once the block succeeded (a start and its readiness
        check), not as soon as the workers registered: their handshakes, N(N-1) at once, took
        the hosts' CPUs from the check (until they are up, routes go through here anyway)."""
        self._links_held = True
        try:
            yield
        finally:
            self._links_held = False
        if self.table.workers():
            self.routing.workers_up(checked=True)

    def try_start_workers(self, placement: dict[str, list[str]]) -> dict[str, str]:
        """:meth:`start` for more workers with partial failure as data: returns name -> why,
        for each worker that did not come up (its processes stopped); the others run."""
        scope = {h for host in placement for h in self.routing.port_scope(self.runtime(host))}
        scope -= set(self.unreachable())  # those keep their last probe: asking them would stall
        self._refresh_ports(sorted(scope))  # only where the new ports must be free
        try:
            self.start(placement)
            return {}
        except (WorkerStartError, GroupError, NoPortsLeftError) as exc:
            failure = exc
        registered = self.registered()
        names = [n for host_names in placement.values() for n in host_names]
        failed = [n for n in names if n not in registered]
        self._stop([n for n in failed if n in self.table])
        return {name: str(failure) for name in failed}

    def verify_paths(self, timeout: float | None = None) -> None:
        """End-to-end readiness: every worker runs a task whose result reaches this machine, and
        each fetches another's result. Raises NetworkPathError naming every path that failed
        within ``timeout`` (default: min(start_timeout, 30 s))."""
        if timeout is None:
            timeout = min(self.options.start_timeout, PATH_CHECK_TIMEOUT)
        registered = self.registered()
        ours = {
            n: (self.table[n].host, registered[n]["address"])
            for n in self.worker_names()
            if n in registered
        }
        if self._early is not None and not self._early.covers(ours):
            self._drop_early_check()  # a worker started again meanwhile: its tasks are stale
        early, self._early = self._early, None
        self._unchecked.clear()
        if not ours:
            return
        check = early or PathCheck(self.clients.monitor(), self._here())
        for name, (host, address) in ours.items():
            check.add(name, host, address)

        def refused() -> set[str]:  # forwards a host's sshd refused: those paths cannot work
            return {
                f"  {rt.host}: {t.refused}"
                for rt in self.group.runtimes
                for t in rt.tunnels
                if t.refused
            }

        failed = check.finish(timeout, give_up=lambda: bool(refused()))
        if failed:
            lines = "\n".join(f"  {path}: {why}" for path, why in failed.items())
            seen = refused()
            hint = "\n".join(["measured:", *sorted(seen)]) if seen else self.routing.hint
            raise NetworkPathError(
                f"the workers registered, but {len(failed)} path(s) the cluster needs are "
                f"blocked ({self.network_mode} mode):\n{lines}\n{hint}",
                failed,
            )
        routes = self._routes
        if self._links_held and isinstance(routes, TunnelledRouting) and routes.links is not None:
            self._drop_idle_connections()

    def _drop_idle_connections(self) -> None:
        """The check's connections went through the relay: see code.drop_idle_connections.
        Best effort (a worker that keeps one uses it, as before)."""
        cloudpickle.register_pickle_by_value(code)
        try:
            self.clients.run(code.drop_idle_connections, workers=None, timeout=RETIRE_TIMEOUT)
        except Exception as exc:  # the cluster works all the same
            logger.info("the readiness check's connections were not all dropped: %s", exc)

    def _retire_relayed(self, moved: dict[str, set[int]]) -> None:
        """Routes leaving the relay for links (host -> worker ports): each host's workers end
        their connections to those ports open through the relay, each once idle (see
        code.retire_connections), so that the job's next fetches take the links. One request
        for every worker concerned."""
        ports = {
            info["address"]: sorted(moved[self.table[name].host])
            for name, info in self.registered().items()
            if name in self.table and self.table[name].host in moved
        }
        if ports:
            cloudpickle.register_pickle_by_value(code)
            self.clients.run(
                code.retire_connections, ports, workers=list(ports), timeout=RETIRE_TIMEOUT
            )

    def runtime(self, host: str) -> Runtime:
        return self.group.get_runtime(host)

    def gpus(self, host: str) -> list[int]:
        """The GPUs whose workers run on ``host``, by index ([] : GPUs not used there). With
        dask-cuda's CUDAWorker every worker has one (gpus defaults to "auto")."""
        chosen = self.options.gpus_on(host)
        cuda = cuda_worker(self.options)
        if cuda and self.options.gpus is None:
            chosen = "auto"
        if chosen is None and not cuda:
            return []
        found = self.runtime(host).gpu_count  # the host's facts (nvidia-smi)
        if chosen not in (None, "auto") and int(chosen) > found:
            raise ValueError(
                f"gpus: {host} has {found} GPU(s) (nvidia-smi), fewer than the {chosen} asked for"
            )
        count = 0 if chosen is None else found if chosen == "auto" else int(chosen)
        if cuda and not count:
            raise ValueError(
                f"worker_class {self.options.worker_class!r} runs one worker per GPU: {host} "
                f"has none for it ({found} found by nvidia-smi, gpus={self.options.gpus!r})"
            )
        return list(range(count))

    def slots(self, host: str) -> int:
        """Workers ``host`` takes: one per GPU where GPUs are used (and found), else
        workers_per_host's count."""
        gpus = self.gpus(host)
        return len(gpus) if gpus else self.options.workers_on(host)

    # -- scheduler ------------------------------------------------------------------------

    def _scheduler_order(
        self, runtime: Runtime, ports: list[int] | int, early: bool = False
    ) -> list[int]:
        """The candidate ports free where the scheduler binds (and where it must be reached);
        the port of a scheduler started before the plan (``early``) is not taken by it."""
        scope, _, used = self._taken(runtime)
        port = self._scheduler_port
        if early and port is not None and port not in self.plan.taken(scope, False):
            used.discard(port)  # this machine's probe saw the scheduler itself
        where = "here" if runtime is self.controller else f"on {runtime.host}"
        where += " (and on the hosts it must reach)"
        candidates = as_port_list(ports)
        if isinstance(ports, int) and ports in used:
            raise PortInUseError(ports, where)
        order = [p for p in candidates if p not in used]
        if not order:
            raise NoPortsLeftError(f"none of the given ports is free {where}: {candidates}")
        return order

    def _launch_scheduler_early(
        self, runtime: Runtime, ports: list[int], debug: bool
    ) -> float | None:
        """Start the scheduler on this machine before the plan, where its address is known
        without reaching a host (see ``scheduler_bind_before_plan``), on the first candidate
        port free here; when (monotonic), or None where it must wait for the plan. The plan
        then decides whether it stays (:meth:`_keeps`)."""
        if self._plan is not None or runtime is not self.controller:
            return None
        mode = self.options.network_mode
        if mode == "auto":  # what it chose for these hosts last time; open networks: direct
            mode = last_mode(self.group) or "direct"
        bind = scheduler_bind_before_plan(self.group, mode)
        if bind is None:
            return None
        taken = local_used_ports() | self.pool.held([""])
        free = [p for p in ports if p not in taken and bindable_here(p)]
        if not free:
            return None  # the plan's order says why
        self.envs.prepare(self.options)  # its PYTHONPATH names the user's code folders
        self._launch_scheduler(runtime, free[0], debug, bind=bind)
        logger.info("scheduler starting here on %s:%s while the hosts are reached", bind, free[0])
        return time.monotonic()

    def _keeps(self, runtime: Runtime, launched: float, order: list[int]) -> bool:
        """Whether the scheduler started before the plan stays: the plan binds it to the same
        address, its port is free on every host that must reach it, and it has not waited so
        long for its first client that it may be closing (hostside/watch.py)."""
        bind, port = self._scheduler_bind, self._scheduler_port
        planned = self.routing.bind_address(runtime)
        why = ""
        if planned != bind:
            why = f"the plan binds it to {planned}, not {bind}"
        elif port is None or port not in order:
            why = f"port {port} is taken where it must be reached"
        elif time.monotonic() - launched > EARLY_SCHEDULER_KEEP:
            why = f"the hosts took more than {EARLY_SCHEDULER_KEEP:g} s to be ready"
        if why or port is None:
            logger.info("the scheduler started before the plan is started again: %s", why)
            return False
        self._reserve(runtime, [port])
        return True

    def _launch_scheduler(
        self, runtime: Runtime, port: int, debug: bool, bind: str | None = None
    ) -> ProcessInfo:
        if bind is None:
            bind = self.routing.bind_address(runtime)
        folder = self.folder(runtime)
        tls = self.tls.paths(folder, "master") if self.tls is not None else None
        argv = scheduler_argv(self.options.python(runtime), bind, port, folder, self.options, tls)
        spec = ProcessSpec(
            "scheduler",
            argv,
            role="master",
            env=server_env(
                folder,
                {
                    CLIENT_TIMEOUT_ENV: str(self.options.idle_timeout),
                    **self._code_env(runtime),
                    **self.options.env,
                },
            ),
            ports=[port],
            setup=[] if runtime is self.controller else self.options.setup_on(runtime.host),
        )
        with self._host_lock(runtime):
            (info,) = processes.start_processes(
                runtime, folder, [spec], self._files("master"), self._guard(runtime)
            )
            self._register(runtime, info)
        self._scheduler_host = None if runtime is self.controller else runtime.host
        self._scheduler_bind, self._scheduler_port = bind, port
        if self._routes is not None:  # else once the plan keeps it
            self._reserve(runtime, [port])
        self.pool.take([port])
        self._follow_logs(runtime, [info], debug)
        return info

    def _await_scheduler(
        self, runtime: Runtime, info: ProcessInfo, timeout: float, debug: bool
    ) -> bool:
        """Wait until the scheduler wrote its file and its port answers. False when it lost its
        port at bind time or a forward of it found that port taken; MasterStartError when it
        exited otherwise or was not up in time."""
        bind, port = self._scheduler_bind or "", self._scheduler_port or 0
        state, waited = processes.wait_ready(
            runtime,
            self.options.python(runtime),
            f"{self.folder(runtime)}/scheduler.json",
            bind,
            port,
            info.pid,
            timeout,
        )
        if state != "up":
            log = processes.read_logs(runtime, [info], lines=None).get("scheduler", "")
            self._stop(["scheduler"])
            self._scheduler_port = self._scheduler_bind = None
            if state == "dead" and startup.lost_port(log):
                logger.info("port %s on %s was taken at bind time; trying the next", port, runtime)
                return False
            setup = startup.setup_failure(log)
            if setup is not None:
                raise MasterStartError(f"{runtime.host}: {setup}", host=runtime.host, output=log)
            reason = "exited" if state == "dead" else f"was not up within {timeout:g} s"
            raise MasterStartError(
                f"the Dask scheduler on {runtime.host} {reason}:\n{tail(log)}",
                host=runtime.host,
                output=tail(log),
            )
        logger.info(
            "scheduler up on %s port %s after %.2f s (pid %s)", runtime, port, waited, info.pid
        )
        try:
            self.routing.route_scheduler(runtime, port)  # only now: it listens
        except (PortInUseError, GroupError) as exc:
            if not _port_taken(exc):
                raise
            logger.info("port %s was taken on the scheduler's route since the probe", port)
            self._stop(["scheduler"])
            self._scheduler_port = self._scheduler_bind = None
            return False
        self._log_output([info], debug)
        self.clients.connect_in_background()
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
        scheme = "tcp" if self.tls is None else "tls"
        return f"{scheme}://{host}:{self._scheduler_port}"

    @property
    def scheduler_port(self) -> int | None:
        return self._scheduler_port

    @property
    def scheduler_process(self) -> ProcessInfo | None:
        return self.table.get("scheduler")

    def stop_scheduler(self) -> None:
        if "scheduler" in self.table:
            self.clients.close_monitor()
        self._drop_scheduler()

    def _drop_scheduler(self) -> None:
        """Stop the scheduler (no client of ours is connected to it) and forget its address."""
        if "scheduler" in self.table:
            self._stop(["scheduler"])
        self._scheduler_port = self._scheduler_bind = None

    # -- workers --------------------------------------------------------------------------

    def _launch_workers(
        self,
        placement: dict[str, list[str]],
        pool: list[int],
        used: dict[str, list[int]],
        debug: bool,
    ) -> dict[str, ProcessInfo]:
        """Start the workers of every host at once, one command per host."""
        specs = self._worker_specs(placement, pool, used)
        self.routing.forward_to_hosts(self.options.forward_ports)

        def start(runtime: Runtime) -> list[ProcessInfo]:
            folder = self.folder(runtime)
            with self._host_lock(runtime):
                infos = processes.start_processes(
                    runtime,
                    folder,
                    specs[runtime.host],
                    self._files("worker"),
                    self._guard(runtime),
                )
                for info in infos:
                    self._register(runtime, info)
            logger.info(
                "started on %s: %s",
                runtime.host,
                ", ".join(f"{i.name} (pid {i.pid})" for i in infos),
            )
            self._follow_logs(runtime, infos, debug)
            return infos

        started = fan_out("start workers", [self.runtime(h) for h in specs], start)
        return {info.name: info for infos in started.values() for info in infos}

    def _worker_specs(
        self, placement: dict[str, list[str]], pool: list[int], used: dict[str, list[int]]
    ) -> dict[str, list[ProcessSpec]]:
        routing, options = self.routing, self.options
        per_worker = 2 if options.nanny else 1
        specs: dict[str, list[ProcessSpec]] = {}
        for host, names in placement.items():
            runtime = self.runtime(host)
            _, local, taken = self._taken(runtime)
            count, where = per_worker * len(names), f"for workers on {host}"
            links = getattr(routing, "links", None)
            if links is not None and links.granted:  # ports the links' keys carry here first
                own = links.granted.get(host, frozenset())
                pool = sorted(pool, key=lambda p: p not in own)
            chosen = free_ports(pool, taken, count, where)
            while local and (lost := [p for p in chosen if not bindable_here(p)]):
                taken |= set(lost)  # taken here since the probe (an outgoing connection)
                chosen = free_ports(pool, taken, count, where)
            self._reserve(runtime, chosen)
            used.setdefault(host, []).extend(chosen[::per_worker])
            resources = options.resources
            if callable(resources):
                resources = resources(runtime)
            folder = self.folder(runtime)
            tls = self.tls.paths(folder, "worker") if self.tls is not None else None
            pinned = self._pin_gpus(host, names)
            specs[host] = []
            for i, name in enumerate(names):
                env = {**self._code_env(runtime), **options.env}
                mine = dict(resources or {})
                if name in pinned:  # its own GPU, and a resource tasks can ask for
                    env["CUDA_VISIBLE_DEVICES"] = str(pinned[name])
                    mine["GPU"] = 1
                argv = worker_argv(
                    options.python(runtime),
                    self.scheduler_address or "",
                    name,
                    folder,
                    options,
                    address=routing.bind_address(runtime),
                    port=chosen[i * per_worker],
                    nanny_port=chosen[i * per_worker + 1] if options.nanny else None,
                    loopback=routing.loopback,
                    resources=mine or None,
                    tls=tls,
                )
                specs[host].append(
                    ProcessSpec(
                        name,
                        argv,
                        env=server_env(folder, env),
                        ports=chosen[i * per_worker : (i + 1) * per_worker],
                        setup=options.setup_on(host),
                    )
                )
        return specs

    def _pin_gpus(self, host: str, names: list[str]) -> dict[str, int]:
        """A GPU of ``host`` no worker of the cluster holds, for each of ``names``."""
        gpus = self.gpus(host)
        if not gpus:
            return {}
        try:
            return self.table.pin(host, names, gpus)
        except ValueError as exc:
            raise WorkerStartError(str(exc)) from None

    def _finish_workers(
        self,
        started: dict[str, ProcessInfo],
        pool: list[int],
        used: dict[str, list[int]],
        debug: bool,
    ) -> None:
        """Wait for the started workers; start again those that lost their port at bind time
        or their first connection to the scheduler, and all of them when a port of theirs was
        taken since the probe where a forward puts it (another cluster's forward, say)."""
        for _ in range(PORT_RETRIES):
            try:  # routed while they register: they dial out first
                with self.routing.while_registering(self.worker_processes):
                    raced = self._wait_for_workers(started, self.options.start_timeout)
            except (PortInUseError, GroupError) as exc:
                if not _port_taken(exc):
                    raise
                logger.info("a route's port was taken since the probe; workers move: %s", exc)
                self._stop(list(started))  # none of their routes is open (route_workers)
                for info in started.values():
                    if info.ports[0] in used.get(info.host, []):
                        used[info.host].remove(info.ports[0])
                pool = [p for p in pool if p not in _ports_named(exc)]  # not again
                raced = list(started)
                started = self._launch_workers(_placement(started), pool, used, debug)
                continue
            if not raced:
                self._log_output(list(started.values()), debug)
                if not self._links_held:
                    self.routing.workers_up()
                return
            again = _placement({name: self.table[name] for name in raced})
            # they ended: the forwards made while they registered close (their ports are
            # another process's now), then they start again on other ports
            try:
                self.routing.unroute(self.table.known(raced))
            except GroupError as exc:  # only a forward left open: the cleanup closes it
                logger.warning("routes of %s not all closed: %s", ", ".join(raced), exc)
            for name in raced:
                self._forget(name)
            started = self._launch_workers(again, pool, used, debug)
        raise WorkerStartError(f"workers kept losing their ports to other processes: {raced}")

    def reroute(self, host: str) -> None:
        """``host`` answers again: give it the routes it missed."""
        if self._routes is not None:
            self._routes.reroute(host)

    def route_workers(self) -> None:
        """Tunnelled mode: make every started worker reachable from every node."""
        self.routing.route_workers(self.worker_processes())

    def worker_processes(self) -> list[ProcessInfo]:
        return self.table.workers()

    def worker_names(self) -> list[str]:
        """Our workers in the order they were started."""
        names = [i.name for i in self.worker_processes()]
        return sorted(names, key=lambda name: int(name.rsplit("-", 1)[1]))

    def host_of(self, name: str) -> str:
        return self.table[name].host

    def _wait_for_workers(self, started: dict[str, ProcessInfo], timeout: float) -> list[str]:
        """Wait until the scheduler lists every started worker. Returns the workers to start
        again (see ``startup.retriable``); raises WorkerStartError for other failures."""
        deadline = time.monotonic() + timeout
        pending = dict(started)
        next_check = time.monotonic() + LIVENESS_INTERVAL
        known = -1
        while True:
            count = self.clients.monitor().scheduler_info(n_workers=0)["n_workers"]  # cheap
            registered = self.registered() if count != known else {}
            known = count
            for name in [n for n in pending if n in registered]:
                pending.pop(name)
                logger.info("worker %s ready on %s", name, started[name].host)
                if self._check_early:
                    self._unchecked[name] = (started[name].host, registered[name]["address"])
                if self.on_progress is not None:
                    self.on_progress(len(started) - len(pending), len(started))
            self._check_as_registered()
            now = time.monotonic()
            if not pending:
                return []
            if now >= next_check or now >= deadline:
                next_check = now + LIVENESS_INTERVAL
                dead = self.table.dead(list(pending.values()))
                if dead or now >= deadline:
                    return self._start_failure(pending, dead, timeout, late=now >= deadline)
            time.sleep(0.05)

    def _check_as_registered(self) -> None:
        """The end-to-end check's part of the workers that registered, once they are routed
        (direct: at once; tunnelled: once every route of theirs was made)."""
        if not self._unchecked or not self.routing.routed_workers():
            return
        if self._early is None:
            self._early = PathCheck(self.clients.monitor(), self._here())
        for name, (host, address) in self._unchecked.items():
            self._early.add(name, host, address)
        self._unchecked.clear()

    def _here(self) -> str:
        """Where the scheduler runs, for messages."""
        return "this machine" if self._scheduler_host is None else self._scheduler_host

    def _start_failure(
        self, pending: dict[str, ProcessInfo], dead: list[str], timeout: float, late: bool
    ) -> list[str]:
        logs = self.table.logs(list(pending.values()), lines=None)
        raced = [n for n in dead if startup.retriable(logs.get(n, ""))]
        if raced and len(raced) == len(dead) and not late:
            for name in raced:
                logger.info(
                    "worker %s on %s exited at start (%s); starting it again",
                    name,
                    pending[name].host,
                    startup.first_error(logs.get(name, "")),
                )
            return raced
        failed = {n: pending[n].host for n in (dead or list(pending))}
        scheduler = self.table.get("scheduler")
        scheduler_log = self.table.logs([scheduler]).get("scheduler", "") if scheduler else None
        raise startup.worker_start_error(failed, logs, bool(dead), timeout, scheduler_log)

    # -- questions to the hosts and the scheduler -----------------------------------------

    def get_logs(self) -> dict[str, str]:
        """Every process's log by name ("scheduler", "<host>-<i>")."""
        return self.table.logs(self.table.all(), lines=None)

    def reach(self, host: str, timeout: float) -> None:
        """One bounded round trip to ``host``; raises when it does not answer."""
        self.runtime(host).connection.check("true", timeout=timeout)

    def liveness(self, names: Sequence[str], timeout: float) -> dict[str, str]:
        """name -> "alive", "gone", or "unreachable: why" (each host asked once, bounded)."""
        return self.table.liveness(names, timeout)

    def registered(self, timeout: float = IDENTITY_TIMEOUT) -> dict[str, dict[str, Any]]:
        """Workers the scheduler lists, by name (a bounded question)."""
        return self.clients.registered(timeout)

    def scheduler_ok(self) -> bool:
        """Whether the scheduler still serves: free while the monitor client is connected;
        otherwise one liveness round trip to the scheduler's host decides."""
        if self.clients.connected:
            return True
        info = self.table.get("scheduler")
        if info is None:
            self.failure = self.failure or "the scheduler is not running"
            return False
        try:
            dead = bool(self.table.dead([info]))
        except LazyclusterError as exc:
            self.failure = f"the scheduler's host {info.host} cannot be reached: {exc}"
            return False
        if dead:
            self.failure = f"the scheduler (pid {info.pid} on {info.host}) is gone"
        return not dead

    @property
    def state(self) -> ClusterState:
        """See :class:`ClusterState`; a running cluster whose scheduler is gone is ``failed``
        (see ``failure``)."""
        if self._state is ClusterState.running and not self.scheduler_ok():
            self._state = ClusterState.failed
        return self._state

    @state.setter
    def state(self, value: ClusterState) -> None:
        self._state = ClusterState(value)

    @property
    def workers(self) -> dict[str, dict[str, Any]]:
        """Workers the scheduler currently knows: name -> host, pid, address ({} once the
        scheduler is gone: ``state`` then says "failed")."""
        if self.scheduler_address is None or not self.scheduler_ok():
            return {}
        try:
            registered = self.registered()
        except (OSError, TimeoutError) as exc:
            self.failure = f"the scheduler does not answer: {type(exc).__name__} {exc}"
            return {}
        return {
            name: {
                "host": self.table[name].host,
                "pid": self.table[name].pid,
                "address": w["address"],
            }
            for name, w in registered.items()
            if name in self.table
        }

    @property
    def dashboard_link(self) -> str | None:
        """The scheduler's dashboard, reachable from this machine (tunnelled when needed)."""
        if self.scheduler_address is None or not self.options.dashboard:
            return None
        with self._lock:
            if self._dashboard_port is None:
                info = self.clients.monitor().scheduler_info(n_workers=0)
                port = info.get("services", {}).get("dashboard")
                if port is None:
                    return None
                if self._scheduler_host is not None:
                    runtime = self.runtime(self._scheduler_host)
                    port = runtime.expose_port_from_runtime(int(port))
                self._dashboard_port = int(port)
        return f"http://127.0.0.1:{self._dashboard_port}/status"

    def _refresh_ports(self, hosts: Sequence[str] | None = None) -> None:
        """Probe the hosts' ports again (default: every host); a host that does not answer
        keeps its last probe (its workers cannot start there anyway, and it must not stop
        those elsewhere)."""
        runtimes = [rt for rt in self.group.runtimes if hosts is None or rt.host in hosts]
        try:
            used = fan_out("port probe", runtimes, lambda rt: rt.used_ports())
        except GroupError as exc:
            logger.debug("port probe incomplete: %s", exc)
            used = exc.results
        self.plan.used_ports.update(used)

    # -- bookkeeping ----------------------------------------------------------------------

    def _register(self, runtime: Runtime, info: ProcessInfo) -> None:
        self.table.add(runtime, info)

    def _forget(self, name: str) -> None:
        info = self.table.remove(name)
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
        for name, text in self.table.logs(infos).items():
            logger.debug("[%s] %s", name, text.rstrip())

    def _environments(self) -> None:
        """Each host gets this machine's environment (see ``ClusterEnvironments.make``): its
        interpreter for the cluster from then on."""
        self.options = self.envs.make(self.options, self.group.runtimes)

    def sync_code(self) -> dict[str, list[str]]:
        """Send the user's changed code to the hosts and have every running worker read it
        (new workers start with it): each host with an environment of ours gets the changed
        units and an environment naming them, and each worker points its sys.path at them and
        forgets the modules it loaded from the old ones; so does each nanny, whose sys.path a
        worker it starts again inherits. Returns worker address -> modules dropped there."""
        self.options, moves, folders = self.envs.resync(self.options, self.group.runtimes)
        if self.scheduler_address is None:
            return {}
        cloudpickle.register_pickle_by_value(code)  # workers need not import this package
        client = self.clients.monitor()
        if self.options.nanny:
            client.run(code.reload, moves, folders, nanny=True)
        return dict(client.run(code.reload, moves, folders))

    def _code_env(self, runtime: Runtime) -> dict[str, str]:
        here = runtime is self.controller or runtime.is_local
        return self.envs.code_env(runtime, here, self.options.env)

    # -- what the hosts' environments are (see ClusterEnvironments) ------------------------

    @property
    def environments(self) -> dict[str, HostEnvironment]:
        return self.envs.environments

    @property
    def manifest(self) -> Manifest | None:
        return self.envs.manifest

    def _link_ports(self) -> dict[str, list[int]]:
        """Host -> the ports the links' keys may carry to it (sshd fixes them when a key logs
        in): its workers' ports now, and the next ones its new workers would take — two slots'
        worth per worker it can hold (a nanny's port included), none given to two hosts. New
        workers of a host take its own first."""
        with self._lock:
            used: dict[str, set[int]] = {h: set() for h in self.group.hosts}
            for info in self.table.all():
                if info.role == "worker":
                    used.setdefault(info.host, set()).add(info.ports[0])
            slots = {h: self.slots(h) for h in self.group.hosts}
        taken = self.plan.taken(self.group.hosts, include_local=True) | self.pool.held()
        per_worker = 2 if self.options.nanny else 1
        spare = iter(p for p in self.ports if p not in taken)
        return {
            host: sorted(used[host] | set(itertools.islice(spare, 2 * per_worker * slots[host])))
            for host in self.group.hosts
        }

    def _host_lock(self, runtime: Runtime) -> threading.Lock:
        """Held while processes start or stop on ``runtime`` (a stop that leaves it without a
        process of the cluster removes its folder: no start may be half-way there)."""
        with self._lock:
            return self._host_locks.setdefault(self._key(runtime), threading.Lock())

    def _revoke(self, runtime: Runtime, alone: bool = False) -> Revoke | None:
        """The links' keys a stop removes from ``runtime``'s authorized_keys (where any may
        be): every line of the cluster's, or (``alone``: the cluster goes on elsewhere) those
        that let keys into this host (its home may be other hosts' too)."""
        links = getattr(self._routes, "links", None)
        if runtime.is_local or links is None or runtime.host not in links.touched:
            return None
        marker = link_commands.peer_marker(self.cluster_id)
        if alone:
            marker = link_commands.key_scope(marker, runtime.host)
        return Revoke(self.options.python(runtime), marker)

    def _guard(self, runtime: Runtime) -> Guard:
        """What the guard of ``runtime``'s cluster folder runs with (see hostside.guard): on
        a host, the lines that let the links' keys in go with it (where links may come)."""
        links = self.options.host_links and not runtime.is_local
        marker = link_commands.key_scope(link_commands.peer_marker(self.cluster_id), runtime.host)
        return Guard(
            self.options.python(runtime),
            marker if links else "",
            runtime.working_dir if runtime.working_dir_is_temp else "",
        )

    def _files(self, role: str) -> dict[str, str]:
        """Files a start delivers into the cluster folder (the role's certificates)."""
        return self.tls.files(role) if self.tls is not None else {}

    def _key(self, runtime: Runtime) -> str:
        return CONTROLLER_KEY if runtime is self.controller else runtime.host

    # -- the one stop path ----------------------------------------------------------------

    def stop(self, names: Sequence[str]) -> None:
        """Stop these processes (all hosts at once); a host that fails keeps them on record."""
        self._stop(list(names))

    def stop_workers(self) -> None:
        self._stop([i.name for i in self.worker_processes()])

    def kill_workers(self) -> None:
        """KILL every worker's process group, all hosts at once, without waiting for them to
        end: a close does this before the scheduler closes, which would otherwise tell each
        worker to close (their shutdowns then compete for the hosts' CPUs with the kill that
        follows). The cleanup after it verifies; a host that does not answer now, or fails
        here, is left to it (a short wait: this only saves time)."""
        away = set(self.unreachable())
        jobs = self.table.by_owner([i for i in self.worker_processes() if i.host not in away])

        def kill(job: tuple[Runtime, list[ProcessInfo]]) -> None:
            runtime, infos = job
            processes.kill_now(runtime, infos, processes.folder_marker(self.folder(runtime)))

        try:
            run_parallel("kill workers", jobs, kill)
        except GroupError as exc:
            for host, error in exc.errors.items():
                logger.info("workers on %s not killed ahead of the cleanup: %s", host, error)

    def _stop(
        self,
        names: list[str],
        remove_folders: bool = False,
        grace: float | None = None,
        closing: SchedulerClose | None = None,
    ) -> None:
        """Stop processes grouped by runtime, all runtimes at once, one round trip each; verify
        none survived. ``remove_folders`` (cleanup) also removes the cluster folder — or the
        whole working dir when it is a temporary one — in that same round trip. ``grace``:
        seconds between TERM and KILL (default: the options' ``stop_grace``). ``closing``: the
        scheduler is closing itself meanwhile: the workers are KILLed first, in the same round
        trip, and the scheduler's host is stopped once that close ended (a scheduler that said
        it closed is KILLed too: what is left is its interpreter's exit, ~0.1 s)."""
        grace = self.options.stop_grace if grace is None else grace
        infos = self.table.known(names)
        jobs = self.table.by_owner(infos)
        if remove_folders:
            for owner in [self.controller, *self.group.runtimes]:
                if owner.has_working_dir:
                    jobs.setdefault(self._key(owner), (owner, []))
        workers = {i.name for i in self.worker_processes()} if closing is not None else set()
        scheduler = self.table.key_of("scheduler")

        def stop(job: tuple[Runtime, list[ProcessInfo]]) -> None:
            runtime, infos = job
            kill = set(workers)
            if closing is not None and self._key(runtime) == scheduler:
                closing.join(CLOSE_WAIT)  # its own close ends it sooner than a TERM would
                if closing.closed:
                    kill.add("scheduler")
            kill_first = [i.pid for i in infos if i.name in kill]
            self._stop_on(runtime, infos, names, remove_folders, grace, kill_first)

        failed: set[str] = set()
        try:
            run_parallel("stop processes", jobs, stop)
        except GroupError as exc:
            failed = set(exc.errors)
            raise
        finally:
            if remove_folders:  # hosts a failed start left before their folder was made
                self._release_envs([rt for rt in self.group.runtimes if rt.host not in jobs])
            # a host that failed keeps its processes on record; the routes of the others close
            # before they are forgotten (a cleanup closes every tunnel itself)
            gone = [n for n in names if self.table.key_of(n) not in failed]
            try:
                if self._routes is not None and not remove_folders:
                    self._routes.unroute(self.table.known(gone))
            finally:
                for name in gone:
                    self._forget(name)
            self._release_ports([i for i in infos if i.name not in self.table])

    def _stop_on(
        self,
        runtime: Runtime,
        infos: list[ProcessInfo],
        names: list[str],
        remove_folders: bool,
        grace: float,
        kill_first: list[int],
    ) -> None:
        """:meth:`_stop`'s round trip to one runtime: its folder's stop (cleanup, or the last
        of the cluster's processes there), else these processes' stop."""
        folder = self.folder(runtime)
        with self._host_lock(runtime):  # no start there meanwhile
            with self._lock:
                key = self._key(runtime)
                emptied = not any(
                    self.table.key_of(n) == key for n in self.table.names() if n not in names
                )
            if remove_folders:  # every pid file there: a start's whose answer was lost too
                remove = runtime.working_dir if runtime.working_dir_is_temp else folder
                revoke = self._revoke(runtime)
                left = processes.stop_folder(runtime, folder, grace, remove, revoke, kill_first)
                if runtime.working_dir_is_temp:
                    runtime.forget_working_dir()  # removed here; its cleanup needs not
            elif emptied:  # no process of the cluster left there: clean up as its guard would
                revoke = self._revoke(runtime, alone=True)
                left = processes.stop_folder(runtime, folder, grace, folder, revoke)
            else:
                marker = processes.folder_marker(folder)
                left = processes.stop_processes(runtime, infos, marker, grace)
        if left:
            raise LazyclusterError(f"process groups {left} survived SIGKILL on {runtime.host}")
        if infos:
            logger.info("stopped on %s: %s", runtime.host, ", ".join(i.name for i in infos))

    def _release_envs(self, runtimes: Sequence[Runtime]) -> None:
        """Let go of the environments the cluster holds on ``runtimes`` (where the cluster
        folder's stop did not: see processes.stop_folder); a host that does not answer keeps
        the hold until it expires (hostside.envs.LEASE)."""
        asked = [rt for rt in runtimes if rt.host in self.envs.asked]
        if not asked:
            return
        line = commands.release_env(self.folder_name)
        try:
            fan_out("release environments", asked, lambda rt: rt.connection.run(line, timeout=30))
        except GroupError as exc:
            logger.info("environments still held until their lease ends: %s", exc)

    def _release_ports(self, stopped: list[ProcessInfo]) -> None:
        """Ports of stopped workers (their forwards closed) serve the next workers."""
        for info in stopped:
            if info.role != "worker":
                continue
            self.pool.give_back(info.ports)

    def stop_all(self, grace: float | None = None, close_scheduler: bool = False) -> None:
        """Close the clients, stop every process on every host at once and remove the cluster
        folders. Raises when a host failed; its processes stay on record for a retry.
        ``grace``: as for :meth:`_stop`. ``close_scheduler`` (a running cluster's close): the
        scheduler is asked to close itself while the hosts KILL their workers, all at once
        (on a TERM its shutdown outlasts the grace; the workers', told by it, too)."""
        if self._state is ClusterState.cleanup_failed:  # a retry: reach the hosts again
            for runtime in self.group.runtimes:
                runtime.reopen()
        self.state = ClusterState.stopping
        self._drop_early_check()  # a start's check that was not waited for
        closing = None
        if close_scheduler:
            closing = SchedulerClose(self.clients)
            closing.start()
        else:
            self.clients.close()
        routes = self._routes
        if routes is not None:
            routes.start_closing()  # nothing starts any more; what is under way ends meanwhile
        try:
            self._stop(self.table.names(), remove_folders=True, grace=grace, closing=closing)
        finally:
            if closing is not None:
                closing.join(CLOSE_WAIT)
            if self._masters is not None:  # none starts after the connections close
                self._masters.join()
            if routes is not None:
                routes.wait_closed()  # before the connections it uses close

    def cleanup(self, grace: float | None = None) -> None:
        """:meth:`stop_all`, then release every connection and tunnel; verified."""
        error: BaseException | None = None
        try:
            self.stop_all(grace)
        except Exception as exc:  # hosts that failed keep their processes on record
            error = exc
        self.release(error)

    def release(self, error: BaseException | None = None) -> None:
        """Close the group's and this machine's connections; record the outcome of a stop."""
        try:
            self.group.cleanup()
        except Exception as exc:
            error = error or exc
        finally:
            self.controller.cleanup()
        if error is not None:
            self.state = ClusterState.cleanup_failed
            left = sorted({i.host or "this machine" for i in self.table.all()})
            logger.error("cleanup incomplete: processes kept on record on %s", ", ".join(left))
            raise error
        self.state = ClusterState.stopped

    # -- the record -----------------------------------------------------------------------

    def record(self) -> ClusterRecord:
        """This cluster as frozen plain data: enough to find, show and stop it later (no
        secrets); ``teardown(record)`` stops it from that alone."""
        owners = [self.controller, *self.group.runtimes]
        folders = {
            self._key(rt): FolderRecord(
                folder=self.folder(rt),
                working_dir=rt.working_dir,
                temporary=rt.working_dir_is_temp,
                python=self.options.python(rt),
            )
            for rt in owners
            if rt.has_working_dir
        }
        tunnels = [
            TunnelRecord(
                host=rt.host, kind=t.kind, local_port=t.local_port, remote_port=t.remote_port
            )
            for rt in self.group.runtimes
            for t in rt.tunnels
        ]
        return ClusterRecord(
            cluster_id=self.cluster_id,
            state=self.state,
            network_mode=self.network_mode,
            network_paths=dict(self._plan.paths) if self._plan else {},
            network_reasons=list(self._plan.reasons) if self._plan else [],
            failure=self.failure,
            hosts=[HostSpec.of(rt) for rt in self.group.runtimes],
            scheduler_host=self._scheduler_host,
            scheduler_address=self.scheduler_address,
            dashboard_link=(
                f"http://127.0.0.1:{self._dashboard_port}/status" if self._dashboard_port else None
            ),
            processes=self.table.all(),
            folders=folders,
            tunnels=tunnels,
        )


def _port_taken(exc: BaseException) -> bool:
    """The error only says a port was taken (on one host, or on each that failed)."""
    if isinstance(exc, GroupError):
        return all(isinstance(e, PortInUseError) for e in exc.errors.values())
    return isinstance(exc, PortInUseError)


def _ports_named(exc: BaseException) -> set[int]:
    """The ports a PortInUseError names (on one host, or on each host of a GroupError)."""
    errors = exc.errors.values() if isinstance(exc, GroupError) else [exc]
    return {e.port for e in errors if isinstance(e, PortInUseError)}


def _placement(started: dict[str, ProcessInfo]) -> dict[str, list[str]]:
    """Host -> the names of these workers (in their order)."""
    placement: dict[str, list[str]] = {}
    for name, info in started.items():
        placement.setdefault(info.host, []).append(name)
    return placement
