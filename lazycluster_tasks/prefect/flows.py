"""Flows and the ``dask_cluster`` context manager: a cluster around any compute job.

``with dask_cluster(hosts=[...]) as cluster:`` inside a flow launches the scheduler and workers
through the lifecycle tasks (so each step shows in the UI), yields a :class:`ClusterHandle`, and
always cleans up: in ``finally`` for errors, and — when the process itself dies or the run is
cancelled — in the ``on_crashed``/``on_cancellation`` hook :func:`teardown_hook`, which works
from the persisted records alone and may run in another process.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger

from lazycluster_tasks.checks import check_seconds
from lazycluster_tasks.deprecation import deprecated_message, renamed
from lazycluster_tasks.engine import Engine
from lazycluster_tasks.errors import ClusterLostError
from lazycluster_tasks.network import NetworkMode
from lazycluster_tasks.prefect.records import (
    ClusterRecord,
    clusters_of_run,
    load_record,
)
from lazycluster_tasks.prefect.tasks import (
    cleanup_cluster,
    launch_master,
    launch_workers,
    live_cluster,
    setup_tunnels,
    stop_cluster,
)
from lazycluster_tasks.ssh_cluster import LazySSHCluster
from lazycluster_tasks.watch import ClusterWatch

logger = logging.getLogger(__name__)

#: Where the cluster runs when no host is named: the embedded default, this machine.
DEFAULT_HOSTS = ("localhost",)


@dataclass
class ClusterHandle:
    """What a compute job gets: the record, a client, addresses, and a task runner.

    ``dask`` is the :class:`~lazycluster_tasks.LazySSHCluster` (for ``Client(handle.dask)``,
    ``scale``, ``adapt``); ``cluster`` its :class:`~lazycluster_tasks.engine.Engine` (workers by
    name with host and pid, logs)."""

    record: ClusterRecord
    dask: LazySSHCluster
    _client: Any = field(default=None, repr=False)

    @property
    def cluster(self) -> Engine:
        return self.dask.engine

    @property
    def scheduler_address(self) -> str:
        return str(self.record.scheduler_address)

    @property
    def dashboard_link(self) -> str | None:
        return self.record.dashboard_link

    @property
    def client(self) -> Any:
        """A ``distributed.Client`` on the cluster (closed with the cluster)."""
        if self._client is None:
            self._client = self.cluster.clients.new(timeout=30)
        return self._client

    def task_runner(self, **kwargs: Any) -> Any:
        """A ``DaskTaskRunner`` on this cluster, for ``my_flow.with_options(task_runner=...)``."""
        from prefect_dask import DaskTaskRunner

        client_kwargs = dict(kwargs.pop("client_kwargs", None) or {})
        client_kwargs.setdefault("security", self.dask.security)  # the cluster's TLS
        return DaskTaskRunner(address=self.scheduler_address, client_kwargs=client_kwargs, **kwargs)


def dask_cluster(
    hosts: Sequence[str] | None = None,
    *,
    host_group: str | None = None,
    ssh_block: str | None = None,
    ssh_config_path: str | None = None,
    scheduler_host: str | None = None,
    n_workers: int | None = None,
    workers_per_host: int | Mapping[str, int] | None = None,
    scheduler_timeout: float | None = None,
    timeout_seconds: float | None = None,
    **options: Any,
) -> contextlib.AbstractContextManager[ClusterHandle]:
    """A Dask cluster on ``hosts`` (or a host group block) for the duration of the block.

    Nothing is left running on any host afterwards, whatever happens inside. While the block
    runs, a :class:`~lazycluster_tasks.watch.ClusterWatch` checks the cluster; a lost
    scheduler, lost workers or a cut path (or ``timeout_seconds`` passing) stops the scheduler,
    so the job's pending work fails at once, and the block raises
    :class:`~lazycluster_tasks.errors.ClusterLostError` with the reason.

    Parameters
    ----------
    hosts
        SSH aliases or host names (default: the host group's, else this machine).
    host_group, ssh_block
        Names of a host group block (hosts, workers per host, network mode, SSH settings) and
        of an SSH settings block (used instead of the group's).
    ssh_config_path
        An OpenSSH config file (default: the SSH settings', else ``~/.ssh/config``).
    scheduler_host
        One of the hosts to run the scheduler on (default: this machine).
    n_workers
        Workers to start with (default: the capacity, the sum over the hosts).
    workers_per_host
        One count for every host, or host -> count (hosts not named: 1; default: the host
        group's, else 1).
    scheduler_timeout
        Seconds the scheduler has to come up (default 60).
    timeout_seconds
        Seconds the block may run before the cluster is stopped (default: no limit).
    **options
        :class:`~lazycluster_tasks.dask_options.DaskOptions` (``network_mode``,
        ``host_links``, ``threads_per_worker``, ``memory_limit``, ``resources``, ``env``,
        ...), as for :class:`~lazycluster_tasks.LazySSHCluster`. ``host_links=False`` keeps
        every host's ``~/.ssh/authorized_keys`` untouched (tunnelled worker traffic then goes
        through this machine).

    Deprecated names, for one release (a DeprecationWarning; both names given is a
    TypeError): ``master_host`` (``scheduler_host``), ``workers`` (``n_workers``).
    """
    given = {"scheduler_host": scheduler_host, "n_workers": n_workers, **options}
    scheduler_host = renamed(given, "master_host", "scheduler_host")
    n_workers = renamed(given, "workers", "n_workers")
    del given["scheduler_host"], given["n_workers"]
    if timeout_seconds is not None:
        check_seconds("timeout_seconds", timeout_seconds)
    if workers_per_host is not None:
        given["workers_per_host"] = workers_per_host
    return _dask_cluster(
        hosts,
        host_group=host_group,
        ssh_block=ssh_block,
        ssh_config_path=ssh_config_path,
        scheduler_host=scheduler_host,
        n_workers=n_workers,
        scheduler_timeout=scheduler_timeout,
        timeout_seconds=timeout_seconds,
        options=given,
    )


@contextlib.contextmanager
def _dask_cluster(
    hosts: Sequence[str] | None,
    *,
    host_group: str | None,
    ssh_block: str | None,
    ssh_config_path: str | None,
    scheduler_host: str | None,
    n_workers: int | None,
    scheduler_timeout: float | None,
    timeout_seconds: float | None,
    options: Mapping[str, Any],
) -> Iterator[ClusterHandle]:
    """:func:`dask_cluster` once its arguments are checked (in the ``with`` statement)."""
    # the host group's hosts and options are resolved once, by launch_master
    chosen = list(hosts or ([] if host_group else DEFAULT_HOSTS))
    record = launch_master(
        chosen,
        ssh_config_path=ssh_config_path,
        ssh_block=ssh_block,
        host_group=host_group,
        scheduler_host=scheduler_host,
        options=options,
        scheduler_timeout=scheduler_timeout,
        n_workers=n_workers,
    )
    failed = True
    try:
        record = launch_workers(record, n_workers)
        record = setup_tunnels(record)
        dask = live_cluster(record.cluster_id)
        assert dask is not None
        engine = dask.engine
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        with ClusterWatch(
            engine, on_lost=lambda _: engine.stop_scheduler(), deadline=deadline, heals=dask.heal
        ) as watch:
            try:
                yield ClusterHandle(record, dask)
            except BaseException as exc:
                if watch.failure is None:
                    raise
                raise _lost(record, watch.failure) from exc
        if watch.failure is not None:
            raise _lost(record, watch.failure)
        failed = False
    finally:
        try:
            cleanup_cluster(record)
        except Exception:
            if not failed:
                raise
            logger.exception("cleanup of cluster %s failed", record.cluster_id)


def _lost(record: ClusterRecord, reason: str) -> ClusterLostError:
    logger.error("cluster %s lost: %s", record.cluster_id, reason)
    return ClusterLostError(
        f"cluster {record.cluster_id} was lost while the job ran: {reason}", reason
    )


def teardown_hook(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_crashed``/``on_cancellation`` hook: stop every cluster the run launched, from the
    persisted records (it may run in another process than the flow)."""
    for cluster_id in clusters_of_run(str(flow_run.id)):
        record = load_record(cluster_id)
        if record is None:
            continue
        try:
            stop_cluster(record, logger)
        except Exception:
            logger.exception("teardown of cluster %s failed", cluster_id)


def resolve_job(job: str | Callable[..., Any]) -> Callable[..., Any]:
    """A compute job: a callable, or ``"package.module:function"``."""
    if callable(job):
        return job
    module_name, _, name = str(job).partition(":")
    if not module_name or not name:
        raise ValueError(f"job must be a callable or 'module:function', not {job!r}")
    target = getattr(importlib.import_module(module_name), name, None)
    if not callable(target):
        raise ValueError(f"{job!r} does not name a callable")
    return target


@flow(name="cluster-lifecycle", on_crashed=[teardown_hook], on_cancellation=[teardown_hook])
def cluster_lifecycle(
    job: str | Callable[..., Any],
    hosts: list[str] | None = None,
    job_parameters: dict[str, Any] | None = None,
    host_group: str | None = None,
    ssh_block: str | None = None,
    ssh_config_path: str | None = None,
    scheduler_host: str | None = None,
    workers_per_host: int | dict[str, int] | None = None,
    network_mode: NetworkMode | None = None,
    options: dict[str, Any] | None = None,
    timeout_seconds: float | None = None,
    n_workers: int | None = None,
    scheduler_timeout: float | None = None,
    master_host: str | None = None,
) -> Any:
    """Launch master -> launch workers -> tunnels -> run ``job(cluster, **job_parameters)`` ->
    cleanup (always). The run fails with the reason when the cluster is lost or the job runs
    longer than ``timeout_seconds``.

    Args:
        job: The job: "module:function" (or, called from Python, a callable), called with the
            cluster handle and the job parameters.
        hosts: SSH aliases or host names (default: the host group's, else this machine).
        job_parameters: Keyword arguments for the job.
        host_group: A host group block: hosts, workers per host, network mode, SSH settings.
        ssh_block: An SSH settings block, used instead of the host group's.
        ssh_config_path: An OpenSSH config file on the machine that runs the flow.
        scheduler_host: One of the hosts to run the scheduler on (default: the flow's machine).
        workers_per_host: One count for every host, or host -> count (hosts not named: 1;
            default: the host group's, else 1).
        network_mode: auto, direct or tunnelled (default: the host group's, else auto).
        options: Other cluster options (threads_per_worker, memory_limit, env, host_links, ...).
        timeout_seconds: Seconds the job may run before the cluster is stopped.
        n_workers: Workers to start with (default: the capacity, the sum over the hosts).
        scheduler_timeout: Seconds the scheduler has to come up (default 60).
        master_host: Deprecated name of scheduler_host, for one release (a warning in the
            run's log; both given fails the run).
    """
    if master_host is not None:
        given = {"scheduler_host": scheduler_host, "master_host": master_host}
        scheduler_host = renamed(given, "master_host", "scheduler_host")
        get_run_logger().warning(deprecated_message("master_host", "scheduler_host"))
    function = resolve_job(job)
    values: dict[str, Any] = dict(options or {})
    if network_mode is not None:
        values["network_mode"] = network_mode
    with dask_cluster(
        hosts,
        host_group=host_group,
        ssh_block=ssh_block,
        ssh_config_path=ssh_config_path,
        scheduler_host=scheduler_host,
        n_workers=n_workers,
        workers_per_host=workers_per_host,
        scheduler_timeout=scheduler_timeout,
        timeout_seconds=timeout_seconds,
        **values,
    ) as cluster:
        return function(cluster, **(job_parameters or {}))


@flow(name="teardown-cluster")
def teardown_cluster(cluster_id: str) -> str:
    """Stop a cluster from its persisted record (e.g. after its controller died). Idempotent.

    Args:
        cluster_id: The cluster's id (as its artifacts and `lazycluster status` show it).
    """
    record = cleanup_cluster(cluster_id)
    return "nothing to do" if record is None else f"cluster {cluster_id} stopped"


@flow(name="teardown-run-clusters", persist_result=True)
def teardown_run_clusters(flow_run: str) -> list[str]:
    """Stop every cluster that a flow run launched: what the safety-net Automation runs when
    such a run crashed or was cancelled. Idempotent; returns the clusters stopped.

    Args:
        flow_run: The run's id, or its event resource id (prefect.flow-run.<id>).
    """
    run_id = flow_run.removeprefix("prefect.flow-run.")
    stopped = []
    for cluster_id in clusters_of_run(run_id):
        if cleanup_cluster(cluster_id) is not None:
            stopped.append(cluster_id)
    return stopped
