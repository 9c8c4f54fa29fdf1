"""The data plane at scale: what moving data between workers costs this machine.

For each host count (``--hosts 3,8,16``) and network mode (direct, tunnelled), on one fresh
LazySSHCluster (one worker per host, one thread each):

1. Forwards: SSH forwards the cluster holds (-L here, -R on the hosts), and this process's threads
   and file descriptors once every worker is ready.
2. All-to-all: every worker makes a block of ``--mib`` MiB; then every worker fetches every other
   worker's block (n x (n-1) transfers at once). Time, MiB/s moved between workers, this
   process's CPU seconds per GiB relayed (tunnelled bytes pass through it), and its peak threads
   and file descriptors meanwhile.
3. Cleanup: ``close()`` until it returns.

No targets yet (issue 10 sets them: tunnelled >= 0.5x direct, forwards O(workers)); every failed
run is counted and fails the benchmark. Nothing may be left on any host.
Run: ``python -m benchmarks.dataplane [--hosts 3,8,16] [--mib 4]``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import psutil

from benchmarks.common import clean_sample, leftover_check, print_table
from lazycluster_tasks.testing.hosts import TestHosts

MODES = ("direct", "tunnelled")
TIMEOUT = 300.0


@dataclass
class Row:
    hosts: int
    mode: str
    values: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def status(self) -> str:
        return "FAIL" if self.error else "PASS"

    @property
    def name(self) -> str:
        return f"{self.hosts} hosts, {self.mode}"


class _Peak:
    """Peak threads and descriptors of this process, sampled every 20 ms."""

    def __init__(self) -> None:
        self.threads = self.fds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.02):
            self.threads = max(self.threads, threading.active_count() - 1)  # not ourselves
            self.fds = max(self.fds, me.num_fds())

    def __enter__(self) -> _Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run(th: TestHosts, n: int, mode: str, mib: int) -> dict[str, str]:
    from distributed import Client, wait

    from lazycluster_tasks.ssh_cluster import LazySSHCluster

    hosts = [h.name for h in th.hosts[:n]]
    cluster = LazySSHCluster(
        hosts, ssh_config_path=str(th.ssh_config_path), network_mode=mode, threads_per_worker=1
    )
    out: dict[str, str] = {}
    try:
        with Client(cluster) as client:
            client.wait_for_workers(n, timeout=60)
            group = cluster.engine.group
            forwards = sum(len(rt.tunnels) for rt in group.runtimes)
            out["forwards"] = str(forwards)
            out["threads ready"] = str(threading.active_count())
            out["fds ready"] = str(psutil.Process().num_fds())
            workers = list(client.scheduler_info(n_workers=-1)["workers"])
            blocks = {
                w: client.submit(
                    os.urandom, mib << 20, workers=[w], allow_other_workers=False, pure=False
                )
                for w in workers
            }
            wait(list(blocks.values()), timeout=60)
            me = psutil.Process()
            cpu0 = sum(me.cpu_times()[:2])
            start = time.perf_counter()
            with _Peak() as peak:
                fetched = [
                    client.submit(
                        len, blocks[source], workers=[target], allow_other_workers=False,
                        pure=False,
                    )
                    for target in workers
                    for source in workers
                    if source != target
                ]  # fmt: skip
                total = sum(client.gather(fetched))
            elapsed = time.perf_counter() - start
            cpu = sum(me.cpu_times()[:2]) - cpu0
            if total != len(fetched) * (mib << 20):
                raise RuntimeError(f"{total} bytes fetched, expected {len(fetched) * mib} MiB")
            out["all-to-all s"] = f"{elapsed:.2f}"
            out["MiB/s"] = f"{total / (1 << 20) / elapsed:.0f}"
            out["ctrl CPU s/GiB"] = f"{cpu / (total / (1 << 30)):.1f}"
            out["peak threads"] = str(peak.threads)
            out["peak fds"] = str(peak.fds)
    finally:
        t0 = time.perf_counter()
        cluster.close()
        out["cleanup s"] = f"{time.perf_counter() - t0:.2f}"
    return out


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dataplane", description=__doc__)
    parser.add_argument("--hosts", default="3,8,16", help="host counts, comma-separated")
    parser.add_argument("--mib", type=int, default=4)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.hosts.split(",")]
    logging.getLogger("distributed").setLevel(logging.ERROR)
    rows: list[Row] = []
    with TestHosts(max(counts)) as th:
        for n in counts:
            for mode in MODES:
                row = Row(n, mode)
                values, error = clean_sample(th, functools.partial(run, th, n, mode, args.mib))
                row.values, row.error = values or {}, error and error[:300]
                print(f"  {row.name}: {row.error or row.values}", flush=True)
                rows.append(row)
        leftover_check(th)
    columns = ["forwards", "threads ready", "fds ready", "all-to-all s", "MiB/s",
               "ctrl CPU s/GiB", "peak threads", "peak fds", "cleanup s"]  # fmt: skip
    print_table(
        f"data plane: all-to-all of {args.mib} MiB blocks, one worker per host",
        ["case", *columns, "status"],
        [[r.name, *(r.values.get(c, "-") for c in columns), r.status] for r in rows],
    )
    for row in rows:
        if row.error:
            print(f"{row.name} failed: {row.error}")
    return rows


if __name__ == "__main__":
    from benchmarks.common import exit_code

    raise SystemExit(exit_code(main()))
