"""The cluster lifecycle as Prefect tasks: thin wrappers over the core that speak records.

Every task retries transient network failures only (never authentication, host keys or bad
input), has a timeout, never caches, and forwards the core's host events (connected, process
started, ready, tunnel up, stopped) to the run logger. A hung host cannot hang a task: every
network call underneath has its own socket-level timeout.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.context import FlowRunContext, TaskRunContext
from prefect.states import State

import lazycluster_tasks.prefect.events as events
from lazycluster_tasks.dask import teardown
from lazycluster_tasks.dask_options import workers_on
from lazycluster_tasks.deprecation import renamed, renamed_all
from lazycluster_tasks.errors import NoRuntimesDetectedError, TunnelError, is_transient
from lazycluster_tasks.group import fan_out
from lazycluster_tasks.manager import RuntimeManager
from lazycluster_tasks.prefect.artifacts import (
    EnvironmentProgress,
    WorkerProgress,
    artifact_key,
    later,
    publish_cluster_markdown,
    publish_environment_table,
    publish_hosts_table,
)
from lazycluster_tasks.prefect.artifacts import flush as flush_artifacts
from lazycluster_tasks.prefect.records import (
    ClusterRecord,
    forget_record,
    load_record,
    record_of,
    save_record,
    updated,
)
from lazycluster_tasks.prefect.resolve import connection_kwargs, resolve_blocks
from lazycluster_tasks.runtime import Runtime

if TYPE_CHECKING:
    from lazycluster_tasks.engine import Engine
    from lazycluster_tasks.ssh_cluster import LazySSHCluster


class LiveClusters:
    """The clusters this process runs, by id: how the lifecycle tasks of one flow run share a
    live cluster while passing only records between them.

    Contract: ``launch_master`` adds the cluster it starts; ``launch_workers`` and
    ``setup_tunnels`` find it here and fail with a clear error when it is not (they must run
    in the process that ran ``launch_master``); ``cleanup_cluster`` takes it out and closes it.
    A cluster that is not here (another process, a crashed controller) is stopped from its
    persisted record instead. Thread-safe.
    """

    def __init__(self) -> None:
        self._clusters: dict[str, LazySSHCluster] = {}
        self._lock = threading.Lock()

    def add(self, cluster: LazySSHCluster) -> None:
        with self._lock:
            self._clusters[cluster.engine.cluster_id] = cluster

    def get(self, cluster_id: str) -> LazySSHCluster | None:
        with self._lock:
            return self._clusters.get(cluster_id)

    def pop(self, cluster_id: str) -> LazySSHCluster | None:
        with self._lock:
            return self._clusters.pop(cluster_id, None)

    def require(self, cluster_id: str) -> LazySSHCluster:
        cluster = self.get(cluster_id)
        if cluster is None:
            raise ValueError(
                f"cluster {cluster_id} is not running in this process: launch_workers and "
                "setup_tunnels must run where launch_master ran (use cleanup_cluster to stop it)"
            )
        return cluster


#: The one registry of this process (see LiveClusters for its contract).
LIVE = LiveClusters()

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
#: Seconds ``launch_master`` gives the scheduler to come up, unless told.
SCHEDULER_TIMEOUT = 60.0


def retry_transient(task: Any, task_run: TaskRun, state: State) -> bool:
    """Retry refused or dropped connections and timeouts; never auth, host keys or bad input."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


LIFECYCLE: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": [1, 3],
    "retry_condition_fn": retry_transient,
    "cache_policy": NO_CACHE,
}


def in_callers_context(fn: Any) -> Any:
    """``fn`` made to run, in any thread, in a copy of the caller's context: the same Prefect
    settings (API URL) and run. A thread of ours starts with an empty context; Prefect would
    then use its global settings (no API URL: a temporary server of its own)."""
    context = contextvars.copy_context()

    def run(*args: Any, **kwargs: Any) -> Any:
        return context.copy().run(fn, *args, **kwargs)

    return run


