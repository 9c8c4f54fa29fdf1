"""The cluster lifecycle as Prefect tasks: thin wrappers over the core that speak records.

Every task retries transient network failures only (never authentication, host keys or bad
input), has a timeout, never caches, and forwards the core's host events (connected, process
started, ready, tunnel up, stopped) to the run logger. A hung host cannot hang a task: every
network call underneath has its own socket-level timeout.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.context import FlowRunContext, TaskRunContext
from prefect.states import State

from lazycluster_tasks.dask import DaskCluster, teardown
from lazycluster_tasks.errors import NoRuntimesDetectedError, TunnelError, is_transient
from lazycluster_tasks.group import RuntimeGroup, fan_out
from lazycluster_tasks.manager import RuntimeManager
from lazycluster_tasks.prefect.artifacts import (
    WorkerProgress,
    artifact_key,
    publish_cluster_markdown,
    publish_hosts_table,
)
from lazycluster_tasks.prefect.blocks import HostGroupBlock, SSHSettingsBlock
from lazycluster_tasks.prefect.records import (
    ClusterRecord,
    forget_record,
    load_block,
    load_record,
    save_record,
)
from lazycluster_tasks.runtime import Runtime

#: Live clusters of this process, by id: later tasks of the same flow run reuse them.
_LIVE: dict[str, DaskCluster] = {}
_LIVE_LOCK = threading.Lock()

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


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


class _RunLogHandler(logging.Handler):
    """Hands the core's log records to a Prefect run logger (from any thread)."""

    def __init__(self, run_logger: Any) -> None:
        super().__init__(logging.INFO)
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.run_logger.log(record.levelno, record.getMessage())
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


def ssh_settings(ssh_block: str | None, host_group: str | None = None) -> SSHSettingsBlock | None:
    """The SSH settings block to use: named directly, or nested in the host group block."""
    if ssh_block:
        return load_block(SSHSettingsBlock, ssh_block)
    if host_group:
        return load_block(HostGroupBlock, host_group).ssh
    return None


def connection_kwargs(ssh_block: str | None, host_group: str | None = None) -> dict[str, Any]:
    """Secrets and SSH options from the named blocks (never logged, never recorded)."""
    block = ssh_settings(ssh_block, host_group)
    return block.connection_kwargs() if block else {}


def _ssh_config_path(
    ssh_block: str | None, given: str | None, host_group: str | None = None
) -> str | None:
    if given:
        return given
    block = ssh_settings(ssh_block, host_group)
    return block.ssh_config_path if block else None


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
        return env, [parts.port]
    env["PREFECT_API_URL"] = api_url
    return env, []


