"""The data plane: moving data between workers, and what it costs this machine.

For each host count (``--hosts 3,8,16``), on one fresh cluster per case — LazySSHCluster direct,
LazySSHCluster tunnelled (host-to-host SSH links; the test hosts reach each other's port 22),
LazySSHCluster tunnelled without links (``host_links=False``: every worker byte through this
machine's relay, as on sites where links cannot engage, e.g. an sshd that reads keys only from a
central file) and ``distributed.deploy.ssh.SSHCluster`` (direct; needs asyncssh) — one worker
per host, one thread each. SSHCluster runs without TLS (Dask's default) and does not wait for
its remote processes to end at its close; ours use TLS and verify the stop
(``benchmarks/security.py`` measures what TLS costs):

1. Once every worker is ready (and, tunnelled, the links' set-up ended): SSH forwards this
   machine holds (-L here, -R on the hosts), host-to-host links up, this process's threads and
   file descriptors.
2. Pair: worker 1 fetches a ``--pair-mib`` MiB block from worker 0 (once untimed: the first
   opens and warms the connection; then ``--repeat`` times, median).
3. Ring: every worker fetches its neighbour's ``--ring-mib`` MiB block at once (n transfers;
   once untimed, then ``--repeat`` times, median). The blocks are large enough that the ring
   measures throughput, not each fetch's latency.
4. All-to-all: every worker fetches every other's ``--mib`` MiB block (n x (n-1) transfers
   at once).
   For 2-4: MiB/s moved between workers, this process's CPU seconds per GiB moved, its peak
   threads and descriptors.
5. Gather: the client here fetches a ``--pair-mib`` MiB block from the last worker
   (once untimed, then ``--repeat`` times, median): the controller's own traffic, which
   tunnelled crosses this machine's paramiko forward, not a link.
6. Cleanup: ``close()`` until it returns.
Also: seconds from creating the cluster until every worker registered (``start s``) and,
tunnelled, until the links' set-up ended (``links up s``; the cluster is usable before, with
worker traffic through this machine).

Targets, per host count: tunnelled pair, ring, all-to-all and gather throughput >= 0.8x
direct's, with the links and through the relay alike; this machine's forwards <= 2 x workers +
hosts (one -L per worker and nanny, one -R of the scheduler per host: linear, no forward per
worker per host); peak threads <= 4 x workers + 24; tunnelled cleanup <= 1 s. A failed run
fails its case; nothing may be left on any host. All hosts share this machine's cores: every
host's SSH encryption competes with every worker, which a site with its own CPUs per host does
not see. Run: ``python -m benchmarks.dataplane [--hosts 3,8,16] [--mib 4] [--ring-mib 32]
[--pair-mib 64]``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from benchmarks.common import (
    FAIL,
    MISS,
    PASS,
    clean_sample,
    drop_sshcluster_files,
    lazy_cluster,
    leftover_check,
    print_table,
    quiet_sshcluster,
    start_sshcluster,
)
from lazycluster_tasks.testing.hosts import TestHosts

RELAY = "tunnelled, relay"
#: case -> (network mode, LazySSHCluster options)
OURS = {
    "direct": ("direct", {}),
    "tunnelled": ("tunnelled", {}),
    RELAY: ("tunnelled", {"host_links": False}),
}
SSHCLUSTER = "SSHCluster"
RATIO = 0.8  # tunnelled / direct
#: what each tunnelled case is compared with direct on
THROUGHPUTS = ("pair MiB/s", "ring MiB/s", "all-to-all MiB/s", "gather MiB/s")
CLEANUP_S = 1.0
TIMEOUT = 300.0


@dataclass
class Row:
    hosts: int
    case: str
    values: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def status(self) -> str:
        return FAIL if self.error else PASS

    @property
    def name(self) -> str:
        return f"{self.hosts} hosts, {self.case}"


@dataclass
class Target:
    name: str
    value: str
    status: str


class _Peak:
    """Peak threads and descriptors of this process, sampled every 20 ms."""

    def __init__(self) -> None:
        self.threads = self.fds = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.02):
            self.threads = max(self.threads, threading.active_count())
            self.fds = max(self.fds, me.num_fds())

    def __enter__(self) -> _Peak:
        self._thread = threading.Thread(target=self._run, name="bench-peak")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _block(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.cache
def _expected(n: int, seed: int) -> str:
    return _sha(_block(n, seed))


def _moved(client: Any, transfers: list[tuple[str, str]], mib: int) -> float:
    """Each (source, target): target fetches a fresh block made on source; all at once.
    Returns seconds; checks every byte by digest."""
    from distributed import wait

    blocks = [
        client.submit(_block, mib << 20, i, workers=[s], allow_other_workers=False, pure=False)
        for i, (s, _) in enumerate(transfers)
    ]
    wait(blocks, timeout=TIMEOUT)  # made (where they are, not fetched here) before the clock starts
    start = time.perf_counter()
    seen = [
        client.submit(_sha, b, workers=[t], allow_other_workers=False, pure=False)
        for b, (_, t) in zip(blocks, transfers, strict=True)
    ]
    wait(seen, timeout=TIMEOUT)  # a lost worker is an error of its case, not a hang
    digests = client.gather(seen)
    elapsed = time.perf_counter() - start
    want = [_expected(mib << 20, i) for i in range(len(transfers))]
    if digests != want:
        raise RuntimeError("a worker received other bytes than were sent")
    client.cancel(blocks + seen)
    return elapsed


def _gathered(client: Any, worker: str, mib: int) -> float:
    """The client fetches a block made on ``worker``; returns seconds; checks the bytes."""
    from distributed import wait

    block = client.submit(_block, mib << 20, 0, workers=[worker], allow_other_workers=False,
                          pure=False)  # fmt: skip
    wait([block], timeout=TIMEOUT)
    start = time.perf_counter()
    data = block.result(timeout=TIMEOUT)
    elapsed = time.perf_counter() - start
    if _sha(data) != _expected(mib << 20, 0):
        raise RuntimeError("the client received other bytes than were sent")
    client.cancel([block])
    return elapsed


def measure(client: Any, n: int, args: argparse.Namespace, out: dict[str, str]) -> None:
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    for size, count in ((args.pair_mib, 1), (args.ring_mib, n), (args.mib, n * (n - 1))):
        for seed in range(count):
            _expected(size << 20, seed)  # the checks' own CPU is not counted below
    me = psutil.Process()
    moved_mib = 0.0
    cpu0 = sum(me.cpu_times()[:2])
    with _Peak() as peak:
        # each first transfer opens its pair's connection and warms it (measured at 16 hosts,
        # direct too: 55-106 MiB/s, then 82-237): one untimed, then the median of --repeat
        runs = args.repeat + 1
        pair = [_moved(client, [(workers[0], workers[1])], args.pair_mib) for _ in range(runs)]
        moved_mib += args.pair_mib * runs
        ring = [(workers[i], workers[(i + 1) % n]) for i in range(n)]
        rings = [_moved(client, ring, args.ring_mib) for _ in range(runs)]
        moved_mib += args.ring_mib * n * runs
        pairs = [(s, t) for s in workers for t in workers if s != t]
        all_s = _moved(client, pairs, args.mib)
        moved_mib += args.mib * len(pairs)
    cpu = sum(me.cpu_times()[:2]) - cpu0
    gather = [_gathered(client, workers[-1], args.pair_mib) for _ in range(runs)]
    out["gather MiB/s"] = f"{args.pair_mib / statistics.median(gather[1:]):.0f}"
    out["pair MiB/s"] = f"{args.pair_mib / statistics.median(pair[1:]):.0f}"
    out["ring MiB/s"] = f"{args.ring_mib * n / statistics.median(rings[1:]):.0f}"
    out["all-to-all MiB/s"] = f"{args.mib * len(pairs) / all_s:.0f}"
    out["ctrl CPU s/GiB"] = f"{cpu / (moved_mib / 1024):.2f}"
    out["peak threads"] = str(peak.threads)
    out["peak fds"] = str(peak.fds)


def run_ours(th: TestHosts, n: int, case: str, args: argparse.Namespace) -> dict[str, str]:
    from distributed import Client

    mode, options = OURS[case]
    t0 = time.perf_counter()
    cluster = lazy_cluster(th, n, mode, **options)
    out: dict[str, str] = {}
    try:
        with Client(cluster) as client:
            client.wait_for_workers(n, timeout=60)
            out["start s"] = f"{time.perf_counter() - t0:.1f}"
            links = getattr(cluster.engine.routing, "links", None)
            if links is not None:
                links.wait()  # their set-up follows the start, in the background
                out["links up s"] = f"{time.perf_counter() - t0:.1f}"
                up, down = links.summary()["links_up"], links.summary()["links_down"]
                out["links"] = f"{up}/{up + down}"
            runtimes = cluster.engine.group.runtimes
            out["forwards"] = str(sum(len(rt.tunnels) for rt in runtimes))
            out["threads ready"] = str(threading.active_count())
            out["fds ready"] = str(psutil.Process().num_fds())
            measure(client, n, args, out)
    finally:
        out["cleanup s"] = timed_close(cluster)
    return out


def timed_close(cluster: Any) -> str:
    """Close ``cluster``; the seconds it took, as the tables print them."""
    t0 = time.perf_counter()
    cluster.close()
    return f"{time.perf_counter() - t0:.2f}"


def run_sshcluster(th: TestHosts, n: int, args: argparse.Namespace) -> dict[str, str]:
    from distributed import Client

    out: dict[str, str] = {"forwards": "0"}
    with quiet_sshcluster():
        t0 = time.perf_counter()
        cluster = start_sshcluster(th, [h.address for h in th.hosts[:n]])
        out["threads ready"] = str(threading.active_count())
        try:
            with Client(cluster) as client:
                client.wait_for_workers(n, timeout=60)
                out["start s"] = f"{time.perf_counter() - t0:.1f}"
                out["fds ready"] = str(psutil.Process().num_fds())
                measure(client, n, args, out)
        finally:
            out["cleanup s"] = timed_close(cluster)
            # its remote processes leave by themselves (no scheduler left) within seconds
            deadline = time.monotonic() + 30
            while th.leftover_processes() and time.monotonic() < deadline:
                time.sleep(0.1)
            drop_sshcluster_files(th)
    return out


def targets(rows: list[Row]) -> list[Target]:
    found: list[Target] = []
    by = {(r.hosts, r.case): r for r in rows}

    def number(row: Row | None, key: str) -> float | None:
        if row is None or row.error or key not in row.values:
            return None
        return float(row.values[key])

    for n in sorted({r.hosts for r in rows}):
        direct, tunnelled = by.get((n, "direct")), by.get((n, "tunnelled"))
        for case in ("tunnelled", RELAY):
            if case == RELAY and (n, RELAY) not in by:
                continue  # not run (the smoke test's rows)
            for key in THROUGHPUTS:
                d, t = number(direct, key), number(by.get((n, case)), key)
                name = f"{n} hosts: {case} {key} >= {RATIO}x direct"
                if d is None or t is None:
                    found.append(Target(name, "-", FAIL))
                else:  # shown rounded down: a 0.796 is no "0.80x" beside a MISS
                    shown = f"{math.floor(t / d * 100 + 1e-9) / 100:.2f}x"
                    found.append(Target(name, shown, PASS if t >= RATIO * d else MISS))
        forwards, threads = number(tunnelled, "forwards"), number(tunnelled, "peak threads")
        bound = 2 * n + n  # one worker per host
        limit = 4 * n + 24
        cleanup = number(tunnelled, "cleanup s")
        for label, value, most in (
            (f"forwards <= 2 x workers + hosts ({bound})", forwards, bound),
            (f"peak threads <= 4 x workers + 24 ({limit})", threads, limit),
            (f"cleanup s <= {CLEANUP_S:g}", cleanup, CLEANUP_S),
        ):
            status = FAIL if value is None else PASS if value <= most else MISS
            shown = "-" if value is None else f"{value:g}"
            found.append(Target(f"{n} hosts: tunnelled {label}", shown, status))
    return found


def main(argv: Sequence[str] | None = None) -> list[Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dataplane", description=__doc__)
    parser.add_argument("--hosts", default="3,8,16", help="host counts, comma-separated")
    parser.add_argument("--mib", type=int, default=4, help="block size of all-to-all")
    parser.add_argument("--ring-mib", type=int, default=32, help="block size of the ring")
    parser.add_argument("--pair-mib", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="timed pairs, rings, gathers")
    parser.add_argument("--no-sshcluster", action="store_true", help="skip SSHCluster")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.hosts.split(",")]
    logging.getLogger("distributed").setLevel(logging.ERROR)
    cases: list[tuple[str, Callable[[TestHosts, int], dict[str, str]]]] = [
        (case, functools.partial(run_ours, case=case, args=args)) for case in OURS
    ]
    try:
        import asyncssh  # noqa: F401
    except ImportError:
        print("SSHCluster: skipped (asyncssh not installed: pip install -e '.[bench]')")
    else:
        if not args.no_sshcluster:
            cases.append((SSHCLUSTER, functools.partial(run_sshcluster, args=args)))
    rows: list[Row] = []
    with TestHosts(max(counts)) as th:
        for n in counts:
            for case, run in cases:
                row = Row(n, case)
                values, error = clean_sample(th, functools.partial(run, th, n))
                row.values, row.error = values or {}, error and error[:300]
                print(f"  {row.name}: {row.error or row.values}", flush=True)
                rows.append(row)
        leftover_check(th)
    columns = ["start s", "links up s", "forwards", "links", "threads ready", "fds ready",
               "pair MiB/s", "ring MiB/s", "all-to-all MiB/s", "ctrl CPU s/GiB", "peak threads",
               "peak fds", "gather MiB/s", "cleanup s"]  # fmt: skip
    print_table(
        f"data plane: one worker per host; pair {args.pair_mib} MiB and ring {args.ring_mib} MiB "
        f"blocks (after one untimed, medians of {args.repeat}), all-to-all {args.mib} MiB blocks",
        ["case", *columns, "status"],
        [[r.name, *(r.values.get(c, "-") for c in columns), r.status] for r in rows],
    )
    found = targets(rows)
    print_table("data plane targets", ["target", "value", "status"],
                [[t.name, t.value, t.status] for t in found])  # fmt: skip
    for row in rows:
        if row.error:
            print(f"{row.name} failed: {row.error}")
    return [*rows, *found]


if __name__ == "__main__":
    from benchmarks.common import exit_code

    raise SystemExit(exit_code(main()))
