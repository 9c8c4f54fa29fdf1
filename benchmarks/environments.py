"""What the environment's journey to the hosts costs: starts on hosts that share nothing with this
machine (a filesystem of their own, an unprivileged user, only the system's Python), in one run.

For each host count, interleaved, every start until every worker is registered and the end-to-end
check passed (``LazySSHCluster(hosts)``, 1 thread per worker):

1. first start: the hosts have no environment (their cache emptied before), so the start sends
   this machine's (the packs here are made once, before the first sample, and kept);
2. cached start: the environment is there (the start checks it, sends nothing);
3. pre-installed: the environment's interpreter given by hand (``python=``; what a site that
   installed everything itself has), no check at all.

Reported: seconds (medians), MiB sent per host, CPU-seconds here, and the first start's MiB/s per
host. The link, in the same run: the same bytes (the packs a first start sends) copied by plain
``ssh host 'cat > /dev/null'`` to every host at once (OpenSSH, a new connection each: MiB/s per
host). Targets: the cached start at most 1.1x the pre-installed one; the first start's sync of a
host (its check, transfer, unpacking and venv, as the engine logs it) at most LINK_FACTOR x the
time the link takes for its bytes. Nothing may be left on any host. Run:
``python -m benchmarks.environments [--hosts 3 8] [--repeat 2] [--warmup 1]``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import resource
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import clean_sample, leftover_check, print_table
from lazycluster_tasks import cluster_environments
from lazycluster_tasks.testing.hosts import TestHosts

TARGET = 1.10
#: The first start's sync of a host within this many times bytes / link speed.
LINK_FACTOR = 2.0
CASES = ("first start", "cached start", "pre-installed")


@dataclass
class Case:
    hosts: int
    name: str
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)  # MiB per host
    rate: list[float] = field(default_factory=list)  # MiB/s per host
    sync: list[float] = field(default_factory=list)  # s per host, the engine's figure
    errors: list[str] = field(default_factory=list)


@dataclass
class Target:
    name: str
    ratio: float | None
    status: str


class _Sent(logging.Handler):
    """The engine's 'environment ... made: N MiB sent in S s' lines, as (MiB, seconds)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.found: list[tuple[float, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if " MiB sent in " in text:
            mib = float(text.split(" made: ", 1)[1].split()[0])
            seconds = float(text.rsplit(" in ", 1)[1].split()[0])
            self.found.append((mib, seconds))


def _cpu() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def sample(th: TestHosts, hosts: list[str], case: Case, python: str | None) -> None:
    from distributed import Client

    from lazycluster_tasks.ssh_cluster import LazySSHCluster

    if case.name == "first start":
        for host in hosts:
            shutil.rmtree(th.home_dir(host) / ".cache" / "lazycluster", ignore_errors=True)
    sent = _Sent()
    cluster_environments.logger.addHandler(sent)
    options: dict[str, Any] = {"threads_per_worker": 1}
    if case.name == "pre-installed":
        options.update(python=python, environment=None)
    cpu, t0 = _cpu(), time.perf_counter()
    try:
        cluster = LazySSHCluster(hosts, ssh_config_path=str(th.ssh_config_path), **options)
        with cluster, Client(cluster) as client:
            client.wait_for_workers(len(hosts), timeout=120)
            case.seconds.append(time.perf_counter() - t0)
            case.cpu.append(_cpu() - cpu)
    finally:
        cluster_environments.logger.removeHandler(sent)
    case.sent.append(statistics.median([m for m, _ in sent.found]) if sent.found else 0.0)
    if sent.found:
        case.rate.append(statistics.median([m / s for m, s in sent.found if s > 0]))
        case.sync.append(statistics.median([s for _, s in sent.found]))