class _RunLogHandler(logging.Handler):
    """Hands the core's log records to a Prefect run logger (from any thread)."""

    def __init__(self, run_logger: Any) -> None:
        super().__init__(logging.INFO)
        self.run_logger = run_logger
        self._log = in_callers_context(run_logger.log)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._log(record.levelno, record.getMessage())
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def core_logs() -> Iterator[Any]:
    """Within a task: the core's INFO events appear in the task run's log."""
    run_logger = get_run_logger()
    core = logging.getLogger("lazycluster_tasks")
    handler = _RunLogHandler(run_logger)
    previous, propagate = core.level, core.propagate
    core.addHandler(handler)
    core.propagate = False  # the run logger prints them already
    if core.getEffectiveLevel() > logging.INFO:
        core.setLevel(logging.INFO)
    try:
        yield run_logger
    finally:
        core.removeHandler(handler)
        core.setLevel(previous)
        core.propagate = propagate


def flow_run_ids() -> list[str]:
    """The current flow run and its root: whose crash or cancellation hooks stop our clusters."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        task_context = TaskRunContext.get()
        if task_context is None or task_context.task_run.flow_run_id is None:
            return []
        ids = [str(task_context.task_run.flow_run_id)]
    else:
        ids = [str(context.flow_run.id)]
    try:
        from prefect.runtime import flow_run

        root = str(flow_run.root_flow_run_id)
        if root and root not in ids:
            ids.append(root)
    except Exception:  # no API to ask: the current run is enough
        pass
    return ids


def worker_prefect_env() -> tuple[dict[str, str], list[int]]:
    """Environment for Dask workers so that their task runs report to the API we use, and the
    ports to forward to remote hosts (a loopback API, e.g. the ephemeral one, is forwarded)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        api_url = str(client.api_url).rstrip("/")
    env = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    parts = urlsplit(api_url)
    if parts.hostname in LOOPBACK_HOSTS and parts.port:
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{parts.port}{parts.path}"
        return {**env, **_credentials()}, [parts.port]
    env["PREFECT_API_URL"] = api_url
    return {**env, **_credentials()}, []


def _credentials() -> dict[str, str]:
    """The controller's Prefect credentials (Cloud API key, server auth string), for workers:
    they travel to the hosts in a 0600 file, never on a command line."""
    from prefect.settings import get_current_settings

    api = get_current_settings().api
    found = {"PREFECT_API_KEY": api.key, "PREFECT_API_AUTH_STRING": api.auth_string}
    return {name: value.get_secret_value() for name, value in found.items() if value is not None}


def live_cluster(cluster_id: str) -> LazySSHCluster | None:
    return LIVE.get(cluster_id)


def capacity(hosts: Sequence[str], workers_per_host: int | Mapping[str, int] | None) -> int:
    """How many workers ``hosts`` take: one count for every host, or host -> count (hosts not
    named, and every host when None: 1). What ``LazySSHCluster.capacity`` will say, known
    before the cluster exists (for ``prelaunch``). A count that is not an integer >= 1 counts
    0 here: the cluster refuses it with the reason."""

    def valid(count: object) -> int:
        if isinstance(count, bool) or not isinstance(count, int):
            return 0
        return max(count, 0)

    return sum(valid(workers_on(workers_per_host, host)) for host in hosts)


