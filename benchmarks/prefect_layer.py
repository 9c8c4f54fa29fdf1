"""The Prefect lifecycle against the plain DaskCluster, side by side on the same test hosts.

Both run the same job (every worker reports its hostname) on the same hosts against a warm API
server (``PREFECT_API_URL`` if set, else a Prefect test server; warmed by one round first):

* plain: ``DaskCluster(group).start()``, the job, ``cleanup()``;
* Prefect: ``cluster_lifecycle(job=..., hosts=...)`` — launch_master, launch_workers,
  setup_tunnels, the job, cleanup_cluster as task runs, records and artifacts in the API.

Targets (medians): the lifecycle flow takes under 1 s or under 15 % longer than plain; and it
takes at most 0.3 s more than plain and an empty Prefect flow together (what our tasks, records
and artifacts add beyond Prefect's own cost of a flow run). An empty Prefect flow is timed in the
same run, and, inside it, Prefect's own wait at the end of a flow run
(from the flow function returning until the flow call returns), each as its own row. A failed
repetition counts: medians are over the successful ones, the table says how many failed, and
the target is FAIL (exit status 1). Run: ``python -m benchmarks.prefect_layer [--hosts 3]
[--repeat 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from benchmarks.common import (
    Timing,
    error_lines,
    exit_code,
    failures,
    leftover_check,
    print_table,
    timeit_interleaved,
    verdict,
)
from lazycluster_tasks import DaskCluster, RuntimeGroup
from lazycluster_tasks.testing.hosts import TestHosts

ADDED_SECONDS = 1.0
ADDED_FRACTION = 0.15
#: Seconds the lifecycle may add beyond plain and Prefect's own flow cost (issue: <= 0.3 s).
OWN_SECONDS = 0.3
#: Bound of the job in the lifecycle flow (start and cleanup have their own timeouts).
JOB_TIMEOUT = 120.0

PLAIN = "plain DaskCluster start/job/cleanup"
FLOW = "cluster_lifecycle flow"
EMPTY = "an empty Prefect flow"
WAIT = "Prefect's end-of-flow wait (empty flow)"
TABLE_TITLE = "lifecycle flow vs plain DaskCluster (seconds)"
SUMMARY_TITLE = "summary"


@dataclass(frozen=True)
class Target:
    """The lifecycle flow against plain: median under plain + 1 s or under plain + 15 %."""

    flow: Timing
    plain: Timing
    name: str = "lifecycle flow vs plain DaskCluster"

    @property
    def limit(self) -> float:
        """Milliseconds the flow's median may reach (NaN when plain has no sample)."""
        return max(
            self.plain.median + 1000 * ADDED_SECONDS, (1 + ADDED_FRACTION) * self.plain.median
        )

    @property
    def failed(self) -> int:
        return self.flow.failed + self.plain.failed

    @property
    def passed(self) -> bool:
        return self.status == "PASS"

    @property
    def status(self) -> str:
        return verdict(self.flow.median < self.limit, self.failed)


@dataclass(frozen=True)
class OwnCostTarget:
    """The lifecycle flow against plain plus an empty flow: at most 0.3 s more (medians)."""

    flow: Timing
    plain: Timing
    empty: Timing
    name: str = "lifecycle flow vs plain + an empty flow"

    @property
    def limit(self) -> float:
        return self.plain.median + self.empty.median + 1000 * OWN_SECONDS

    @property
    def failed(self) -> int:
        return self.flow.failed + self.plain.failed + self.empty.failed

    @property
    def passed(self) -> bool:
        return self.status == "PASS"

    @property
    def status(self) -> str:
        return verdict(self.flow.median <= self.limit, self.failed)


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


def run_empty_flow(hosts: list[str], config: str, waits: list[float]) -> list[str]:
    """Prefect's own cost of one flow run; appends the seconds from the flow function's return
    until the flow call returned (Prefect's end-of-run work, measured apart) to ``waits``."""
    from prefect import flow

    returned: list[float] = []

    @flow(name="empty")
    def empty() -> list[str]:
        result = sorted(hosts)
        returned.append(time.perf_counter())
        return result

    result = empty()
    waits.append(time.perf_counter() - returned[0])
    return result


