"""What TLS costs: LazySSHCluster with TLS (the default) against ``security=False``, in one run.

For each network mode (direct, tunnelled) and each setting, on the same hosts, interleaved:

1. Start: ``LazySSHCluster(hosts)`` until every worker is registered and the end-to-end check
   passed (certificates made and delivered included).
2. Worker to worker: a block of ``--mib`` MiB made on the first host's worker is fetched by the
   second host's worker (``len`` pinned there); MiB/s of that fetch, median of ``--transfers``.

Target: TLS adds at most 10 % to the start (median against median, per mode). Throughput is
reported without a target. Every sample runs on a fresh cluster; nothing may be left on any host.
Run: ``python -m benchmarks.security [--hosts 3] [--repeat 3] [--mib 64]``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.common import clean_sample, leftover_check, print_table
from lazycluster_tasks.testing.hosts import TestHosts

MODES = ("direct", "tunnelled")
TARGET = 1.10


@dataclass
class Case:
    mode: str
    tls: bool
    starts: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)  # MiB/s
    errors: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.mode}, {'TLS' if self.tls else 'no TLS'}"


@dataclass
class Target:
    name: str
    ratio: float | None
    status: str


def sample(th: TestHosts, hosts: list[str], case: Case, mib: int, transfers: int) -> bool:
    from distributed import Client, wait

    from lazycluster_tasks.ssh_cluster import LazySSHCluster

    t0 = time.perf_counter()
    cluster = LazySSHCluster(
        hosts,
        ssh_config_path=str(th.ssh_config_path),
        network_mode=case.mode,
        security=case.tls,
        threads_per_worker=1,
    )
    with cluster, Client(cluster) as client:  # the default client: wait() uses it
        case.starts.append(time.perf_counter() - t0)
        info = client.scheduler_info(n_workers=-1)["workers"]
        by_host = {str(w["name"]).rsplit("-", 1)[0]: a for a, w in info.items()}
        source, target = by_host[hosts[0]], by_host[hosts[1]]
        rates = []
        for _ in range(transfers):  # random bytes: compression cannot shrink them
            block = client.submit(
                os.urandom, mib << 20, workers=[source], allow_other_workers=False, pure=False
            )
            wait(block, timeout=60)
            start = time.perf_counter()
            size = client.submit(
                len, block, workers=[target], allow_other_workers=False, pure=False
            ).result(timeout=120)
            rates.append(size / (1 << 20) / (time.perf_counter() - start))
            del block
        case.rates.append(statistics.median(rates))
    return True  # the sample is in ``case``


def main(argv: Sequence[str] | None = None) -> list[Target]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.security", description=__doc__)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--transfers", type=int, default=3)
    args = parser.parse_args(argv)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    logging.getLogger("lazycluster_tasks.security").setLevel(logging.ERROR)  # the opt-out warning
    cases = [Case(mode, tls) for mode in MODES for tls in (True, False)]
    with TestHosts(max(args.hosts, 2)) as th:
        hosts = [h.name for h in th.hosts[: max(args.hosts, 2)]]
        for round_no in range(args.repeat):
            for case in cases:  # interleaved: load drifts hit every case alike
                run = functools.partial(sample, th, hosts, case, args.mib, args.transfers)
                done, error = clean_sample(th, run)
                if error is not None:
                    case.errors.append(f"round {round_no + 1}: {error}")
                if done is None:
                    continue
                print(
                    f"  {case.name}, round {round_no + 1}: start {case.starts[-1]:.2f} s, "
                    f"worker->worker {case.rates[-1]:.0f} MiB/s",
                    flush=True,
                )
        leftover_check(th)
    rows = []
    for case in cases:
        start = f"{statistics.median(case.starts):.2f}" if case.starts else "-"
        rate = f"{statistics.median(case.rates):.0f}" if case.rates else "-"
        rows.append([case.name, start, rate, f"{len(case.errors)}/{args.repeat}"])
    print_table(
        f"TLS on and off, {len(hosts)} hosts (medians of {args.repeat}; {args.mib} MiB fetches)",
        ["case", "start s", "worker->worker MiB/s", "failures"],
        rows,
    )
    targets = []
    for mode in MODES:
        on, off = (next(c for c in cases if c.mode == mode and c.tls is t) for t in (True, False))
        if on.errors or off.errors or not on.starts or not off.starts:
            targets.append(Target(f"{mode}: TLS start <= {TARGET}x", None, "FAIL"))
            continue
        ratio = statistics.median(on.starts) / statistics.median(off.starts)
        status = "PASS" if ratio <= TARGET else "MISS"
        targets.append(Target(f"{mode}: TLS start <= {TARGET}x no TLS", ratio, status))
    print_table(
        "targets",
        ["target", "ratio", "status"],
        [[t.name, f"{t.ratio:.2f}" if t.ratio else "-", t.status] for t in targets],
    )
    for case in cases:
        for error in case.errors:
            print(f"{case.name} failed in {error}")
    return targets


if __name__ == "__main__":
    from benchmarks.common import exit_code

    raise SystemExit(exit_code(main()))