def link(th: TestHosts, hosts: list[str]) -> tuple[float, float]:
    """(MiB, MiB/s per host, median): the packs a first start sends, copied by plain ssh to
    every host at once."""
    from lazycluster_tasks import environments
    from lazycluster_tasks.settings import settings

    manifest = environments.current(None, [], None)  # what LazySSHCluster(hosts) sends
    packs = environments.Packs(os.path.join(settings().cache_directory, "packs"))
    size = sum(packs.path(u).stat().st_size for u in manifest.units)
    seconds: dict[str, float] = {}

    def copy(host: str) -> None:
        argv = ["ssh", "-F", str(th.ssh_config_path), host, "cat > /dev/null"]
        t0 = time.perf_counter()
        with (
            environments.stream(packs, manifest.units) as data,
            subprocess.Popen(argv, stdin=subprocess.PIPE) as ssh,
        ):
            assert ssh.stdin is not None
            shutil.copyfileobj(data, ssh.stdin, 1 << 18)
            ssh.stdin.close()
            if ssh.wait(timeout=600) == 0:
                seconds[host] = time.perf_counter() - t0

    threads = [threading.Thread(target=copy, args=(h,)) for h in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(660)
    if len(seconds) != len(hosts):
        raise RuntimeError(f"the link copy failed on {sorted(set(hosts) - set(seconds))}")
    mib = size / 2**20
    return mib, statistics.median(mib / s for s in seconds.values())


def main(argv: Sequence[str] | None = None) -> list[Target]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.environments", description=__doc__)
    parser.add_argument("--hosts", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds first (they make the packs here)"
    )
    args = parser.parse_args(argv)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    cluster_environments.logger.setLevel(logging.INFO)
    cases: list[Case] = []
    links: dict[int, tuple[float, float]] = {}  # hosts -> (MiB, MiB/s per host)
    for count in args.hosts:
        here = [Case(count, name) for name in CASES]
        cases += here
        with TestHosts(count, user=True, private=True) as th:
            hosts = [h.name for h in th.hosts]
            python = None
            for round_no in range(args.warmup + args.repeat):  # warm-up rounds make the packs
                for case in here:
                    if case.name == "pre-installed" and python is None:
                        continue  # known once an environment was made
                    run = functools.partial(sample, th, hosts, case, python)
                    _, error = clean_sample(th, run)
                    if error is not None:
                        case.errors.append(f"round {round_no + 1}: {error}")
                        print(f"  {count} hosts, {case.name}: {case.errors[-1]}", flush=True)
                    if round_no < args.warmup:  # made the packs (first) and the env (cached)
                        for values in (case.seconds, case.cpu, case.sent, case.rate, case.sync):
                            values.clear()
                    if case.name != "pre-installed":  # the one a start used last
                        envs = th.home_dir(hosts[0]) / ".cache" / "lazycluster" / "envs"
                        made = [p for p in envs.iterdir() if not p.name.startswith(".")]
                        if made:
                            last = max(
                                made, key=lambda p: (p / "lazycluster-env.json").stat().st_mtime
                            )
                            python = (
                                f"/home/{th.user}/.cache/lazycluster/envs/{last.name}/bin/python"
                            )
                    if case.seconds and round_no >= args.warmup:
                        print(
                            f"  {count} hosts, {case.name}, round {round_no - args.warmup + 1}: "
                            f"{case.seconds[-1]:.2f} s, {case.sent[-1]:.1f} MiB/host",
                            flush=True,
                        )
            copies = [link(th, hosts) for _ in range(args.repeat)]  # the packs are made
            links[count] = (copies[0][0], statistics.median(r for _, r in copies))
            print(f"  {count} hosts, link: {links[count][1]:.0f} MiB/s per host", flush=True)
            leftover_check(th)
    rows = []
    for case in cases:

        def med(values: list[float], digits: int = 2) -> str:
            return f"{statistics.median(values):.{digits}f}" if values else "-"

        rows.append(
            [
                f"{case.hosts} hosts, {case.name}",
                med(case.seconds),
                med(case.sent, 1),
                med(case.rate, 0),
                med(case.cpu, 1),
                f"{len(case.errors)}/{args.repeat}",
            ]
        )
        if case.name == CASES[-1]:
            mib, rate = links[case.hosts]
            name = f"{case.hosts} hosts, link (ssh cat)"
            rows.append([name, f"{mib / rate:.2f}", f"{mib:.1f}", f"{rate:.0f}", "-", "-"])
    print_table(
        f"environments on hosts that share nothing (medians of {args.repeat})",
        ["case", "start s", "MiB sent/host", "MiB/s/host", "CPU-s here", "failures"],
        rows,
    )
    targets = []
    for count in args.hosts:
        cached, pre = (
            next(c for c in cases if c.hosts == count and c.name == n) for n in CASES[1:]
        )
        if cached.errors or pre.errors or not cached.seconds or not pre.seconds:
            targets.append(
                Target(f"{count} hosts: cached <= {TARGET}x pre-installed", None, "FAIL")
            )
            continue
        ratio = statistics.median(cached.seconds) / statistics.median(pre.seconds)
        status = "PASS" if ratio <= TARGET else "MISS"
        targets.append(Target(f"{count} hosts: cached <= {TARGET}x pre-installed", ratio, status))
    for count in args.hosts:
        first = next(c for c in cases if c.hosts == count and c.name == CASES[0])
        name = f"{count} hosts: first start's sync <= {LINK_FACTOR}x bytes / link"
        if first.errors or not first.sync:
            targets.append(Target(name, None, "FAIL"))
            continue
        bound = statistics.median(first.sent) / links[count][1]  # s the link takes
        ratio = statistics.median(first.sync) / bound
        targets.append(Target(name, ratio, "PASS" if ratio <= LINK_FACTOR else "MISS"))
    print_table(
        "targets",
        ["target", "ratio", "status"],
        [[t.name, f"{t.ratio:.2f}" if t.ratio is not None else "-", t.status] for t in targets],
    )
    return targets


if __name__ == "__main__":
    main()
