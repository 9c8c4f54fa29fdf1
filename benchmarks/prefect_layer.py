"""The Prefect lifecycle against the plain DaskCluster, side by side on the same test hosts.

Both run the same job (every worker reports its hostname) on the same hosts against a warm API
server (``PREFECT_API_URL`` if set, else a Prefect test server; warmed by one flow run first):

* plain: ``DaskCluster(group).start()``, the job, ``cleanup()``;
* Prefect: ``cluster_lifecycle(job=..., hosts=...)`` — launch_master, launch_workers,
  setup_tunnels, the job, cleanup_cluster as task runs, records and artifacts in the API.

Target: the lifecycle flow adds under 1 s or under 15 %. Run:
``python -m benchmarks.prefect_layer [--hosts 3] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any, cast

from benchmarks.common import leftover_check, print_table
from lazycluster_tasks import DaskCluster, RuntimeGroup
from lazycluster_tasks.testing.hosts import TestHosts

ADDED_SECONDS = 1.0
ADDED_FRACTION = 0.15


def job(cluster: Any) -> list[str]:
    """The compute job of both sides: where every worker runs."""
    return sorted(cluster.client.run(socket.gethostname).values())


class _Plain:
    """What the job sees of a plain DaskCluster (the attribute it uses)."""

    def __init__(self, cluster: DaskCluster) -> None:
        self.client = cluster.get_client(timeout=30)


def run_plain(hosts: list[str], config: str) -> list[str]:
    cluster = DaskCluster(RuntimeGroup(hosts=hosts, ssh_config_path=config))
    try:
        cluster.start()
        return job(_Plain(cluster))
    finally:
        cluster.cleanup()


def run_flow(hosts: list[str], config: str) -> list[str]:
    from lazycluster_tasks.prefect import cluster_lifecycle

    result = cluster_lifecycle(job=job, hosts=hosts, ssh_config_path=config)
    return cast(list[str], result)


@contextlib.contextmanager
def _warm_api() -> Iterator[None]:
    """The configured API (e.g. a running server), else a Prefect test server for the run."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    if PREFECT_API_URL.value():
        yield
        return
    with prefect_test_harness(server_startup_timeout=120):
        yield


def main(argv: Sequence[str] | None = None) -> list[tuple[str, float, float]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prefect_layer", description=__doc__)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    rows, summary = [], []
    with TestHosts(count=args.hosts) as th, _warm_api():
        hosts = [h.name for h in th.hosts]
        config = str(th.ssh_config_path)
        assert run_flow(hosts, config) == sorted(hosts)  # warm: API, imports, connections
        plain: list[float] = []
        flow: list[float] = []
        for _ in range(args.repeat):  # in turn, so both see the same machine
            for samples, runner in ((plain, run_plain), (flow, run_flow)):
                start = time.perf_counter()
                assert runner(hosts, config) == sorted(hosts)
                samples.append(time.perf_counter() - start)
                leftover_check(th)
        plain_s, flow_s = sorted(plain)[len(plain) // 2], sorted(flow)[len(flow) // 2]
        added = flow_s - plain_s
        rows = [
            ("plain DaskCluster start/job/cleanup", f"{plain_s:.2f}", f"{min(plain):.2f}", "-"),
            ("cluster_lifecycle flow", f"{flow_s:.2f}", f"{min(flow):.2f}", f"{added:+.2f} s"),
        ]
        ok = added < ADDED_SECONDS or added < ADDED_FRACTION * plain_s
        summary.append(("lifecycle flow overhead", added, added / plain_s))
        print(f"prefect layer benchmark: {len(hosts)} test hosts, {args.repeat} samples each")
        print_table(
            "lifecycle flow vs plain DaskCluster (seconds, median)",
            ["case", "median s", "min s", "added"],
            rows,
        )
        verdict = "PASS" if ok else "MISS"
        print(
            f"added {added:.2f} s = {100 * added / plain_s:.0f} % "
            f"(target: < {ADDED_SECONDS:.0f} s or < {100 * ADDED_FRACTION:.0f} %): {verdict}"
        )
    return summary


if __name__ == "__main__":
    main()
