"""Serve the project's deployments from this process (no work pool needed).

    prefect server start &                      # or point PREFECT_API_URL at your server
    python -m deployments.serve host1 host2     # hosts for the scheduled pipeline
    prefect deployment run example-pipeline/example-pipeline-nightly

* ``example-pipeline/example-pipeline-nightly``: the example pipeline every night at 02:00 UTC on
  the given hosts (none: this machine), parameters overridable per run;
* ``cluster-lifecycle/cluster-lifecycle``: any compute job ("module:function") on a cluster;
* ``teardown-cluster/teardown-cluster``: on demand, stop a cluster by id from its record.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import cast

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from flows.example_pipeline import example_pipeline
from lazycluster_tasks.cli import parse_workers_per_host
from lazycluster_tasks.prefect.flows import (
    cluster_lifecycle,
    teardown_cluster,
    teardown_run_clusters,
)
from lazycluster_tasks.settings import settings

NIGHTLY = "0 2 * * *"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hosts", nargs="*", help="SSH hosts for the pipeline (default: local)")
    parser.add_argument(
        "--workers-per-host",
        action="append",
        metavar="N|HOST=N",
        help="one count for every host, or HOST=N (repeat; hosts not named get 1)",
    )
    parser.add_argument("--network-mode", default="auto", choices=["auto", "direct", "tunnelled"])
    parser.add_argument("--ssh-config", default=settings().ssh_config)
    parser.add_argument("--cron", default=NIGHTLY, help="schedule of the pipeline")
    args = parser.parse_args(argv)
    try:
        per_host = parse_workers_per_host(args.workers_per_host)
    except ValueError as exc:
        parser.error(str(exc))
    pipeline = example_pipeline.to_deployment(
        name="example-pipeline-nightly",
        cron=args.cron,
        parameters={
            "hosts": args.hosts or None,
            "workers_per_host": 1 if per_host is None else per_host,
            "network_mode": args.network_mode,
            "ssh_config_path": args.ssh_config,
        },
        tags=["lazycluster"],
    )
    lifecycle = cluster_lifecycle.to_deployment(name="cluster-lifecycle", tags=["lazycluster"])
    teardown = teardown_cluster.to_deployment(name="teardown-cluster", tags=["lazycluster"])
    safety = teardown_run_clusters.to_deployment(name="teardown-run-clusters", tags=["lazycluster"])
    serve(*(cast(RunnerDeployment, d) for d in (pipeline, lifecycle, teardown, safety)))


if __name__ == "__main__":
    main()