@task(name="check-runtimes", timeout_seconds=120, **LIFECYCLE)
def check_runtimes(
    hosts: Sequence[str] | None = None,
    ssh_config_path: str | None = None,
    ssh_block: str | None = None,
    gpu_required: bool = False,
    min_memory: int | None = None,
    min_cpu_cores: int | None = None,
    installed_executables: Sequence[str] | None = None,
    filter_commands: Sequence[str] | None = None,
) -> list[str]:
    """The hosts to use: the given ones (or every host of the SSH config) that answer and pass
    the filters. Hosts that do not are logged; none at all raises NoRuntimesDetectedError.

    Args:
        hosts: SSH aliases or host names (default: every host of the SSH config).
        ssh_config_path: An OpenSSH config file (default: the SSH settings', else ~/.ssh/config).
        ssh_block: An SSH settings block: how to log in.
        gpu_required: Keep only hosts with a GPU.
        min_memory: Keep only hosts with at least this much memory, in MB.
        min_cpu_cores: Keep only hosts with at least this many CPU cores.
        installed_executables: Keep only hosts where each of these is on the PATH.
        filter_commands: Keep only hosts where each of these shell commands succeeds.
    """
    with core_logs() as log:
        where = resolve_blocks(hosts, None, ssh_block, ssh_config_path)
        kwargs, config = where.connection_kwargs, where.ssh_config_path
        filters = (gpu_required, min_memory, min_cpu_cores, installed_executables, filter_commands)
        if hosts is None:
            manager = RuntimeManager(config, connection_kwargs=kwargs)
            group = manager.create_group(None, None, *filters)
            chosen = group.hosts
            group.cleanup()
            return chosen
        runtimes = [Runtime(h, None, kwargs, config) for h in hosts]
        try:
            ok = fan_out(
                "check hosts",
                runtimes,
                lambda rt: rt.is_valid_runtime() and rt.check_filter(*filters),
            )
        finally:
            fan_out("close", runtimes, lambda rt: rt.cleanup())
        chosen = [h for h in hosts if ok.get(h)]
        for host in hosts:
            if host not in chosen:
                log.warning("host %s is unusable or fails the filters", host)
        if not chosen:
            raise NoRuntimesDetectedError(f"none of {', '.join(hosts)} is usable")
        return chosen


@task(name="launch-master", timeout_seconds=300, **LIFECYCLE)
def launch_master(
    hosts: Sequence[str],
    ssh_config_path: str | None = None,
    ssh_block: str | None = None,
    host_group: str | None = None,
    scheduler_host: str | None = None,
    options: Mapping[str, Any] | None = None,
    scheduler_timeout: float | None = None,
    n_workers: int | None = None,
    workers_per_host: int | Mapping[str, int] | None = None,
    *,
    master_host: str | None = None,
    master_timeout: float | None = None,
    workers: int | None = None,
) -> ClusterRecord:
    """Connect to the hosts, probe them, start the scheduler as a
    :class:`~lazycluster_tasks.LazySSHCluster` with no worker yet. The workers that
    ``launch_workers`` will ask for start with the scheduler and boot while it does;
    ``launch_workers`` adopts them. Returns when the scheduler answers.

    Args:
        hosts: SSH aliases or host names (default: the host group's).
        ssh_config_path: An OpenSSH config file (default: the SSH settings').
        ssh_block: An SSH settings block, used instead of the host group's.
        host_group: A host group block: hosts, workers per host, network mode, SSH settings.
        scheduler_host: One of the hosts to run the scheduler on (default: this machine).
        options: Other cluster options (network_mode, threads_per_worker, env, ...).
        scheduler_timeout: Seconds the scheduler has to come up (default 60).
        n_workers: Workers launch_workers will ask for (default: the capacity).
        workers_per_host: One count for every host, or host -> count (hosts not named: 1;
            default: the host group's, else 1).
        master_host: Deprecated name of scheduler_host (for one release).
        master_timeout: Deprecated name of scheduler_timeout (for one release).
        workers: Deprecated name of n_workers (for one release).
    """
    from lazycluster_tasks.ssh_cluster import LazySSHCluster

    given = renamed_all(
        {
            "scheduler_host": scheduler_host,
            "scheduler_timeout": scheduler_timeout,
            "n_workers": n_workers,
            "master_host": master_host,
            "master_timeout": master_timeout,
            "workers": workers,
        },
        {
            "master_host": "scheduler_host",
            "master_timeout": "scheduler_timeout",
            "workers": "n_workers",
        },
    )
    timeout = given["scheduler_timeout"]
    with core_logs() as log:
        where = resolve_blocks(hosts, host_group, ssh_block, ssh_config_path)
        hosts, kwargs, config = where.hosts, where.connection_kwargs, where.ssh_config_path
        values = {**where.defaults, **(options or {})}
        per_host = values.pop("workers_per_host", None)
        if workers_per_host is not None:
            per_host = workers_per_host
        # with GPUs a host's count is known once it is asked: the cluster caps the head start
        room = capacity(hosts, per_host)
        count = given["n_workers"]
        cluster = LazySSHCluster(
            list(hosts),
            ssh_config_path=config,
            connection_kwargs=kwargs,
            n_workers=0,
            prelaunch=room if count is None else min(room, count),
            workers_per_host=per_host,
            scheduler_host=given["scheduler_host"],
            scheduler_timeout=SCHEDULER_TIMEOUT if timeout is None else timeout,
            prefect_api=True,
            on_environment=EnvironmentProgress().update,
            **values,
        )
        LIVE.add(cluster)
        engine = cluster.engine
        if engine.environments and engine.manifest is not None:
            later(
                publish_environment_table,
                list(engine.environments.values()),
                engine.manifest.key,
                key=artifact_key("environment", engine.cluster_id),
            )
        record = record_of(
            cluster.engine,
            ssh_block=ssh_block,
            host_group=host_group,
            flow_run_ids=flow_run_ids(),
        )
        save_record(record)
        cluster.on_event = in_callers_context(
            lambda what, details: events.emit(what, updated(record, cluster.engine), details)
        )
        log.info(
            "cluster %s: scheduler up at %s (%s mode)",
            record.cluster_id,
            record.scheduler_address,
            record.network_mode,
        )
        return record


