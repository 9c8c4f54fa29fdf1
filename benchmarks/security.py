"""What TLS costs: LazySSHCluster with TLS (the default) against ``security=False``, in one run.

For each network mode (direct, tunnelled) and each setting, on the same hosts, interleaved:

1. Start: ``LazySSHCluster(hosts)`` until every worker is registered and the end-to-end check
   passed (certificates made and delivered included).
2. Worker to worker: a block of ``--mib`` MiB made on the first host's worker is fetched by the
   second host's worker (``len`` pinned there); MiB/s of that fetch, median of ``--transfers``.

3. The floor on this machine, without Dask: ``--mib`` MiB messages over a loopback socket pair,
   plain and wrapped in Python's ``ssl`` (TLS 1.3, the cluster's own kind of certificate), and
   ``openssl s_server``/``s_client`` moving the same bytes.

Targets: TLS adds at most 10 % to the start (median against median, per mode); direct
worker-to-worker throughput with TLS at least 0.8x without (MISS, not FAIL: the floor rows say
how much of the loss is Python's ssl itself). Every sample runs on a fresh cluster; nothing may
be left on any host.
Run: ``python -m benchmarks.security [--hosts 3] [--repeat 3] [--mib 64]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.common import clean_sample, leftover_check, print_table
from lazycluster_tasks.testing.hosts import TestHosts

MODES = ("direct", "tunnelled")
TARGET = 1.10
THROUGHPUT_TARGET = 0.8  # TLS / plain, worker to worker, direct


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


def _pair_rate(mib: int, context: tuple[ssl.SSLContext, ssl.SSLContext] | None) -> float:
    """MiB/s of ``mib`` MiB sent over a loopback socket pair (wrapped in TLS with ``context``:
    server, client), in one message as Dask sends a frame, read into a buffer as it reads."""
    size = mib << 20
    data = os.urandom(size)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def send() -> None:
            conn, _ = server.accept()
            with conn:
                stream = context[0].wrap_socket(conn, server_side=True) if context else conn
                stream.sendall(data)

        sender = threading.Thread(target=send, name="bench-tls-floor")
        sender.start()
        raw = socket.create_connection(("127.0.0.1", port))
        stream = context[1].wrap_socket(raw) if context else raw
        view, got = memoryview(bytearray(size)), 0
        start = time.perf_counter()
        with stream:
            while got < size:
                n = stream.recv_into(view[got:])
                if not n:
                    break
                got += n
            took = time.perf_counter() - start
            sender.join()
    return got / (1 << 20) / took


def _openssl_rate(mib: int, cert: str, key: str) -> float | None:
    """MiB/s of ``mib`` MiB through ``openssl s_client`` to ``openssl s_server`` (None without
    openssl)."""
    if shutil.which("openssl") is None:
        return None
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", cert, "-key", key,
         "-quiet", "-naccept", "2"],  # the readiness check, then the transfer
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):  # until it listens
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            time.sleep(0.05)
        with tempfile.TemporaryFile() as data:  # random bytes, made before the clock starts
            data.write(os.urandom(mib << 20))
            data.seek(0)
            start = time.perf_counter()
            done = subprocess.run(
                ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet", "-no_ign_eof"],
                stdin=data, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                timeout=120, check=False,
            )  # fmt: skip
            took = time.perf_counter() - start
        if done.returncode != 0:
            return None
    finally:
        server.kill()
        server.wait()
    return mib / took


def floor(mib: int, repeat: int) -> dict[str, float | None]:
    """The floor rows: plain and TLS socket pairs, and OpenSSH's own TLS tool, medians."""
    from lazycluster_tasks.security import ClusterTLS

    tls = ClusterTLS.generate()
    with tempfile.TemporaryDirectory() as folder:
        cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        for path, text in ((cert, tls.scheduler_cert), (key, tls.scheduler_key)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as handle:
                handle.write(text)
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(cert, key)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.load_verify_locations(cadata=tls.ca)
        client.check_hostname = False
        plain = [_pair_rate(mib, None) for _ in range(repeat)]
        wrapped = [_pair_rate(mib, (server, client)) for _ in range(repeat)]
        tool = [_openssl_rate(mib, cert, key) for _ in range(repeat)]
    found = [t for t in tool if t is not None]
    return {
        "socket pair, plain": statistics.median(plain),
        "socket pair, Python ssl": statistics.median(wrapped),
        "openssl s_server/s_client": statistics.median(found) if found else None,
    }


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
    rates = floor(args.mib, args.repeat)
    plain = rates["socket pair, plain"] or 1.0
    rows = [
        [name, "-" if r is None else f"{r:.0f}", "-" if r is None else f"{r / plain:.2f}x"]
        for name, r in rates.items()
    ]
    print_table(
        f"the floor on this machine: {args.mib} MiB over loopback (medians of {args.repeat})",
        ["case", "MiB/s", "vs plain"],
        rows,
    )
    targets = []
    direct_on, direct_off = (next(c for c in cases if c.mode == "direct" and c.tls is t)
                             for t in (True, False))  # fmt: skip
    if direct_on.rates and direct_off.rates:
        ratio = statistics.median(direct_on.rates) / statistics.median(direct_off.rates)
        status = "PASS" if ratio >= THROUGHPUT_TARGET else "MISS"
        name = f"direct: TLS worker->worker >= {THROUGHPUT_TARGET}x no TLS"
        targets.append(Target(name, ratio, status))
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