def run_flow(hosts: list[str], config: str) -> list[str]:
    from lazycluster_tasks.prefect import cluster_lifecycle

    result = cluster_lifecycle(
        job=job, hosts=hosts, ssh_config_path=config, timeout_seconds=JOB_TIMEOUT
    )
    return cast(list[str], result)


def _checked(runner: Callable[[list[str], str], list[str]], hosts: list[str], config: str) -> None:
    got = runner(hosts, config)
    if got != sorted(hosts):
        raise RuntimeError(f"the job answered {got}, expected {sorted(hosts)}")


def _after_each(th: TestHosts, pending: list[float], waits: list[float]) -> None:
    """After every repetition: leftovers fail it (and are killed, so the next one starts clean);
    an empty flow's end-of-flow wait moves from ``pending`` to ``waits`` if nothing failed."""
    try:
        leftover_check(th)
    except RuntimeError:
        pending.clear()
        th.kill_leftovers()
        raise
    waits += pending
    pending.clear()


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


def _secs(ms: float) -> str:
    return "-" if math.isnan(ms) else f"{ms / 1000:.2f}"


def main(argv: Sequence[str] | None = None) -> list[Target | OwnCostTarget]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prefect_layer", description=__doc__)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    args = parser.parse_args(argv)
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with TestHosts(count=args.hosts) as th, _warm_api():
        hosts = [h.name for h in th.hosts]
        config = str(th.ssh_config_path)
        pending: list[float] = []  # the wait of the empty flow run in progress
        waits: list[float] = []  # those of its repetitions that succeeded, warm-up first
        runners: dict[str, Callable[[list[str], str], list[str]]] = {
            PLAIN: run_plain,
            FLOW: run_flow,
            EMPTY: functools.partial(run_empty_flow, waits=pending),
        }
        timings = timeit_interleaved(
            {
                name: functools.partial(_checked, runner, hosts, config)
                for name, runner in runners.items()
            },
            args.repeat,
            warmup=args.warmup,  # API, imports, connections
            check=functools.partial(_after_each, th, pending, waits),
        )
        leftover_check(th)
    empty = timings[EMPTY]
    timed_waits = waits[len(waits) - len(empty.samples) :]  # without the warm-up's
    timings[WAIT] = Timing(tuple(w * 1000 for w in timed_waits), empty.errors, empty.not_run)
    print(f"prefect layer benchmark: {len(hosts)} test hosts, {args.repeat} samples each")
    print_table(
        TABLE_TITLE,
        ["case", "median s", "min s", "failures"],
        [[name, _secs(t.median), _secs(t.min), t.failures] for name, t in timings.items()],
    )
    for line in error_lines({name: timings[name] for name in runners}):
        print(line)
    print(
        "Prefect >= 3.9 heartbeats every flow run by default and joins the heartbeat thread"
        " at the end of each run, which sleeps in 1 s steps: most of the end-of-flow wait."
    )
    targets: list[Target | OwnCostTarget] = [
        Target(timings[FLOW], timings[PLAIN]),
        OwnCostTarget(timings[FLOW], timings[PLAIN], timings[EMPTY]),
    ]
    rows = []
    for target in targets:
        parts = [
            target.flow,
            target.plain,
            *([target.empty] if isinstance(target, OwnCostTarget) else []),
        ]
        rows.append(
            [
                target.name,
                _secs(target.flow.median),
                _secs(target.plain.median),
                _secs(target.limit),
                failures(
                    target.failed,
                    sum(t.runs for t in parts),
                    sum(t.not_run for t in parts),
                ),
                target.status,
            ]
        )
    print_table(
        SUMMARY_TITLE, ["target", "flow s", "plain s", "limit s", "failures", "result"], rows
    )
    print(
        f"limits: plain + max({ADDED_SECONDS:.0f} s, {100 * ADDED_FRACTION:.0f} %) of plain; "
        f"plain + an empty flow + {OWN_SECONDS} s (medians); test hosts torn down, no leftovers"
    )
    return targets


if __name__ == "__main__":
    sys.exit(exit_code(main()))
