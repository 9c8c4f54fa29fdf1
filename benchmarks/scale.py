"""The controller's cost as hosts grow, and a model of it up to 1,000 hosts.

For each host count (``--hosts 3,8,16,32``) and mode (direct, tunnelled), one LazySSHCluster
with one worker per host (one thread, a nanny) is started, left idle and closed, and this
process — the controller — is measured:

* start: wall seconds until every worker registered (tunnelled: and the host-to-host links'
  set-up ended), CPU-seconds (user + system) spent, threads, file descriptors and RSS after it;
* idle: CPU-seconds per second over ``--idle`` seconds (healing checks, link health checks,
  SSH keepalives, the monitor client);
* cleanup: wall and CPU-seconds of ``close()``; nothing may be left on the hosts;
* per host: link masters (``ssh`` clients) on the busiest host while it runs (as many sshd
  sessions serve them at their far ends).

Each measure is then fitted by least squares as ``a + b·N`` and as ``a + b·N + c·N²``; the table
gives the per-host cost ``b``, whether the quadratic term matters (it explains more than 5 % of
the value at the largest N measured), and the projection to 256 and 1,000 hosts (linear fit;
quadratic where it matters). All hosts share this machine's two cores, so start and CPU figures
include the hosts' own work competing with the controller: read them as upper bounds.

Run: ``python -m benchmarks.scale [--hosts 3,8,16,32] [--idle 10]``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from benchmarks.common import (
    FAIL,
    MISS,
    PASS,
    clean_sample,
    lazy_cluster,
    leftover_check,
    print_table,
)
from lazycluster_tasks import limits
from lazycluster_tasks.testing.hosts import TestHosts

MODES = ("direct", "tunnelled")
MEASURES = (
    "start s",
    "start CPU s",
    "threads",
    "fds",
    "RSS MiB",
    "idle CPU s/s",
    "cleanup s",
    "cleanup CPU s",
    "SSH procs/host",
)
PROJECT = (256, 1000)
#: Targets: no measure at the controller grows with hosts squared; idle stays cheap.
IDLE_CPU_PER_HOST = 0.01  # CPU-seconds per second per host, at most


@dataclass
class Row:
    hosts: int
    mode: str
    values: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _ssh_processes(th: TestHosts, hosts: Sequence[str]) -> int:
    """ssh clients (link masters) on the busiest host; each has one sshd session at its far
    end, which the test hosts do not list (they leave sshd out of what runs there)."""
    most = 0
    for host in hosts:
        count = sum(1 for p in th.processes(host) if p.name() in ("ssh", "sshd", "sshd-session"))
        most = max(most, count)
    return most


def run(th: TestHosts, n: int, mode: str, idle: float) -> dict[str, float]:
    from distributed import Client

    me = psutil.Process()
    hosts = [h.name for h in th.hosts[:n]]
    cpu0, t0 = _cpu(me), time.perf_counter()
    cluster = lazy_cluster(th, n, mode)
    out: dict[str, float] = {}
    try:
        with Client(cluster) as client:
            client.wait_for_workers(n, timeout=300)
            links = getattr(cluster.engine.routing, "links", None)
            if links is not None:
                links.wait()
            out["start s"] = time.perf_counter() - t0
            out["start CPU s"] = _cpu(me) - cpu0
            out["threads"] = threading.active_count()
            out["fds"] = me.num_fds()
            out["RSS MiB"] = me.memory_info().rss / 2**20
            out["SSH procs/host"] = _ssh_processes(th, hosts)
            cpu1 = _cpu(me)
            time.sleep(idle)
            out["idle CPU s/s"] = (_cpu(me) - cpu1) / idle
    finally:
        cpu2, t2 = _cpu(me), time.perf_counter()
        cluster.close()
        out["cleanup s"] = time.perf_counter() - t2
        out["cleanup CPU s"] = _cpu(me) - cpu2
    return out


def fit(points: Sequence[tuple[int, float]], degree: int) -> list[float]:
    """Least-squares polynomial coefficients (constant first) through ``points``."""
    size = degree + 1
    matrix = [
        [sum(float(n) ** (i + j) for n, _ in points) for j in range(size)] for i in range(size)
    ]
    vector = [sum(v * float(n) ** i for n, v in points) for i in range(size)]
    for col in range(size):  # Gauss-Jordan with partial pivoting (at most 3 x 3)
        pivot = max(range(col, size), key=lambda r: abs(matrix[r][col]))
        matrix[col], matrix[pivot] = matrix[pivot], matrix[col]
        vector[col], vector[pivot] = vector[pivot], vector[col]
        if matrix[col][col] == 0:
            return [0.0] * size
        for row in range(size):
            if row != col:
                factor = matrix[row][col] / matrix[col][col]
                matrix[row] = [
                    a - factor * b for a, b in zip(matrix[row], matrix[col], strict=True)
                ]
                vector[row] -= factor * vector[col]
    return [vector[i] / matrix[i][i] for i in range(size)]


def value_at(coefficients: Sequence[float], n: float) -> float:
    return sum(c * n**i for i, c in enumerate(coefficients))


@dataclass
class Model:
    mode: str
    measure: str
    linear: list[float]
    quadratic: list[float]
    largest: int

    points: list[tuple[int, float]] = field(default_factory=list)

    def _residual(self, coefficients: Sequence[float]) -> float:
        return sum((v - value_at(coefficients, n)) ** 2 for n, v in self.points)

    @property
    def quadratic_matters(self) -> bool:
        """Growth with N² shows: the N² term is positive, gives more than 20 % of the value at
        the largest N measured, and fits at least twice as well as a line (four noisy points
        always fit a parabola a little better)."""
        c = self.quadratic[2]
        top = abs(value_at(self.quadratic, self.largest)) or 1.0
        better = self._residual(self.quadratic) * 2 <= self._residual(self.linear)
        return c > 0 and c * self.largest**2 > 0.2 * top and better

    def at(self, n: int) -> float:
        return value_at(self.quadratic if self.quadratic_matters else self.linear, n)


def models(rows: Sequence[Row]) -> list[Model]:
    found = []
    for mode in MODES:
        good = [r for r in rows if r.mode == mode and not r.error]
        if len({r.hosts for r in good}) < 3:
            continue
        for measure in MEASURES:
            points = [(r.hosts, r.values[measure]) for r in good if measure in r.values]
            if len(points) < 3:
                continue
            largest = max(n for n, _ in points)
            found.append(Model(mode, measure, fit(points, 1), fit(points, 2), largest, points))
    return found


def main(argv: Sequence[str] | None = None) -> list[Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    parser.add_argument("--hosts", default="3,8,16,32", help="host counts, comma-separated")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds left idle")
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"network modes, comma-separated ({MODES})"
    )
    args = parser.parse_args(argv)
    modes = [m for m in MODES if m in args.modes.split(",")]
    if not modes or set(args.modes.split(",")) - set(MODES):
        parser.error(f"--modes takes {', '.join(MODES)}: {args.modes!r}")
    counts = sorted({int(c) for c in args.hosts.split(",")})
    logging.getLogger("distributed").setLevel(logging.ERROR)
    logging.getLogger("lazycluster_tasks").setLevel(logging.WARNING)  # one line per case
    load = psutil.getloadavg()
    print(f"machine: {psutil.cpu_count()} cores, load average {load[0]:.2f} (1 min)")
    rows: list[Row] = []
    with TestHosts(max(counts)) as th:
        for n in counts:
            for mode in modes:
                row = Row(n, mode)
                values, error = clean_sample(th, functools.partial(run, th, n, mode, args.idle))
                row.values, row.error = values or {}, error and error[:300]
                shown = {k: round(v, 3) for k, v in row.values.items()}
                print(f"  {n} hosts, {mode}: {row.error or shown}", flush=True)
                rows.append(row)
        leftover_check(th)
    print_table(
        "the controller as hosts grow (one worker per host)",
        ["hosts", "mode", *MEASURES, "status"],
        [
            [
                r.hosts,
                r.mode,
                *(f"{r.values[m]:.3g}" if m in r.values else "-" for m in MEASURES),
                FAIL if r.error else PASS,
            ]
            for r in rows
        ],
    )
    fitted = models(rows)
    print_table(
        "model: per-host cost (linear fit), whether N² matters, projections",
        ["mode", "measure", "a", "per host", "N² matters", *(f"at {p}" for p in PROJECT)],
        [
            [
                m.mode,
                m.measure,
                f"{m.linear[0]:.3g}",
                f"{m.linear[1]:.3g}",
                "yes" if m.quadratic_matters else "no",
                *(f"{m.at(p):.3g}" for p in PROJECT),
            ]
            for m in fitted
        ],
    )
    targets: list[tuple[str, str, str]] = []
    for m in fitted:
        if m.measure in ("threads", "fds", "RSS MiB", "start CPU s", "cleanup CPU s"):
            status = MISS if m.quadratic_matters else PASS
            targets.append((f"{m.mode}: {m.measure} grows linearly with hosts", "", status))
        if m.measure == "fds":  # what the engine raises this process's soft limit for
            per_host = m.linear[1]
            status = PASS if per_host <= limits.FILES_PER_HOST else MISS
            targets.append(
                (
                    f"{m.mode}: fds per host <= {limits.FILES_PER_HOST} (limits.FILES_PER_HOST)",
                    f"{per_host:.1f}",
                    status,
                )
            )
        if m.measure == "idle CPU s/s":
            per_host = m.linear[1]
            status = PASS if per_host <= IDLE_CPU_PER_HOST else MISS
            targets.append(
                (
                    f"{m.mode}: idle CPU <= {IDLE_CPU_PER_HOST} s/s per host",
                    f"{per_host:.4f}",
                    status,
                )
            )
    for r in rows:
        if r.error:
            targets.append((f"{r.hosts} hosts, {r.mode}", r.error, FAIL))
    print_table("scale targets", ["target", "value", "status"], [list(t) for t in targets])
    return [_Status(s) for _, _, s in targets]


@dataclass
class _Status:
    status: str


if __name__ == "__main__":
    from benchmarks.common import exit_code

    raise SystemExit(exit_code(main()))
