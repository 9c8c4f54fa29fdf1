"""LazySSHCluster: a ``distributed.deploy.SpecCluster`` on SSH hosts that replaces lost workers.

One process object for the scheduler (:class:`SSHScheduler`) and one per worker
(:class:`SSHWorker`), in the shape of ``distributed.deploy.ProcessInterface``. Both drive the
cluster's :class:`~lazycluster_tasks.engine.Engine`: the network probe and routing, detached
processes with pid files, readiness, the record and the verified cleanup. Blocking SSH work
runs in threads, never on the event loop.

Placement follows capacity (each host's ``workers_per_host``, or one worker per GPU);
``scale`` and ``adapt`` stay within it. Lost workers are replaced by the cluster's
:class:`~lazycluster_tasks.healing.Healer`, which sits beside it as ``Adaptive`` does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from distributed.core import Status
from distributed.deploy.spec import ProcessInterface, SpecCluster
from distributed.utils import sync

from lazycluster_tasks import control, integrations
from lazycluster_tasks.attached import AttachedCluster
from lazycluster_tasks.checks import check_count, check_seconds
from lazycluster_tasks.cluster import MasterWorkerCluster
from lazycluster_tasks.dask_options import WORKERS_PER_HOST, DaskOptions
from lazycluster_tasks.deprecation import renamed
from lazycluster_tasks.engine import Engine
from lazycluster_tasks.environments import HostEnvironment
from lazycluster_tasks.errors import LazyclusterError, WorkerStartError
from lazycluster_tasks.group import RuntimeGroup, fan_out
from lazycluster_tasks.healing import REACH_TIMEOUT, Healer, HostAvailability
from lazycluster_tasks.network import NetworkMode
from lazycluster_tasks.ports import as_port_list
from lazycluster_tasks.record import ClusterRecord, ClusterState
from lazycluster_tasks.settings import settings

logger = logging.getLogger(__name__)

#: A host unreachable this long is reported as lost (it is still tried, less often).
HOST_LOST_AFTER = 120.0
#: The scheduler drops a worker whose heartbeats stopped this long (a host cut off the network).
WORKER_TTL = 10.0
#: The scheduler's first choice of port (Dask's), then the cluster's ports.
SCHEDULER_PORT = 8786
#: Default ports for the cluster's processes (lazycluster's range).
PORTS = range(
    MasterWorkerCluster.DEFAULT_PORT_RANGE_START, MasterWorkerCluster.DEFAULT_PORT_RANGE_END
)
#: Seconds the scheduler has to come up.
SCHEDULER_TIMEOUT = 30.0


T = TypeVar("T")


async def _off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``asyncio.to_thread`` for the close: ``fn`` in a thread of its own, not the loop's
    executor, which takes no work once the interpreter exits (when distributed closes the
    clusters left open)."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    context = contextvars.copy_context()

    def run() -> None:
        try:
            future.set_result(context.run(fn, *args))
        except BaseException as exc:  # the awaiting task raises it
            future.set_exception(exc)

    threading.Thread(target=run, name="lct-close", daemon=True).start()
    return await asyncio.wrap_future(future)


class SSHScheduler(ProcessInterface):
    """The scheduler process (here or on a host). Starting it also launches the cluster's first
    workers, so they boot while the scheduler does; they are awaited by their SSHWorker."""

    def __init__(self, launcher: WorkerLauncherLoop, initial: dict[str, list[str]]) -> None:
        super().__init__()
        self.launcher = launcher
        self.initial = initial

    async def start(self) -> None:
        engine = self.launcher.engine
        loop = asyncio.get_running_loop()
        up = asyncio.Event()

        def scheduler_up() -> None:
            loop.call_soon_threadsafe(up.set)

        engine.on_scheduler_up = scheduler_up
        self.launcher.first_names = {n for names in self.initial.values() for n in names}
        first = loop.run_in_executor(None, self.launcher.start_first, self.initial)
        self.launcher.first = first
        waiter: asyncio.Future[Any] = asyncio.ensure_future(up.wait())
        pending: list[asyncio.Future[Any]] = [waiter, first]
        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not up.is_set():
            await first  # raises why the scheduler did not come up
        self.address = engine.scheduler_address
        await super().start()

    async def close(self) -> None:
        """Stop everything the cluster still runs on every host and release the connections."""
        try:
            first = self.launcher.first
            if first is not None and not first.done():
                await asyncio.wait([first])
            # after the workers were killed and the scheduler terminated, what is left is
            # killed at once; else TERM and the grace
            killed = self.launcher.workers_killed
            await _off_loop(self.launcher.engine.cleanup, 0.0 if killed else None)
        except Exception as exc:  # the engine keeps what it could not stop on record
            self.launcher.cleanup_error = exc
            logger.error("cluster cleanup incomplete: %s", exc)
        await super().close()


class SSHWorker(ProcessInterface):
    """One Dask worker (with its nanny) on one host, named ``<host>-<n>``."""

    def __init__(
        self, scheduler: str, name: str, host: str, launcher: WorkerLauncherLoop, **_: Any
    ) -> None:
        super().__init__(scheduler, name)
        self.name, self.host, self.launcher = name, host, launcher

    async def start(self) -> None:
        why = await self.launcher.start(self.name, self.host)
        if why and self.launcher.closing:  # the cluster's close stopped it: no failure
            logger.debug("worker %s on %s stopped by the close as it started", self.name, self.host)
            await super().start()  # as SpecCluster expects; its close closes it again
            return
        if why:
            self.status = Status.failed
            raise WorkerStartError(f"worker {self.name} on {self.host} did not start: {why}")
        await super().start()

    async def close(self) -> None:
        await self.launcher.stop(self.name, self.host)
        await super().close()

    def __repr__(self) -> str:
        return f"<SSHWorker {self.name} on {self.host}: {self.status.name}>"


class WorkerLauncherLoop:
    """Starts and stops worker processes for the process objects, off the event loop.

    Workers that a SpecCluster opens in one step start as one batch: one command per host, all
    hosts at once. A worker on a host that does not answer is stopped once it does."""

    def __init__(
        self,
        engine: Engine,
        scheduler_host: str | None,
        scheduler_timeout: float,
        hosts: HostAvailability,
    ) -> None:
        self.engine = engine
        self.hosts = hosts
        self.scheduler_host = scheduler_host
        self.scheduler_timeout = scheduler_timeout
        #: The first workers, started with the scheduler (and their names).
        self.first: asyncio.Future[None] | None = None
        self.first_names: set[str] = set()
        self.cleanup_error: BaseException | None = None
        #: The whole cluster closes: the scheduler's close stops every process at once.
        self.closing = False
        #: The scheduler answered at the close: the workers were killed ahead of its
        #: terminate, and the cleanup kills what is left at once.
        self.workers_killed = False
        self.started: set[str] = set()  # workers that started and registered
        self._batch: dict[str, tuple[str, asyncio.Future[str | None]]] = {}
        self._flush: asyncio.Future[None] | None = None

    def start_first(self, placement: dict[str, list[str]]) -> None:
        """(thread) Scheduler and first workers at once; then the end-to-end check."""
        engine = self.engine
        engine.state = ClusterState.starting
        host = self.scheduler_host
        check = bool(self.first_names)  # now: each SSHWorker takes its name out as it awaits us
        with engine.links_after():
            engine.start(
                placement,
                scheduler_on=engine.controller if host is None else engine.runtime(host),
                scheduler_ports=[SCHEDULER_PORT, *(p for p in engine.ports if p != SCHEDULER_PORT)],
                timeout=self.scheduler_timeout,
                checked=check,
            )
            if check:
                engine.verify_paths()
        engine.state = ClusterState.running

    async def start(self, name: str, host: str) -> str | None:
        """Start one worker (batched with its siblings); why it failed, or None."""
        if name in self.first_names and self.first is not None:
            self.first_names.discard(name)
            await self.first  # raises when the cluster's start failed
            self.started.add(name)
            return None
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._batch[name] = (host, future)
        if self._flush is None:
            self._flush = asyncio.ensure_future(self._start_batch())
        why = await future
        if why is None:
            self.started.add(name)
        return why

    async def _start_batch(self) -> None:
        await asyncio.sleep(0)  # the other workers of this step join the batch
        batch, self._batch, self._flush = self._batch, {}, None
        placement: dict[str, list[str]] = {}
        for name, (host, _) in batch.items():
            placement.setdefault(host, []).append(name)
        try:
            failed = await asyncio.to_thread(self.engine.try_start_workers, placement)
        except Exception as exc:
            failed = {name: f"{type(exc).__name__}: {exc}" for name in batch}
        for name, (_, future) in batch.items():
            if not future.done():
                future.set_result(failed.get(name))

    async def stop(self, name: str, host: str) -> None:
        """Stop one worker; on a host that does not answer it is stopped once it does."""
        if self.closing:  # one cleanup for all: no per-worker stops and route closings first
            return
        if host in self.hosts.down:
            self.hosts.stale.setdefault(host, []).append(name)
            return
        try:
            await _off_loop(self.engine.stop, [name])
        except Exception as exc:
            logger.warning(
                "worker %s on %s not stopped yet (%s); trying again later", name, host, exc
            )
            self.hosts.leave_for_later(host, name)


class LazySSHCluster(SpecCluster):
    """A Dask cluster on SSH hosts, in the family of ``SSHCluster`` and dask-jobqueue.

    ``LazySSHCluster(["h1", "h2"], workers_per_host=2)`` starts a scheduler here and two workers
    on each host; ``Client(cluster)``, ``scale(n)``, ``adapt(minimum, maximum)``,
    ``get_logs()``, ``dashboard_link``, ``close()``, ``async with`` and the notebook widget work
    as with any ``distributed`` cluster, and ``DaskTaskRunner(cluster_class=
    "lazycluster_tasks.LazySSHCluster", cluster_kwargs={...}, adapt_kwargs={...})`` runs a flow
    on it. Every argument is plain data.

    Parameters
    ----------
    hosts
        SSH aliases or host names.
    ssh_config_path, connection_kwargs
        How to reach them (OpenSSH config; paramiko's connect keywords, e.g. a key file).
    host_group, ssh_block
        Names of settings an orchestrator keeps (Prefect blocks, see ``integrations``): the
        group's hosts and its ``workers_per_host``, ``network_mode`` and ``python`` apply
        unless given here.
    n_workers
        Workers to start with (default: the capacity).
    workers_per_host
        One count for every host, or host -> count (hosts not named: 1). The capacity is
        their sum (one worker per GPU instead where ``gpus`` applies).
    prelaunch
        More worker processes started with the scheduler and joined by the next ``scale()``
        (a step-by-step start loses no time); at most what the capacity leaves.
    python
        The interpreter on the hosts: one path, or host -> path (default: an environment
        like this machine's, made on each host; see ``environment``).
    scheduler_host, scheduler_timeout
        A host to run the scheduler on (default: this machine); seconds it has to come up
        (default 30).
    ports
        The ports the cluster's processes may use (default: lazycluster's range).
    worker_ttl
        Seconds after which the scheduler drops a silent worker (then replaced).
    host_lost_after
        Seconds after which a host that does not answer is reported lost (default 120; it
        is still asked, and used again once it answers).
    heal
        Replace lost workers (default True; see :class:`~lazycluster_tasks.healing.Healer`).
    prefect_api
        Give the workers the environment of the orchestrator run that starts the cluster
        (default: when one runs; False: never).
    on_environment
        Called with (hosts ready, hosts to make ready) as each host's environment is
        checked or made.
    asynchronous, loop, name, silence_logs
        As for any ``SpecCluster``.
    **options
        :class:`~lazycluster_tasks.dask_options.DaskOptions`: ``network_mode``,
        ``threads_per_worker``, ``memory_limit``, ``env``, ``resources``,
        ``worker_options``/``scheduler_options`` (SSHCluster's list or dict form),
        ``worker_class``, ``gpus``, ``setup``, ``environment``, ``security``,
        ``host_links`` (False leaves every ``~/.ssh/authorized_keys`` untouched), ...
    """

    def __init__(
        self,
        hosts: Sequence[str] | None = None,
        *,
        ssh_config_path: str | None = None,
        connection_kwargs: Mapping[str, Any] | None = None,
        host_group: str | None = None,
        ssh_block: str | None = None,
        n_workers: int | None = None,
        prelaunch: int = 0,
        workers_per_host: int | Mapping[str, int] | None = None,
        python: str | Mapping[str, str] | None = None,
        scheduler_host: str | None = None,
        ports: Sequence[int] | None = None,
        scheduler_timeout: float | None = None,
        worker_ttl: float = WORKER_TTL,
        host_lost_after: float = HOST_LOST_AFTER,
        heal: bool = True,
        prefect_api: bool | None = None,
        on_environment: Callable[[Sequence[HostEnvironment], int], None] | None = None,
        asynchronous: bool = False,
        loop: Any = None,
        name: str | None = None,
        silence_logs: int | bool = False,
        **options: Any,
    ) -> None:
        where = integrations.resolve(
            hosts, host_group, ssh_block, ssh_config_path, connection_kwargs
        )
        hosts, config, kwargs, defaults = (
            where.hosts,
            where.ssh_config_path,
            where.connection_kwargs,
            where.defaults,
        )
        if workers_per_host is None:  # the host group's, else one per host
            workers_per_host = defaults.get("workers_per_host", WORKERS_PER_HOST)
        if isinstance(workers_per_host, Mapping):
            unknown = [h for h in workers_per_host if h not in list(hosts or [])]
            if unknown:
                raise ValueError(f"workers_per_host names hosts not in the cluster: {unknown}")
        options = {**defaults, **options}
        given = {"python": python, "python_executable": options.pop("python_executable", None)}
        python = renamed(given, "python_executable", "python")  # warned: the old name
        python = options.pop("python", None) if python is None else python  # else the group's
        options.pop("python", None)
        if python is not None:
            options["python_executable"] = python
        options["workers_per_host"] = workers_per_host
        check_seconds("worker_ttl", worker_ttl)
        check_seconds("host_lost_after", host_lost_after)
        env = dict(options.pop("env", None) or {})
        env.setdefault("DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL", f"{worker_ttl}s")
        forwards = list(options.pop("forward_ports", ()) or ())
        #: the orchestrator whose run started this cluster (its env for the workers, its
        #: logs collected before they stop): see integrations
        self._integration = integrations.active() if prefect_api is not False else None
        if prefect_api and self._integration is None:
            self._integration = next(iter(integrations.loaded()), None)
        if self._integration is not None:
            run_env, run_ports = self._integration.worker_env()
            env = {**run_env, **env}
            forwards = [*run_ports, *forwards]
        dask_options = DaskOptions.of({**options, "env": env, "forward_ports": forwards})
        group = RuntimeGroup(hosts=list(hosts), ssh_config_path=config, connection_kwargs=kwargs)
        try:
            if scheduler_host is not None:
                group.get_runtime(scheduler_host)  # ValueError if not one of the hosts
            chosen = as_port_list(list(ports)) if ports else settings().port_list(PORTS)
            engine = Engine(group, dask_options, chosen)
        except BaseException:
            group.cleanup()
            raise
        engine.envs.on_environment = on_environment
        self.engine = engine
        self.hosts = group.hosts
        self.workers_per_host = workers_per_host
        try:  # GPUs asked for: the hosts say how many they have (their facts, in parallel)
            if dask_options.gpus is not None:
                fan_out("host facts", group.runtimes, lambda rt: rt.info)
            self._slots = {h: engine.slots(h) for h in group.hosts}
        except BaseException:
            engine.cleanup()
            raise
        self.heal = heal
        timeout = SCHEDULER_TIMEOUT if scheduler_timeout is None else scheduler_timeout
        #: hosts that do not answer now (kept by the healer, asked by placement and stops)
        self.availability = HostAvailability()
        self.launcher = WorkerLauncherLoop(
            engine, scheduler_host, max(1.0, timeout), self.availability
        )
        engine.unreachable = lambda: set(self.availability.down)
        self._count = 0
        self.worker_ttl = float(worker_ttl)
        self.host_lost_after = float(host_lost_after)
        #: replaces lost workers, beside the cluster as Dask's Adaptive is (``heal=True``)
        self.healer = Healer(self, self.availability, self.worker_ttl, self.host_lost_after)
        #: Called with (event, details) on "worker-lost" and "worker-replaced" (e.g. to send
        #: Prefect events); an exception from it is logged, never raised into the healing.
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None
        first = self.capacity if n_workers is None else n_workers
        check_count("n_workers", first)
        if first > self.capacity:
            raise ValueError(
                f"n_workers={first} exceeds the capacity of {self.capacity} "
                f"(workers per host: {self._slots})"
            )
        check_count("prelaunch", prelaunch)
        prelaunch = min(prelaunch, self.capacity - first)  # a head start, never more
        workers: dict[str, Any] = {}
        placement: dict[str, list[str]] = {}
        #: started with the scheduler, adopted by the next scale() (see ``prelaunch``)
        self._adoptable: list[dict[str, Any]] = []
        for index in range(first + prelaunch):
            spec = self._spec_on(self._place({**workers, **self._spec_of(self._adoptable)}))
            if index < first:
                workers.update(spec)
            else:
                self._adoptable.append(spec)
            for worker, value in spec.items():
                placement.setdefault(value["options"]["host"], []).append(worker)
        scheduler = {
            "cls": SSHScheduler,
            "options": {"launcher": self.launcher, "initial": placement},
        }
        try:
            super().__init__(
                workers=workers,
                scheduler=scheduler,
                worker={"cls": SSHWorker, "options": {}},
                asynchronous=asynchronous,
                loop=loop,
                name=name or f"LazySSHCluster-{engine.cluster_id}",
                silence_logs=silence_logs,
                security=engine.security,
            )
        except BaseException:
            engine.cleanup()
            runner = getattr(self, "_loop_runner", None)
            if runner is not None and not getattr(self, "called_from_running_loop", True):
                # distributed stops the loop it started only when a later step fails, not when
                # the start itself does: its thread (and the executor's) would stay
                runner.stop()
            raise
        if self.launcher.cleanup_error is not None:
            raise self.launcher.cleanup_error

    # -- placement and capacity -----------------------------------------------------------

    @property
    def capacity(self) -> int:
        """How many workers the hosts take: the sum of each host's (workers_per_host, or one
        per GPU where GPUs are used)."""
        return sum(self._slots.values())

    def _place(self, specs: Mapping[str, Any], prefer: str | None = None) -> str | None:
        """The host for one more worker: ``prefer`` if it has room, else the answering host
        with the fewest workers; None when every answering host is full."""
        load = {host: 0 for host in self.hosts}
        for spec in specs.values():
            load[spec["options"]["host"]] += 1
        room = [
            h for h in self.hosts if load[h] < self._slots[h] and h not in self.availability.down
        ]
        if prefer in room:
            return prefer
        return min(room, key=lambda h: load[h]) if room else None

    def _spec_on(self, host: str | None) -> dict[str, Any]:
        if host is None:
            raise ValueError("no host has room for another worker")
        name = f"{host}-{self._count}"
        self._count += 1
        return {name: {"cls": SSHWorker, "options": {"host": host, "launcher": self.launcher}}}

    @staticmethod
    def _spec_of(specs: list[dict[str, Any]]) -> dict[str, Any]:
        return {name: value for spec in specs for name, value in spec.items()}

    def new_worker_spec(self) -> dict[str, Any]:
        if self._adoptable:  # already started with the scheduler
            return self._adoptable.pop(0)
        return self._spec_on(self._place({**self.worker_spec, **self._spec_of(self._adoptable)}))

    def wait_started(self) -> None:
        """Block until every worker of the spec has started and registered (raises why one
        did not); for sync code after ``scale(n)``."""
        self.sync(self._correct_state)

    def scale(self, n: int = 0, memory: Any = None, cores: Any = None) -> Any:
        """Grow or shrink to ``n`` workers, at most the capacity (more is logged and capped)."""
        if memory is not None or cores is not None:
            n = max(n, *_wanted(self, memory, cores))
        room = self.capacity - sum(
            self._slots[h] for h in self.hosts if h in self.availability.down
        )
        if n > room:
            logger.warning(
                "%d workers asked for; the hosts that answer take %d (capacity %d: %s)",
                n,
                room,
                self.capacity,
                ", ".join(f"{h} {c}" for h, c in self._slots.items()),
            )
            n = room
        return super().scale(n)

    scale_up = scale

    def adapt(  # type: ignore[override]
        self, minimum: float = 0, maximum: float = math.inf, **kwargs: Any
    ) -> Any:
        """Dask's adaptive scaling, its maximum capped at the capacity."""
        if maximum > self.capacity:
            logger.info("adapt: maximum %s capped at the capacity of %d", maximum, self.capacity)
            maximum = self.capacity
        return super().adapt(minimum=min(minimum, maximum), maximum=maximum, **kwargs)

    def sync_code(self) -> dict[str, list[str]]:
        """Ship the user's changed code and have the running workers read it (blocking; see
        ``Engine.sync_code``). Returns worker address -> the modules it will read again."""
        return self.engine.sync_code()

    # -- what users read ------------------------------------------------------------------

    @property
    def dashboard_link(self) -> str:
        """The dashboard as reachable from this machine (forwarded when the scheduler is remote)."""
        return self.engine.dashboard_link or ""

    def record(self) -> ClusterRecord:
        """This cluster as frozen plain data, for ``teardown(record)``."""
        return self.engine.record()

    @property
    def network_mode(self) -> NetworkMode:
        return self.engine.network_mode

    def close(self, timeout: float | None = None) -> Any:
        result = super().close(timeout)
        if self.launcher.cleanup_error is not None and not self.asynchronous:
            error, self.launcher.cleanup_error = self.launcher.cleanup_error, None
            raise error
        return result

    # -- self-healing ---------------------------------------------------------------------

    async def _start(self) -> None:
        try:
            await super()._start()
        except RuntimeError as exc:  # SpecCluster wraps why: callers (and retries) need it
            if isinstance(exc.__cause__, LazyclusterError):
                raise exc.__cause__ from None
            raise
        if self.heal:
            self.healer.start()
        self._registration = control.Registration(
            self.engine.cluster_id,
            {
                "name": self.name,
                "scheduler_address": self.scheduler_address,
                "dashboard_link": self.dashboard_link,
                "network_mode": self.network_mode,
                "hosts": list(self.hosts),
            },
            self.engine.tls,
            {
                "info": self._control_info,
                "scale": self._control_scale,
                "adapt": self._control_adapt,
                "close": self._control_close,
            },
        )

    # -- asked by attached clusters (see control), in the control thread -------------------

    @classmethod
    def from_name(  # type: ignore[override]  # distributed types it as a ProcessInterface
        cls, name: str, *, shutdown_on_close: bool = False, asynchronous: bool = False
    ) -> AttachedCluster:
        """The running cluster ``name`` (its id, as ``lazycluster status`` and records show
        it), started by another process of this user on this machine: ``Client(cluster)``,
        ``scale``, ``adapt``, ``get_logs`` work; ``close()`` stops the cluster only with
        ``shutdown_on_close=True``."""
        return AttachedCluster(name, shutdown_on_close=shutdown_on_close, asynchronous=asynchronous)

    def _on_loop(self, function: Callable[[], Any], timeout: float) -> Any:
        """Run ``function`` (a coroutine function) on the cluster's loop from another thread."""
        assert self.loop is not None
        return sync(self.loop, function, callback_timeout=timeout)

    def _control_info(self) -> dict[str, Any]:
        return {
            "status": self.status.name,
            "workers": len(self.scheduler_info.get("workers", {})),
            "capacity": self.capacity,
        }

    def _control_scale(self, n: int = 0, memory: Any = None, cores: Any = None) -> int:
        check_count("scale's number of workers", n)

        async def scale() -> None:
            self.scale(n, memory, cores)

        self._on_loop(scale, control.REQUEST_TIMEOUT)
        return len(self.worker_spec)

    def _control_adapt(
        self, minimum: float = 0, maximum: float | None = None, **kwargs: Any
    ) -> dict[str, float]:
        top = math.inf if maximum is None else maximum

        async def adapt() -> Any:
            return self.adapt(minimum, top, **kwargs)

        policy = self._on_loop(adapt, control.REQUEST_TIMEOUT)
        return {"minimum": policy.minimum, "maximum": policy.maximum}

    def _control_close(self) -> str:
        if self.asynchronous:
            self._on_loop(self._close, control.REQUEST_TIMEOUT * 2)
        else:
            self.close()
        return "closed"

    async def _close(self) -> None:
        registration = getattr(self, "_registration", None)
        if registration is not None:
            registration.close()
        # from here a worker that was starting and is stopped did not fail (its SpecCluster
        # task would report it to nobody but asyncio's "exception was never retrieved")
        self.launcher.closing = True
        await self.healer.stop()
        orphaned = False  # the scheduler is gone (stopped by a watch, or died)
        if self.status in (Status.running, Status.failed) and self.scheduler is not None:
            orphaned = not await self._scheduler_answers()
            if orphaned:
                logger.info("the scheduler is gone: stopping the workers without it")
                self.scheduler.status = Status.failed  # SpecCluster retires nothing through it
                self.shutdown_scheduler = False  # nor waits to connect to it
            elif self._integration is not None:
                await _off_loop(self._integration.before_close, self.engine, logger)
            # the engine's own client goes first: it would try to reconnect to a scheduler
            # that SpecCluster is about to terminate
            await _off_loop(self.engine.clients.close)
            if not orphaned and self.shutdown_scheduler:
                # the workers are killed first (as SSHCluster's close does), then SpecCluster
                # terminates the scheduler: its plugins and preloads still close, and it has
                # no worker left to tell to close
                await _off_loop(self.engine.kill_workers)
                self.launcher.workers_killed = True
        await super()._close()
        if orphaned and self.scheduler is not None:
            await self.scheduler.close()  # the engine's cleanup, as after a normal close

    async def _scheduler_answers(self) -> bool:
        if self.engine.scheduler_address is None:  # stopped (e.g. by a ClusterWatch)
            return False
        try:  # its identity without the workers' (the answer is all that is asked for)
            assert self.scheduler_comm is not None
            await asyncio.wait_for(self.scheduler_comm.identity(n_workers=0), REACH_TIMEOUT)
        except (OSError, asyncio.TimeoutError, AssertionError):
            return False
        return True

    async def heal_once(self) -> None:
        """One check of the workers (see :class:`~lazycluster_tasks.healing.Healer`)."""
        await self.healer.heal_once()

    def _event(self, what: str, **details: Any) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(what, details)
        except Exception as exc:
            logger.warning("event %s not reported: %s", what, exc)


def _wanted(cluster: SpecCluster, memory: Any, cores: Any) -> list[int]:
    """Worker counts that ``memory``/``cores`` ask for (as SpecCluster.scale computes them)."""
    from dask.utils import parse_bytes

    counts = [0]
    if memory is not None:
        counts.append(math.ceil(parse_bytes(memory) / cluster._memory_per_worker()))
    if cores is not None:
        counts.append(math.ceil(cores / cluster._threads_per_worker()))
    return counts
