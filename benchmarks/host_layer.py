"""Host layer vs OpenSSH multiplexing, side by side on the SSH test hosts.

a. Command round trip on an open connection: ``rt.connection.run("true")`` and ``rt.echo("x")``
   against ``ssh -S <master socket> host true`` (a new process per call) and against an
   in-process peer, paramiko's ``SSHClient.exec_command("true")`` on a connection opened
   beforehand: bare, and with ``TCP_NODELAY`` as ours sets it (bare paramiko leaves Nagle on, so
   its round trips wait for delayed ACKs). Target: ours <= 1.5x OpenSSH (median); the ratios to
   both paramiko peers are shown beside it.
b. ``hostname`` broadcast to 1, 4 and 8 hosts: ``RuntimeGroup.execute_task(broadcast=True,
   execute_async=False)`` against as many multiplexed ``ssh -S`` clients started at once.
   Target: ours <= 1.3x OpenSSH (median) at every host count.

Samples of ours and the peers are taken in turn (A B A B ...) after a warm-up, so all see the same
machine. A repetition that fails counts: the medians are over the successful ones, every table
says how many failed, and a target with a failed repetition is FAIL (exit status 1).
Run: ``python -m benchmarks.host_layer [--hosts 8] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import paramiko

from benchmarks.common import (
    OpenSSHMux,
    Timing,
    error_lines,
    exit_code,
    failures,
    fmt_ms,
    fmt_ratio,
    leftover_check,
    print_table,
    timeit_interleaved,
    verdict,
)
from lazycluster_tasks import Environment, Runtime, RuntimeGroup, RuntimeTask
from lazycluster_tasks.testing.hosts import TestHosts

ROUND_TRIP_TARGET = 1.5
BROADCAST_TARGET = 1.3
ROUND_TRIP_REPEAT = 30
BROADCAST_REPEAT = 10
BROADCAST_COUNTS = (1, 4, 8)
CLIENT_TIMEOUT = 30.0

ROUND_TRIP_TITLE = "a. command round trip on an open connection (host1)"
BROADCAST_TITLE = "b. `hostname` broadcast, all hosts at once"
SUMMARY_TITLE = "summary"
RUN = 'ours: rt.connection.run("true")'
ECHO = 'ours: rt.echo("x")'
OPENSSH = "OpenSSH: ssh -S <mux> host true"
PARAMIKO = 'paramiko: exec_command("true")'
PARAMIKO_NODELAY = "paramiko + TCP_NODELAY: same"


@dataclass(frozen=True)
class TargetResult:
    """One comparison against its limit."""

    name: str
    ours: Timing
    openssh: Timing
    limit: float

    @property
    def ratio(self) -> float:
        return self.ours.median / self.openssh.median

    @property
    def failed(self) -> int:
        return self.ours.failed + self.openssh.failed

    @property
    def passed(self) -> bool:
        return self.status == "PASS"

    @property
    def status(self) -> str:
        return verdict(self.ratio <= self.limit, self.failed)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.host_layer", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--hosts", type=int, default=8, help="test hosts to build (default: %(default)s)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help=f"timed samples per case (default: {ROUND_TRIP_REPEAT} for round trips, "
        f"{BROADCAST_REPEAT} for broadcasts)",
    )
    args = parser.parse_args(argv)
    if args.hosts < 1:
        parser.error("--hosts must be >= 1")
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


def broadcast_counts(hosts: int) -> list[int]:
    """1, 4 and 8 hosts where there are that many, and always all of them."""
    return sorted({c for c in BROADCAST_COUNTS if c <= hosts} | {hosts})


def _client(mux: OpenSSHMux, host: str, command: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        mux.argv(host, command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _finish(proc: subprocess.Popen[bytes]) -> str:
    try:
        out, err = proc.communicate(timeout=CLIENT_TIMEOUT)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{proc.args!r} exited {proc.returncode}: {err.decode().strip()}")
    return out.decode()


def openssh_broadcast(mux: OpenSSHMux, hosts: Sequence[str], command: str) -> dict[str, str]:
    """Start one multiplexed client per host at once, wait for all; stdout by host."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for h in hosts:
            procs[h] = _client(mux, h, command)
        return {h: _finish(p) for h, p in procs.items()}
    finally:  # on an error, no client is left running
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def ours_broadcast(group: RuntimeGroup, command: str) -> dict[str, str]:
    task = RuntimeTask("bench-broadcast").run_command(command)
    tasks = group.execute_task(task, broadcast=True, execute_async=False)
    assert isinstance(tasks, list)  # one task per runtime, in the group's order
    return {h: t.execution_log[-1] for h, t in zip(group.hosts, tasks, strict=True)}