@task(name="launch-workers", timeout_seconds=600, **LIFECYCLE)
def launch_workers(
    record: ClusterRecord, n_workers: int | None = None, *, count: int | None = None
) -> ClusterRecord:
    """Bring the cluster to ``n_workers`` workers, all hosts at once; a progress artifact
    moves as workers register. Safe to retry: it only starts what is missing.

    Args:
        record: The cluster, as launch_master returned it.
        n_workers: Workers to have (default: the capacity, every host's workers_per_host).
        count: Deprecated name of n_workers (for one release).
    """
    wanted = renamed({"n_workers": n_workers, "count": count}, "count", "n_workers")
    cluster = LIVE.require(record.cluster_id)
    engine = cluster.engine
    with core_logs() as log:
        target = cluster.capacity if wanted is None else wanted
        progress = WorkerProgress(target, key=artifact_key("workers", record.cluster_id))
        engine.on_progress = progress.update
        try:
            cluster.scale(target)  # adopts the workers started with the scheduler first
            cluster.wait_started()
        finally:
            engine.on_progress = None
        progress.update(len(engine.workers), target)
        # not persisted again: the record launch_master saved already names every folder, and
        # a teardown stops whatever pid files those hold
        record = updated(record, engine)
        later(publish_hosts_table, record.core(), key=artifact_key("hosts", record.cluster_id))
        later(publish_cluster_markdown, record.core(), artifact_key("cluster", record.cluster_id))
        events.emit("started", record, {"workers": len(record.workers)})
        log.info("cluster %s: %d workers registered", record.cluster_id, len(record.workers))
        return record