def live_cluster(cluster_id: str) -> DaskCluster | None:
    with _LIVE_LOCK:
        return _LIVE.get(cluster_id)


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
    the filters. Hosts that do not are logged; none at all raises NoRuntimesDetectedError."""
    with core_logs() as log:
        kwargs = connection_kwargs(ssh_block)
        config = _ssh_config_path(ssh_block, ssh_config_path)
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
    master_host: str | None = None,
    options: Mapping[str, Any] | None = None,
    master_timeout: float = 60,
) -> ClusterRecord:
    """Connect to the hosts, probe them, start the scheduler (here, or on ``master_host``).

    The scheduler is awaited by ``launch_workers`` (it boots while the workers start); with
    custom launchers it is awaited here."""
    from lazycluster_tasks.dask_launchers import RemoteMasterLauncher

    with core_logs() as log:
        kwargs = connection_kwargs(ssh_block, host_group)
        config = _ssh_config_path(ssh_block, ssh_config_path, host_group)
        group = RuntimeGroup(hosts=list(hosts), ssh_config_path=config, connection_kwargs=kwargs)
        env, forwards = worker_prefect_env()
        values = dict(options or {})
        values["env"] = {**env, **dict(values.get("env") or {})}
        values["forward_ports"] = [*forwards, *values.get("forward_ports", ())]
        master = RemoteMasterLauncher(group, master_host) if master_host else None
        cluster = DaskCluster(group, master_launcher=master, **values)
        try:
            # the scheduler boots while launch_workers starts the workers (which awaits it)
            if not cluster.begin():
                cluster.start_master(timeout=int(master_timeout))
        except BaseException:
            cluster.cleanup()
            raise
        with _LIVE_LOCK:
            _LIVE[cluster.cluster_id] = cluster
        record = ClusterRecord.of(
            cluster, ssh_block=ssh_block, host_group=host_group, flow_run_ids=flow_run_ids()
        )
        save_record(record)
        log.info(
            "cluster %s: scheduler starting at %s (%s mode)",
            cluster.cluster_id,
            cluster.scheduler_address,
            cluster.network_mode,
        )
        return record


@task(name="launch-workers", timeout_seconds=600, **LIFECYCLE)
def launch_workers(record: ClusterRecord, count: int | None = None) -> ClusterRecord:
    """Bring the cluster to ``count`` workers (default: hosts x workers_per_host), all hosts at
    once; a progress artifact moves as workers register. Safe to retry: it only starts what is
    missing."""
    cluster = _require_live(record)
    with core_logs() as log:
        target = count
        if target is None:
            target = cluster.runtime_group.runtime_count * cluster.options.workers_per_host
        progress = WorkerProgress(target, key=artifact_key("workers", record.cluster_id))
        cluster.on_progress = progress.update
        try:
            if cluster.begun:  # first call: workers start while the scheduler boots
                cluster.complete(target)
            else:  # a retry, or more workers later: start only what is missing
                cluster.scale(target)
        finally:
            cluster.on_progress = None
        progress.update(len(cluster.workers), target)
        # not persisted again: the record launch_master saved already names every folder, and
        # a teardown stops whatever pid files those hold
        record = record.updated(cluster)
        publish_hosts_table(record.core(), key=artifact_key("hosts", record.cluster_id))
        log.info("cluster %s: %d workers registered", record.cluster_id, len(record.workers))
        return record


@task(name="setup-tunnels", timeout_seconds=120, **LIFECYCLE)
def setup_tunnels(record: ClusterRecord) -> ClusterRecord:
    """Check every tunnel (re-opening broken ones) and make the dashboard reachable here."""
    cluster = _require_live(record)
    with core_logs() as log:
        broken = []
        for runtime in cluster.runtime_group.runtimes:
            for tunnel in runtime.tunnels:
                try:
                    tunnel.check()
                except TunnelError as exc:
                    broken.append(str(exc))
        if broken:
            raise TunnelError("; ".join(broken))
        link = cluster.dashboard_link
        record = record.updated(cluster)  # display only: the persisted record has all it needs
        publish_cluster_markdown(record.core(), key=artifact_key("cluster", record.cluster_id))
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


def flush_worker_logs(cluster: DaskCluster, log: Any, timeout: float = 10) -> None:
    """Before workers stop, have them send the logs of the task runs they executed."""
    if cluster.scheduler_address is None or not cluster.workers:
        return
    done = threading.Event()

    def run() -> None:
        try:
            cluster.monitor_client().run(_log_flusher())
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
    with _LIVE_LOCK:
        cluster = _LIVE.pop(record.cluster_id, None)
    if cluster is not None:
        flush_worker_logs(cluster, log)
        cluster.cleanup()
        record = record.updated(cluster)
    else:
        report = teardown(record.core(), connection_kwargs(record.ssh_block, record.host_group))
        log.info("cluster %s torn down from its record: %s", record.cluster_id, report)
        record = record.model_copy(update={"state": "stopped"})
    forget_record(record)
    log.info("cluster %s: stopped, nothing left on any host", record.cluster_id)
    return record


@task(name="cleanup-cluster", timeout_seconds=300, **LIFECYCLE)
def cleanup_cluster(record: ClusterRecord | str) -> ClusterRecord | None:
    """Stop every process of the cluster on every host, close its tunnels, remove its folders.
    Works from the live object or, in another process, from the persisted record. Idempotent."""
    with core_logs() as log:
        if isinstance(record, str):
            loaded = load_record(record)
            if loaded is None:
                log.info("cluster %s: no record left; nothing to clean up", record)
                return None
            record = loaded
        record = stop_cluster(record, log)
        publish_hosts_table(record.core(), key=artifact_key("hosts", record.cluster_id))
        return record


def _require_live(record: ClusterRecord) -> DaskCluster:
    cluster = live_cluster(record.cluster_id)
    if cluster is None:
        raise ValueError(
            f"cluster {record.cluster_id} is not running in this process: launch_workers and "
            "setup_tunnels must run where launch_master ran (use cleanup_cluster to stop it)"
        )
    return cluster