def open_paramiko(th: TestHosts, host: str, nodelay: bool = False) -> paramiko.SSHClient:
    """A plain paramiko client to ``host``, with the settings of the hosts' ssh config;
    ``nodelay``: with TCP_NODELAY on its socket, as ours."""
    cfg = paramiko.SSHConfig.from_path(str(th.ssh_config_path)).lookup(host)
    client = paramiko.SSHClient()
    client.load_host_keys(str(th.known_hosts_path))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        cfg["hostname"],
        port=int(cfg["port"]),
        username=cfg["user"],
        key_filename=str(th.identity_file),
        look_for_keys=False,
        allow_agent=False,
        timeout=CLIENT_TIMEOUT,
        banner_timeout=CLIENT_TIMEOUT,
        auth_timeout=CLIENT_TIMEOUT,
    )
    transport = client.get_transport()
    if nodelay and transport is not None and isinstance(transport.sock, socket.socket):
        transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def paramiko_run(client: paramiko.SSHClient, command: str) -> str:
    """One command on the open connection: stdout to its end, then the exit status."""
    _, stdout, _ = client.exec_command(command, timeout=CLIENT_TIMEOUT)
    chan = stdout.channel
    try:
        out = stdout.read().decode()
        if not chan.status_event.wait(CLIENT_TIMEOUT):
            raise TimeoutError(f"no exit status of {command!r} after {CLIENT_TIMEOUT} s")
        if chan.exit_status != 0:
            raise RuntimeError(f"{command!r} exited {chan.exit_status}")
        return out
    finally:
        chan.close()


def bench_round_trip(
    runtime: Runtime,
    mux: OpenSSHMux,
    bare: paramiko.SSHClient,
    nodelay: paramiko.SSHClient,
    repeat: int,
) -> tuple[list[list[str]], list[TargetResult], list[str]]:
    host = runtime.host
    conn = runtime.connection

    def ours_run() -> None:
        if not conn.run("true").ok:
            raise RuntimeError("`true` failed")

    def ours_echo() -> None:
        if runtime.echo("x") != "x":
            raise RuntimeError("echo returned something else")

    def openssh() -> None:
        _finish(_client(mux, host, "true"))

    cases: dict[str, Callable[[], object]] = {
        RUN: ours_run,
        ECHO: ours_echo,
        OPENSSH: openssh,
        PARAMIKO: functools.partial(paramiko_run, bare, "true"),
        PARAMIKO_NODELAY: functools.partial(paramiko_run, nodelay, "true"),
    }
    timings = timeit_interleaved(cases, repeat, warmup=2)
    reference, peer, fast_peer = timings[OPENSSH], timings[PARAMIKO], timings[PARAMIKO_NODELAY]
    rows = [
        [
            name,
            fmt_ms(t.median),
            fmt_ms(t.min),
            fmt_ms(t.p90),
            t.failures,
            fmt_ratio(t.median / reference.median),
            fmt_ratio(t.median / peer.median),
            fmt_ratio(t.median / fast_peer.median),
        ]
        for name, t in timings.items()
    ]
    targets = [
        TargetResult("round trip connection.run", timings[RUN], reference, ROUND_TRIP_TARGET),
        TargetResult("round trip rt.echo", timings[ECHO], reference, ROUND_TRIP_TARGET),
    ]
    return rows, targets, error_lines(timings)


def bench_broadcast(
    runtimes: list[Runtime], mux: OpenSSHMux, counts: list[int], repeat: int
) -> tuple[list[list[str]], list[TargetResult], list[str]]:
    rows, targets, errors = [], [], []
    for n in counts:
        chosen = runtimes[:n]
        hosts = [rt.host for rt in chosen]
        group = RuntimeGroup(runtimes=chosen)  # shares the warm connections; closed by the caller
        expected = {h: h for h in hosts}
        # correctness once, untimed: every host answered with its own name, both ways
        for name, got in (
            ("ours", ours_broadcast(group, "hostname")),
            ("OpenSSH", openssh_broadcast(mux, hosts, "hostname")),
        ):
            answers = {h: out.strip() for h, out in got.items()}
            if answers != expected:
                raise RuntimeError(f"{name} broadcast to {n} hosts answered {answers}")
        timings = timeit_interleaved(
            {
                "ours": functools.partial(ours_broadcast, group, "hostname"),
                "openssh": functools.partial(openssh_broadcast, mux, hosts, "hostname"),
            },
            repeat,
        )
        group.clear_tasks()
        errors += error_lines(
            {f"ours, {n} hosts": timings["ours"], f"OpenSSH, {n} hosts": timings["openssh"]}
        )
        result = TargetResult(
            f"broadcast to {n} host{'s' if n > 1 else ''}",
            timings["ours"],
            timings["openssh"],
            BROADCAST_TARGET,
        )
        targets.append(result)
        rows.append(
            [
                str(n),
                fmt_ms(result.ours.median),
                fmt_ms(result.ours.p90),
                fmt_ms(result.openssh.median),
                fmt_ms(result.openssh.p90),
                result.ours.failures,
                result.openssh.failures,
                fmt_ratio(result.ratio),
            ]
        )
    return rows, targets, errors