@task(name="setup-tunnels", timeout_seconds=120, **LIFECYCLE)
def setup_tunnels(record: ClusterRecord) -> ClusterRecord:
    """Check every tunnel (re-opening broken ones) and make the dashboard reachable here.

    Args:
        record: The cluster, as launch_workers returned it.
    """
    cluster = LIVE.require(record.cluster_id)
    with core_logs() as log:
        broken = []
        for runtime in cluster.engine.group.runtimes:
            for tunnel in runtime.tunnels:
                try:
                    tunnel.check()
                except TunnelError as exc:
                    broken.append(str(exc))
        if broken:
            raise TunnelError("; ".join(broken))
        link = cluster.dashboard_link
        record = updated(
            record, cluster.engine
        )  # display only: the persisted record has all it needs
        later(publish_cluster_markdown, record.core(), artifact_key("cluster", record.cluster_id))
        log.info(
            "cluster %s: %d tunnels up; dashboard %s",
            record.cluster_id,
            len(record.tunnels),
            link or "off",
        )
        return record


def _log_flusher() -> Any:
    async def flush() -> None:  # on each worker's event loop: send Prefect logs queued there
        import inspect
        import sys

        if "prefect.logging.handlers" not in sys.modules:
            return  # this worker ran no Prefect task: nothing to send, nothing to import
        from prefect.logging.handlers import APILogWorker

        drained = APILogWorker.drain_all(timeout=5)
        if inspect.isawaitable(drained):
            await drained

    return flush  # a closure, so it is pickled by value: workers need not import us


def flush_worker_logs(cluster: Engine, log: Any, timeout: float = 10) -> None:
    """Before workers stop, have them send the logs of the task runs they executed."""
    if cluster.scheduler_address is None or not cluster.workers:
        return
    done = threading.Event()

    def run() -> None:
        try:
            cluster.clients.monitor().run(_log_flusher())
        except Exception as exc:
            log.warning("workers could not flush their Prefect logs: %s", exc)
        finally:
            done.set()

    threading.Thread(target=run, name="lct-flush-logs", daemon=True).start()
    if not done.wait(timeout):
        log.warning("workers did not flush their Prefect logs within %s s", timeout)


def stop_cluster(record: ClusterRecord, log: Any) -> ClusterRecord:
    """Stop a cluster: the live object when it runs in this process, else from its record
    (connections rebuilt, secrets from its blocks). Forgets the persisted record."""
    cluster = LIVE.pop(record.cluster_id)
    if cluster is not None:
        had = updated(record, cluster.engine).processes
        try:
            cluster.close()  # the workers flush their Prefect logs first
        except Exception as exc:  # hosts that failed keep their processes on record
            events.emit("teardown-failed", updated(record, cluster.engine), {"error": str(exc)})
            raise
        record = updated(record, cluster.engine)
        if record.state == "stopped":  # what ran, for the final artifacts (not an empty table)
            record = record.replace(processes=had)
    else:
        try:
            report = teardown(record.core(), connection_kwargs(record.ssh_block, record.host_group))
        except Exception as exc:
            events.emit("teardown-failed", record, {"error": str(exc)})
            raise
        log.info("cluster %s torn down from its record: %s", record.cluster_id, report)
        record = record.replace(state="stopped")
    forget_record(record)
    events.emit("stopped", record)
    log.info("cluster %s: stopped, nothing left on any host", record.cluster_id)
    return record


@task(name="cleanup-cluster", timeout_seconds=300, **LIFECYCLE)
def cleanup_cluster(record: ClusterRecord | str) -> ClusterRecord | None:
    """Stop every process of the cluster on every host, close its tunnels, remove its folders.
    Works from the live object or, in another process, from the persisted record. Idempotent.

    Args:
        record: The cluster's record, or its id (its persisted record is read).
    """
    with core_logs() as log:
        if isinstance(record, str):
            loaded = load_record(record)
            if loaded is None:
                log.info("cluster %s: no record left; nothing to clean up", record)
                return None
            record = loaded
        record = stop_cluster(record, log)
        later(publish_hosts_table, record.core(), key=artifact_key("hosts", record.cluster_id))
        later(publish_cluster_markdown, record.core(), artifact_key("cluster", record.cluster_id))
        if not flush_artifacts():
            log.warning("cluster artifacts still being published after 30 s")
        return record
