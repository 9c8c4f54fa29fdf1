"""Self-healing and adaptive scaling of LazySSHCluster on SSH test hosts (direct mode).

1. Replacement: a worker's whole process group is SIGKILLed; the time until a new worker is
   registered with the scheduler (the cluster is back to one worker per host), and where.
2. Adapt: ``adapt(minimum=1, maximum=capacity)`` (2 workers per host, interval 0.5 s) with a
   queue of 1 s tasks (4 per worker slot) submitted at once: time until the first added worker
   registered, the most workers that ran and when, when the queue was done, and how long after
   that it was back to 1 (Dask's adaptive target decides how many it asks for).

Every sample runs on a fresh cluster; nothing may be left on any host afterwards. There are no
targets (the issue asks for the figures): every failed sample is counted and fails the run.
Run: ``python -m benchmarks.healing [--hosts 3,8] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psutil

from benchmarks.common import clean_sample, leftover_check, print_table
from lazycluster_tasks.testing.hosts import TestHosts

TIMEOUT = 90.0


@dataclass
class Result:
    name: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "FAIL" if self.errors else "PASS"


def _wait(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"not reached within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def _names(client: object) -> list[str]:
    info = client.scheduler_info(n_workers=-1)["workers"]  # type: ignore[attr-defined]
    return [str(w["name"]) for w in info.values()]


def replacement(th: TestHosts, hosts: list[str]) -> dict[str, float]:
    from distributed import Client

    from lazycluster_tasks.ssh_cluster import LazySSHCluster

    config = str(th.ssh_config_path)
    cluster = LazySSHCluster(hosts, ssh_config_path=config, threads_per_worker=1)
    with cluster, Client(cluster, set_as_default=False) as client:
        victim = _names(client)[-1]
        pid = cluster.engine.table[victim].pid
        if victim not in " ".join(psutil.Process(pid).cmdline()):
            raise RuntimeError(f"pid {pid} is not worker {victim}")
        os.killpg(pid, signal.SIGKILL)
        killed = time.monotonic()
        _wait(lambda: victim not in _names(client))
        gone = time.monotonic() - killed
        back = _wait(lambda: len(_names(client)) == len(hosts)) + gone
    return {"scheduler saw it gone": gone, "replacement registered": back}


def adapt(th: TestHosts, hosts: list[str]) -> dict[str, float]:
    from distributed import Client

    from lazycluster_tasks.ssh_cluster import LazySSHCluster

    config = str(th.ssh_config_path)
    cluster = LazySSHCluster(
        hosts, ssh_config_path=config, threads_per_worker=1, workers_per_host=2, n_workers=1
    )
    with cluster, Client(cluster, set_as_default=False) as client:
        cluster.adapt(minimum=1, maximum=cluster.capacity, interval="500ms", wait_count=4)
        _wait(lambda: len(_names(client)) == 1)
        t0 = time.monotonic()
        # a lambda travels by value: the workers need not import this module
        futures = client.map(lambda i: time.sleep(1) or i, range(4 * cluster.capacity), pure=False)  # type: ignore[func-returns-value]
        first = _wait(lambda: len(_names(client)) > 1)
        peak, at_peak = 1, 0.0
        while not all(f.done() for f in futures):
            if time.monotonic() - t0 > TIMEOUT:
                raise TimeoutError(f"the queue was not done within {TIMEOUT} s")
            count = len(_names(client))
            if count > peak:
                peak, at_peak = count, time.monotonic() - t0
            time.sleep(0.1)
        client.gather(futures)
        done = time.monotonic() - t0
        back = _wait(lambda: len(_names(client)) == 1)
    return {
        "first added worker": first,
        "peak workers (a count)": float(peak),
        "peak reached": at_peak,
        f"queue of {4 * cluster.capacity} x 1 s done": done,
        "back to 1 after the queue": back,
    }


def run(th: TestHosts, n: int, repeat: int) -> list[Result]:
    hosts = [h.name for h in th.hosts[:n]]
    results = [Result(f"replacement, {n} hosts"), Result(f"adapt, {n} hosts")]
    for round_no in range(repeat):
        for result, case in zip(results, (replacement, adapt), strict=True):
            sample, error = clean_sample(th, functools.partial(case, th, hosts))
            if error is not None:
                result.errors.append(f"round {round_no + 1}: {error}")
            if sample is None:
                continue
            for key, value in sample.items():
                result.samples.setdefault(key, []).append(value)
            shown = ", ".join(f"{k} {v:.2f} s" for k, v in sample.items())
            print(f"  {result.name}, round {round_no + 1}/{repeat}: {shown}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.healing", description=__doc__)
    parser.add_argument("--hosts", default="3,8", help="host counts, comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.hosts.split(",")]
    logging.getLogger("distributed").setLevel(logging.ERROR)
    results: list[Result] = []
    with TestHosts(max(counts)) as th:
        for n in counts:
            results += run(th, n, args.repeat)
        leftover_check(th)
    rows = []
    for result in results:
        for key, values in result.samples.items():
            rows.append(
                [
                    result.name,
                    key,
                    f"{statistics.median(values):.2f}",
                    f"{min(values):.2f}",
                    f"{max(values):.2f}",
                    f"{len(result.errors)}/{len(values) + len(result.errors)}",
                ]
            )
        if not result.samples:
            rows.append([result.name, "-", "-", "-", "-", f"{len(result.errors)} failed"])
    print_table(
        f"self-healing and adapt (seconds, {args.repeat} samples each)",
        ["case", "measure", "median", "min", "max", "failures"],
        rows,
    )
    for result in results:
        for error in result.errors:
            print(f"{result.name} failed in {error}")
    return results


if __name__ == "__main__":
    from benchmarks.common import exit_code

    raise SystemExit(exit_code(main()))