def _openssh_version() -> str:
    res = subprocess.run(["ssh", "-V"], capture_output=True, text=True)
    return (res.stderr or res.stdout).strip().split(",")[0]


def main(argv: Sequence[str] | None = None) -> list[TargetResult]:
    args = parse_args(argv)
    rt_repeat = args.repeat or ROUND_TRIP_REPEAT
    bc_repeat = args.repeat or BROADCAST_REPEAT
    counts = broadcast_counts(args.hosts)
    print(
        f"host layer benchmark: {args.hosts} test host(s), {os.cpu_count()} CPU(s), "
        f"Python {platform.python_version()}, paramiko {paramiko.__version__}, "
        f"{_openssh_version()}"
    )
    print(
        f"samples: {rt_repeat} per round-trip case, {bc_repeat} per broadcast case "
        "(ours and the peers interleaved, after warm-up; failures: failed/runs)"
    )
    previous_main_dir = Environment.get_main_directory()
    targets: list[TargetResult] = []
    with tempfile.TemporaryDirectory(prefix="lct-bench-") as logs, TestHosts(args.hosts) as th:
        Environment.set_main_directory(logs)  # task execution logs go to a throw-away folder
        names = [h.name for h in th.hosts]
        if len(names) < args.hosts:
            raise RuntimeError(f"asked for {args.hosts} test hosts, got {len(names)}")
        group = RuntimeGroup(hosts=names, ssh_config_path=str(th.ssh_config_path))
        clients: list[paramiko.SSHClient] = []
        try:
            with OpenSSHMux(th, names) as mux:
                ours_broadcast(group, "true")  # opens and warms every connection
                group.clear_tasks()
                for fast in (False, True):  # one by one: each is closed below
                    clients.append(open_paramiko(th, names[0], nodelay=fast))
                rows, found, errors = bench_round_trip(
                    group.runtimes[0], mux, clients[0], clients[1], rt_repeat
                )
                targets += found
                print_table(
                    ROUND_TRIP_TITLE + f", {rt_repeat} samples",
                    [
                        "case",
                        "median ms",
                        "min ms",
                        "p90 ms",
                        "failures",
                        "vs OpenSSH",
                        "vs paramiko",
                        "vs nodelay",
                    ],
                    rows,
                )
                for line in errors:
                    print(line)
                rows, found, errors = bench_broadcast(group.runtimes, mux, counts, bc_repeat)
                targets += found
                print_table(
                    BROADCAST_TITLE + f", {bc_repeat} samples",
                    [
                        "hosts",
                        "ours median",
                        "ours p90",
                        "OpenSSH median",
                        "OpenSSH p90",
                        "ours failures",
                        "OpenSSH failures",
                        "ratio",
                    ],
                    rows,
                )
                for line in errors:
                    print(line)
        finally:
            for client in clients:
                client.close()
            group.cleanup()
            Environment.set_main_directory(previous_main_dir)
        leftover_check(th)
    print_table(
        SUMMARY_TITLE,
        ["target", "ours ms", "OpenSSH ms", "ratio", "limit", "failures", "result"],
        [
            [
                t.name,
                fmt_ms(t.ours.median),
                fmt_ms(t.openssh.median),
                fmt_ratio(t.ratio),
                f"<= {t.limit:.1f}x",
                failures(
                    t.failed, t.ours.runs + t.openssh.runs, t.ours.not_run + t.openssh.not_run
                ),
                t.status,
            ]
            for t in targets
        ],
    )
    passed = sum(t.passed for t in targets)
    failed = sum(t.status == "FAIL" for t in targets)
    print(
        f"{passed}/{len(targets)} targets met, {failed} FAIL (failed repetitions); "
        "test hosts torn down, no leftovers"
    )
    return targets


if __name__ == "__main__":
    sys.exit(exit_code(main()))
