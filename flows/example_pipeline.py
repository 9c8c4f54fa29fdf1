"""Example data pipeline: load -> transform on a Dask cluster -> summarize.

The cluster comes and goes with the ``cluster-lifecycle`` subflow; the transform runs as mapped
Prefect tasks on the cluster's workers (their runs appear under this flow run) and as a plain Dask
computation. With no hosts it runs on this machine (the embedded default)::

    python -m flows.example_pipeline                       # local runtime, ephemeral API
    python -m flows.example_pipeline host1 host2 host3     # hosts from ~/.ssh/config
    python -m flows.example_pipeline --network-mode tunnelled --workers-per-host 2 \
        --ssh-config ./ssh_config host1 host2
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections import Counter
from typing import Any, cast

import cloudpickle
from prefect import flow, task
from prefect.settings import PREFECT_HOME, PREFECT_UI_URL

from lazycluster_tasks.cli import parse_workers_per_host
from lazycluster_tasks.network import NetworkMode
from lazycluster_tasks.prefect import ClusterHandle, cluster_lifecycle
from lazycluster_tasks.settings import settings

# Workers need this module's code but need not have it installed: ship it by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@task
def load(n: int) -> list[int]:
    """Stand-in for reading a data set."""
    return list(range(1, n + 1))


@task
def transform(x: int) -> dict[str, Any]:
    return {"x": x, "square": x * x, "host": socket.gethostname()}


@flow(name="transform-on-cluster")
def transform_on_cluster(numbers: list[int]) -> list[dict[str, Any]]:
    return [future.result() for future in transform.map(numbers)]


def compute(cluster: ClusterHandle, numbers: list[int]) -> dict[str, Any]:
    """The compute job: mapped Prefect tasks on the workers, then a Dask computation."""
    import dask.bag

    rows = transform_on_cluster.with_options(task_runner=cluster.task_runner())(numbers)
    bag = dask.bag.from_sequence(numbers, npartitions=max(1, len(numbers) // 4))
    total = cluster.client.compute(bag.map(lambda v: v * v).sum()).result()
    return {"rows": rows, "total": total, "network_mode": cluster.record.network_mode}


@task
def summarize(result: dict[str, Any]) -> dict[str, Any]:
    hosts = Counter(row["host"] for row in result["rows"])
    return {
        "items": len(result["rows"]),
        "sum_of_squares": result["total"],
        "checked": result["total"] == sum(row["square"] for row in result["rows"]),
        "tasks_per_host": dict(sorted(hosts.items())),
        "network_mode": result["network_mode"],
    }


@flow(name="example-pipeline")
def example_pipeline(
    hosts: list[str] | None = None,
    n: int = 12,
    workers_per_host: int | dict[str, int] = 1,
    network_mode: NetworkMode = "auto",
    ssh_config_path: str | None = None,
    ssh_block: str | None = None,
    host_group: str | None = None,
) -> dict[str, Any]:
    """Load numbers, square them on the cluster, check and summarize the result."""
    numbers = load(n)
    result = cluster_lifecycle(
        job="flows.example_pipeline:compute",
        hosts=hosts,
        job_parameters={"numbers": numbers},
        host_group=host_group,
        ssh_block=ssh_block,
        ssh_config_path=ssh_config_path,
        workers_per_host=workers_per_host,
        network_mode=network_mode,
    )
    return summarize(cast(dict[str, Any], result))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.example_pipeline", description=__doc__)
    parser.add_argument("hosts", nargs="*", help="SSH hosts (default: this machine)")
    parser.add_argument("-n", type=int, default=12, help="numbers to square")
    parser.add_argument(
        "--workers-per-host",
        action="append",
        metavar="N|HOST=N",
        help="one count for every host, or HOST=N (repeat; hosts not named get 1)",
    )
    parser.add_argument("--network-mode", default="auto", choices=["auto", "direct", "tunnelled"])
    parser.add_argument("--ssh-config", default=settings().ssh_config, help="ssh config file")
    args = parser.parse_args(argv)
    try:
        per_host = parse_workers_per_host(args.workers_per_host)
    except ValueError as exc:
        parser.error(str(exc))
    state = example_pipeline(
        hosts=args.hosts or None,
        n=args.n,
        workers_per_host=1 if per_host is None else per_host,
        network_mode=args.network_mode,
        ssh_config_path=args.ssh_config,
        return_state=True,
    )
    summary = state.result()
    print("summary:", summary)
    print(where_to_see(state))
    if not summary["checked"]:
        raise SystemExit("the cluster's results do not add up")


def where_to_see(state: Any) -> str:
    """Where the run just made can be looked at (its id; the UI's page when one is set)."""
    run_id = state.state_details.flow_run_id
    ui = PREFECT_UI_URL.value()
    if ui:
        return f"see the run: {ui}/runs/flow-run/{run_id}"
    return (
        f"flow run {run_id} is stored in {PREFECT_HOME.value()}; to see it, run "
        f"`prefect server start` and open http://127.0.0.1:4200/runs/flow-run/{run_id}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
