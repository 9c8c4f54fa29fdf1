"""The Prefect lifecycle against the plain DaskCluster, side by side on the same test hosts.

Both run the same job (every worker reports its hostname) on the same hosts against a warm API
server (``PREFECT_API_URL`` if set, else a Prefect test server; warmed by one flow run first):

* plain: ``DaskCluster(group).start()``, the job, ``cleanup()``;
* Prefect: ``cluster_lifecycle(job=..., hosts=...)`` — launch_master, launch_workers,
  setup_tunnels, the job, cleanup_cluster as task runs, records and artifacts in the API.

Target: the lifecycle flow adds under 1 s or under 15 %. An empty Prefect flow is timed in the same
run, to tell Prefect's fixed cost per flow run from ours. Run:
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


def run_empty_flow(hosts: list[str], config: str) -> list[str]:
    """Prefect's own fixed cost of one flow run, measured the same way."""
    from prefect import flow

    @flow(name="empty")
    def empty() -> list[str]:
        return sorted(hosts)

    return empty()


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
        samples: dict[str, list[float]] = {"plain": [], "flow": [], "empty": []}
        runners = {"plain": run_plain, "flow": run_flow, "empty": run_empty_flow}
        for _ in range(args.repeat):  # in turn, so all see the same machine
            for name, runner in runners.items():
                start = time.perf_counter()
                assert runner(hosts, config) == sorted(hosts)
                samples[name].append(time.perf_counter() - start)
                leftover_check(th)
        plain_s, flow_s, empty_s = (sorted(v)[len(v) // 2] for v in samples.values())
        added, ours = flow_s - plain_s, flow_s - plain_s - empty_s
        rows = [
            ("plain DaskCluster start/job/cleanup", plain_s, samples["plain"], "-"),
            ("cluster_lifecycle flow", flow_s, samples["flow"], f"{added:+.2f} s"),
            ("an empty Prefect flow (Prefect's own cost)", empty_s, samples["empty"], "-"),
        ]
        print(f"prefect layer benchmark: {len(hosts)} test hosts, {args.repeat} samples each")
        print_table(
            "lifecycle flow vs plain DaskCluster (seconds, median)",
            ["case", "median s", "min s", "added"],
            [(case, f"{med:.2f}", f"{min(all_):.2f}", extra) for case, med, all_, extra in rows],
        )
        for label, value in (("by the lifecycle flow", added), ("beyond an empty flow", ours)):
            ok = value < ADDED_SECONDS or value < ADDED_FRACTION * plain_s
            print(
                f"added {label}: {value:.2f} s = {100 * value / plain_s:.0f} % "
                f"(target: < {ADDED_SECONDS:.0f} s or < {100 * ADDED_FRACTION:.0f} %): "
                f"{'PASS' if ok else 'MISS'}"
            )
        print(
            "Prefect >= 3.9 heartbeats every flow run by default and joins the heartbeat thread"
            " at the end of each run, which sleeps in 1 s steps: most of an empty flow's cost."
        )
        summary.append(("lifecycle flow overhead", added, added / plain_s))
        summary.append(("overhead beyond an empty flow", ours, ours / plain_s))
    return summary


if __name__ == "__main__":
    main()
