"""Cluster layer: DaskCluster against a plain-script floor and Dask's SSHCluster, on SSH test hosts.

1. Start time, from "start" until the scheduler has registered one worker per host
   (``threads_per_worker=1``, nanny on), on 3 and on 8 hosts:
   a. ours, ``network_mode="direct"`` (RuntimeGroup created inside the timed region, so opening
      the SSH connections counts);
   b. ours, ``network_mode="tunnelled"`` with the hosts SSH-only;
   c. the floor: the same scheduler and worker command lines (``scheduler_argv``/``worker_argv``,
      TLS as ours by default, its files made by ``ClusterTLS`` in the floor's folder) started by a
      plain script: the scheduler as a local subprocess, one worker per host by one
      ``ssh host 'setsid nohup ... &'`` each, all at once, then a ``distributed.Client`` waits for
      the workers; "floor (tcp)" is the same without TLS (Dask's default, and SSHCluster's),
      shown for reference: what TLS itself adds to a start;
   d. ``distributed.deploy.ssh.SSHCluster`` (asyncssh): scheduler on the first test host, one
      worker on each host;
   e. ours, ``network_mode="auto"`` in an open network (every path probed, direct chosen) and
      with the hosts SSH-only (tunnelled chosen): the preflight probe's cost is the "plan"
      column of the breakdown. Each of the two keeps its own memory of the mode auto chose
      (``network.last_mode``, which places the scheduler started before the probe): a site's
      network does not change between starts, and the warm-up round teaches it.
   Ours always includes the end-to-end readiness check ("verify" column). Targets: ours <= 1.05x
   the floor and <= 0.9x SSHCluster (medians, same host count).
2. ``cleanup()`` of ours (both modes) until it returns; nothing may be left on the hosts right
   after. Target: <= 0.3 s.
3. Throughput of one port forward, 200 MiB pushed in 1 MiB chunks to a counting sink on host1:
   ``Runtime.expose_port_from_runtime`` on paramiko and on the runtime's OpenSSH master (as a
   tunnelled cluster's forwards go) against ``ssh -N -L``. Target: ours (the master) >= 0.8x
   OpenSSH; paramiko's is shown beside it.

Samples of every case are taken in turn (a b c d a b c d ...) after one warm-up round. All test
hosts share this machine's cores, so compare numbers only within one host count.
Run: ``python -m benchmarks.cluster_layer [--hosts 3,8] [--repeat N] [--size-mb 200]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import distributed
import paramiko
import psutil

from benchmarks.common import (
    Timing,
    drop_sshcluster_files,
    exit_code,
    failures,
    fmt_ratio,
    leftover_check,
    print_table,
    quiet_sshcluster,
    start_sshcluster,
    verdict,
)
from lazycluster_tasks import (
    DaskCluster,
    DaskOptions,
    Environment,
    Runtime,
    RuntimeGroup,
    network,
)
from lazycluster_tasks.dask_argv import CLIENT_TIMEOUT_ENV, scheduler_argv, server_env, worker_argv
from lazycluster_tasks.routing import TunnelledRouting
from lazycluster_tasks.security import ClusterTLS
from lazycluster_tasks.testing.hosts import TestHost, TestHosts

START_TARGET = 1.05  # ours / floor
SSHCLUSTER_TARGET = 0.9  # ours / SSHCluster
CLEANUP_TARGET_S = 0.3
TUNNEL_TARGET = 0.8  # ours (on the OpenSSH master) / OpenSSH throughput
DEFAULT_HOSTS = (3, 8)
DEFAULT_REPEAT = 3
DEFAULT_SIZE_MB = 200
CHUNK = 2**20
START_TIMEOUT = 120.0
#: How long processes of a stopped floor or SSHCluster may take to leave the hosts by themselves.
SETTLE_TIMEOUT = 20.0
#: Failed runs after which a case is not tried again at that host count (a failure of
#: SSHCluster costs its 30 s connect timeout).
MAX_FAILURES = 2
#: Ports of the floor's workers (worker, nanny) inside each host's own network namespace.
FLOOR_WORKER_PORTS = (62001, 62002)

OURS_DIRECT = "ours direct"
OURS_TUNNELLED = "ours tunnelled"
OURS_AUTO_OPEN = "ours auto (open)"
OURS_AUTO_SSH = "ours auto (SSH-only)"
FLOOR = "floor"
FLOOR_TCP = "floor (tcp)"
SSHCLUSTER = "SSHCluster"
SPEC_DIRECT = "LazySSHCluster direct"
SPEC_TUNNELLED = "LazySSHCluster tunnelled"
CASES = (
    OURS_DIRECT,
    OURS_TUNNELLED,
    OURS_AUTO_OPEN,
    OURS_AUTO_SSH,
    SPEC_DIRECT,
    SPEC_TUNNELLED,
    FLOOR,
    FLOOR_TCP,
    SSHCLUSTER,
)
#: the Dask-native class: case -> (mode, hosts SSH-only)
SPEC_MODES = {SPEC_DIRECT: ("direct", False), SPEC_TUNNELLED: ("tunnelled", True)}
#: case -> (mode asked for, hosts SSH-only, mode the cluster must end up in)
OURS_MODES = {
    OURS_DIRECT: ("direct", False, "direct"),
    OURS_TUNNELLED: ("tunnelled", True, "tunnelled"),
    OURS_AUTO_OPEN: ("auto", False, "direct"),
    OURS_AUTO_SSH: ("auto", True, "tunnelled"),
}
#: every case of ours that is timed from start to cleanup
TIMED_CASES = (*OURS_MODES, *SPEC_MODES)

START_TITLE = "1. start until every worker is registered (seconds)"
BREAKDOWN_TITLE = "1'. where the start time goes (medians, seconds)"
CLEANUP_TITLE = "2. cleanup() until it returns (milliseconds)"
CLEANUP_BREAKDOWN_TITLE = "2'. where the cleanup time goes (medians, milliseconds)"
TUNNEL_TITLE = "3. tunnel throughput to host1"
SUMMARY_TITLE = "summary"
SSHCLUSTER_SKIPPED = "SSHCluster: skipped (asyncssh not installed)"

#: Phases of ``DaskCluster.start``: (name, owner, attribute). "network" is the module, "engine"
#: the cluster's Engine, "routing" the tunnelled routing class.
START_PHASES = (
    ("connect", "network", "_peer_address"),
    ("probe", "network", "probe_host"),
    ("plan", "engine", "ensure_plan"),
    ("scheduler", "engine", "_launch_scheduler"),
    ("sched wait", "engine", "_await_scheduler"),
    ("sched routes", "routing", "route_scheduler"),
    ("specs", "engine", "_worker_specs"),
    ("working dirs", "Runtime", "_make_working_dir"),
    ("launch", "engine", "_launch_workers"),
    ("worker routes", "routing", "route_workers"),
    ("register", "engine", "_wait_for_workers"),
    ("verify", "engine", "verify_paths"),
)
CLEANUP_PHASES = (
    ("close scheduler", "clients", "close_scheduler"),
    ("stop processes", "engine", "_stop"),
    ("group cleanup", "group", "cleanup"),
    ("controller", "controller", "cleanup"),
)
#: Cleanup phases that run beside the others (not taken from "other").
CLEANUP_BESIDE = ("close scheduler",)
#: Where lazycluster keeps its cache (the auto cases' memory of the mode among it).
CACHE_ENV = "LAZYCLUSTER_CACHE_DIR"
#: The floor's own phases (recorded by the floor script, not by wrapping).
FLOOR_LAUNCH, FLOOR_REGISTER = "launch", "register"

#: A counting sink: prints its port, then per connection reads to EOF and answers the byte count.
SINK_CODE = """
import socket
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(16)
print(server.getsockname()[1], flush=True)
buffer = bytearray(1 << 20)
while True:
    conn, _ = server.accept()
    with conn:
        total = 0
        while True:
            n = conn.recv_into(buffer)
            if not n:
                break
            total += n
        conn.sendall(b"%d\\n" % total)
"""


# -- results --------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    """Samples of one case at one host count (seconds), or why it could not run."""

    starts: list[float] = field(default_factory=list)
    cleanups: list[float] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)  # what was left right after cleanup
    phases: list[dict[str, float]] = field(default_factory=list)
    cleanup_phases: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one per failed run
    skipped: str | None = None

    @property
    def given_up(self) -> bool:
        return len(self.errors) >= MAX_FAILURES

    @property
    def start(self) -> Timing | None:
        return Timing(tuple(s * 1000 for s in self.starts)) if self.starts else None

    @property
    def cleanup(self) -> Timing | None:
        return Timing(tuple(s * 1000 for s in self.cleanups)) if self.cleanups else None


@dataclass(frozen=True)
class TargetResult:
    """One target: ``value`` compared with ``limit`` (``higher_is_better`` flips the test)."""

    name: str
    ours: str
    reference: str
    value: float | None  # None: not measurable (a case failed or was skipped)
    limit: float
    unit: str = "x"
    higher_is_better: bool = False
    note: str = ""
    failed: int = 0  # failed runs of the cases compared: any makes the target FAIL

    @property
    def passed(self) -> bool:
        return self.status == "PASS"

    @property
    def status(self) -> str:
        if self.value is None and not self.failed:
            return "n/a"
        met = self.value is not None and (
            self.value >= self.limit if self.higher_is_better else self.value <= self.limit
        )
        return verdict(met, self.failed)

    def shown(self, value: float | None) -> str:
        if value is None:
            return "-"
        return fmt_ratio(value) if self.unit == "x" else f"{value:.2f} {self.unit}"


# -- tracing phases -------------------------------------------------------------------------------


class PhaseTrace:
    """Wall-clock spans of wrapped calls, by phase name (thread-safe enough: list.append)."""

    def __init__(self) -> None:
        self.spans: dict[str, list[tuple[float, float]]] = {}

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        spans = self.spans.setdefault(phase, [])

        @functools.wraps(fn)
        def traced(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spans.append((start, time.perf_counter()))

        return traced

    def busy(self, phase: str) -> float | None:
        """Seconds covered by the phase's spans (overlaps counted once); None if never called."""
        spans = sorted(self.spans.get(phase, []))
        if not spans:
            return None
        total, (cur_start, cur_end) = 0.0, spans[0]
        for start, end in spans[1:]:
            if start > cur_end:
                total += cur_end - cur_start
                cur_start, cur_end = start, end
            else:
                cur_end = max(cur_end, end)
        return total + cur_end - cur_start

    def summary(self, names: Sequence[str]) -> dict[str, float]:
        return {n: b for n in names if (b := self.busy(n)) is not None}


@contextlib.contextmanager
def traced(
    trace: PhaseTrace, phases: Sequence[tuple[str, str, str]], owners: Mapping[str, object]
) -> Iterator[None]:
    """Wrap ``owner.attribute`` of each phase for the block; attributes missing in the library
    (it changes under us) are skipped, and everything is put back afterwards."""
    saved: list[tuple[object, str, Any, bool]] = []
    try:
        for phase, owner_key, attr in phases:
            owner = owners.get(owner_key)
            fn = getattr(owner, attr, None) if owner is not None else None
            if owner is None or not callable(fn):
                continue
            own = attr in vars(owner)
            saved.append((owner, attr, fn, own))
            setattr(owner, attr, trace.wrap(phase, fn))
        yield
    finally:
        for owner, attr, fn, own in reversed(saved):
            if own:
                setattr(owner, attr, fn)
            else:
                with contextlib.suppress(AttributeError):
                    delattr(owner, attr)


# -- helpers --------------------------------------------------------------------------------------


def _local_processes(marker: str) -> list[str]:
    """Processes on this machine (any namespace) whose command line mentions ``marker``."""
    found = []
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if p.info["pid"] != me and marker in cmdline:
            found.append(f"{p.info['pid']} {cmdline[:120]}")
    return found


def _wait_gone(th: TestHosts, marker: str | None, timeout: float) -> tuple[float, bool]:
    """Wait until nothing is left on the hosts (and no local process mentions ``marker``).
    Returns (seconds waited, whether everything left by itself)."""
    start = time.perf_counter()
    deadline = time.monotonic() + timeout
    while th.leftover_processes() or (marker and _local_processes(marker)):
        if time.monotonic() > deadline:
            return time.perf_counter() - start, False
        time.sleep(0.05)
    return time.perf_counter() - start, True


def _kill_local(marker: str) -> None:
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] != os.getpid() and marker in " ".join(p.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                p.kill()


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _wait_accepting(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited ({proc.returncode})") from None
            if time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def _options() -> DaskOptions:
    """The options of every cluster here: one single-threaded worker (with nanny) per host."""
    return DaskOptions(workers_per_host=1, threads_per_worker=1)


def _error_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# -- the four ways to start a cluster ------------------------------------------------------------


@dataclass
class RunOutcome:
    start: float
    cleanup: float | None = None
    leftovers: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    cleanup_phases: dict[str, float] = field(default_factory=dict)


def _leftovers(th: TestHosts, cluster_id: str) -> list[str]:
    """What a cluster left on the hosts and here; the local ones are killed (the hosts'
    leftovers by the caller)."""
    left = [f"{h}: {p}" for h, procs in th.leftovers().items() for p in procs]
    marker = f"lazycluster-{cluster_id}"
    left += [f"here: {p}" for p in _local_processes(marker)]
    if left:
        _kill_local(marker)
    return left


def run_ours(th: TestHosts, hosts: list[str], case: str, workdir: str) -> RunOutcome:
    """Time DaskCluster.start (connections included) and cleanup; check what is left."""
    mode, ssh_only, expected = OURS_MODES[case]
    if ssh_only:
        th.ssh_only(True)
    cache = os.environ.get(CACHE_ENV)
    if mode == "auto":  # the case's own memory of the mode (see e. above)
        os.environ[CACHE_ENV] = os.path.join(workdir, "cache-" + "-".join(case.split()))
    try:
        trace, stop_trace = PhaseTrace(), PhaseTrace()
        modules = {"network": network, "Runtime": Runtime, "routing": TunnelledRouting}
        with traced(trace, START_PHASES, modules):
            t0 = time.perf_counter()
            group = RuntimeGroup(hosts=hosts, ssh_config_path=str(th.ssh_config_path))
            cluster = DaskCluster(
                group, network_mode=mode, workers_per_host=1, threads_per_worker=1
            )
            with traced(trace, START_PHASES, {"engine": cluster.engine}):
                cluster.start()  # cleans up itself when it fails
            started = time.perf_counter() - t0
        phases = trace.summary([name for name, _, _ in START_PHASES])
        phases["total"] = started
        try:
            if cluster.network_mode != expected:
                raise RuntimeError(f"expected {expected}, the cluster runs {cluster.network_mode}")
            if len(cluster.workers) != len(hosts):
                raise RuntimeError(f"{len(cluster.workers)} workers, expected {len(hosts)}")
        finally:
            engine = cluster.engine
            owners = {
                "engine": engine,
                "clients": engine.clients,
                "group": group,
                "controller": engine.controller,
            }
            with traced(stop_trace, CLEANUP_PHASES, owners):
                t1 = time.perf_counter()
                cluster.cleanup()
                cleaned = time.perf_counter() - t1
        left = _leftovers(th, cluster.cluster_id)
        stop_phases = stop_trace.summary([name for name, _, _ in CLEANUP_PHASES])
        stop_phases["total"] = cleaned
        return RunOutcome(started, cleaned, left, phases, stop_phases)
    finally:
        if ssh_only:
            th.ssh_only(False)
        if cache is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = cache


def run_spec(th: TestHosts, hosts: list[str], case: str) -> RunOutcome:
    """Time LazySSHCluster from construction until every worker is ready (it returns then,
    readiness check included), and its close(); check what is left."""
    from distributed import Client

    from lazycluster_tasks.ssh_cluster import LazySSHCluster

    mode, ssh_only = SPEC_MODES[case]
    if ssh_only:
        th.ssh_only(True)
    try:
        t0 = time.perf_counter()
        cluster = LazySSHCluster(
            hosts,
            ssh_config_path=str(th.ssh_config_path),
            network_mode=mode,
            threads_per_worker=1,
        )
        started = time.perf_counter() - t0
        try:
            with Client(cluster, set_as_default=False) as client:
                count = len(client.scheduler_info(n_workers=-1)["workers"])
            if count != len(hosts):
                raise RuntimeError(f"{count} workers registered, expected {len(hosts)}")
        finally:
            t1 = time.perf_counter()
            cluster.close()
            closed = time.perf_counter() - t1
        left = _leftovers(th, cluster.engine.cluster_id)
        return RunOutcome(started, closed, left, {}, {"total": closed})
    finally:
        if ssh_only:
            th.ssh_only(False)


def _ssh(th: TestHosts, host: str, command: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["ssh", "-F", str(th.ssh_config_path), host, command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _finish_all(procs: dict[str, subprocess.Popen[bytes]], what: str) -> None:
    failed = {}
    for host, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            failed[host] = f"exit {proc.returncode}: {err.decode(errors='replace').strip()}"
    if failed:
        raise RuntimeError(f"{what} failed: {failed}")


def run_floor(th: TestHosts, hosts: list[TestHost], workdir: str, tls: bool = True) -> RunOutcome:
    """The same processes started by a plain script (with ``tls``, ours by default: the same
    command lines); stopped (untimed) and checked afterwards."""
    from distributed import Client

    options = _options()
    folder = tempfile.mkdtemp(prefix="floor-", dir=workdir)
    python = sys.executable
    port = _free_port(th.controller_address)
    # the certificates are made before the clock starts, as ours are made with the cluster
    certs = ClusterTLS.generate() if tls else None
    if certs is not None:
        for role in ("master", "worker"):
            for name, text in certs.files(role).items():
                path = Path(folder, name)
                path.parent.mkdir(mode=0o700, exist_ok=True)
                path.write_text(text)
                path.chmod(0o600)
    paths = {r: certs.paths(folder, r) for r in ("master", "worker")} if certs else {}
    address = f"{'tls' if certs else 'tcp'}://{th.controller_address}:{port}"
    pid_files = {h.name: f"{folder}/{h.name}/worker.pid" for h in hosts}
    scheduler: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.perf_counter()
        with open(f"{folder}/scheduler.log", "wb") as log:
            scheduler = subprocess.Popen(
                scheduler_argv(
                    python, th.controller_address, port, folder, options, paths.get("master")
                ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # the same environment as ours (temp files in its folder)
                env={
                    **os.environ,
                    **server_env(folder, {CLIENT_TIMEOUT_ENV: str(options.idle_timeout)}),
                },
                start_new_session=True,
            )
        launches = {}
        for i, h in enumerate(hosts):
            host_folder = f"{folder}/{h.name}"
            argv = worker_argv(
                python,
                address,
                f"{h.name}-{i}",
                host_folder,
                options,
                address=h.address,
                port=FLOOR_WORKER_PORTS[0],
                nanny_port=FLOOR_WORKER_PORTS[1],
                loopback=False,
                tls=paths.get("worker"),
            )
            q = shlex.quote
            command = (
                f"mkdir -p {q(host_folder)}; "
                f"setsid nohup {shlex.join(argv)} >{q(host_folder + '/worker.log')} 2>&1 "
                f"</dev/null & echo $! >{q(pid_files[h.name])}"
            )
            launches[h.name] = _ssh(th, h.name, command)
        _finish_all(launches, "starting workers by ssh")
        launched = time.perf_counter() - t0
        security = certs.security() if certs is not None else None
        client = Client(address, timeout=30, set_as_default=False, security=security)
        try:
            client.wait_for_workers(len(hosts), timeout=START_TIMEOUT)
            started = time.perf_counter() - t0
        finally:
            client.close()
        outcome = RunOutcome(
            started, phases={FLOOR_LAUNCH: launched, FLOOR_REGISTER: started - launched}
        )
    finally:
        stopped = _stop_floor(th, hosts, pid_files, scheduler, folder)
    outcome.cleanup = stopped
    return outcome


def _stop_floor(
    th: TestHosts,
    hosts: list[TestHost],
    pid_files: dict[str, str],
    scheduler: subprocess.Popen[bytes] | None,
    folder: str,
) -> float | None:
    """TERM the workers (by ssh) and the scheduler; KILL what is left after SETTLE_TIMEOUT.
    Returns the seconds from TERM until nothing was left (None when KILL was needed)."""

    def signal_workers(sig: str) -> None:
        procs = {
            h.name: _ssh(
                th,
                h.name,
                f"[ -r {shlex.quote(pid_files[h.name])} ] && "
                f"kill -{sig} -- -$(cat {shlex.quote(pid_files[h.name])}) 2>/dev/null; true",
            )
            for h in hosts
        }
        _finish_all(procs, f"kill -{sig} of the workers")

    start = time.perf_counter()
    signal_workers("TERM")
    if scheduler is not None and scheduler.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(scheduler.pid, signal.SIGTERM)
    _, gone = _wait_gone(th, folder, SETTLE_TIMEOUT)
    stopped = time.perf_counter() - start
    if not gone:
        signal_workers("KILL")
        _kill_local(folder)
    if scheduler is not None:
        try:
            scheduler.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(scheduler.pid, signal.SIGKILL)
            scheduler.wait()
    if not gone:
        leftover_check(th)
    return stopped if gone else None


def sshcluster_unavailable() -> str | None:
    """Why SSHCluster cannot be benchmarked here (None: it can)."""
    if importlib.util.find_spec("asyncssh") is None:
        return SSHCLUSTER_SKIPPED
    return None


def run_sshcluster(th: TestHosts, hosts: list[TestHost]) -> RunOutcome:
    """SSHCluster with the scheduler on the first host and one worker on each host."""
    from distributed import Client

    with quiet_sshcluster():
        try:
            t0 = time.perf_counter()
            cluster = start_sshcluster(th, [h.address for h in hosts])
            try:
                client = Client(cluster, set_as_default=False)
                try:
                    client.wait_for_workers(len(hosts), timeout=START_TIMEOUT)
                    started = time.perf_counter() - t0
                finally:
                    client.close()
            finally:
                t1 = time.perf_counter()
                cluster.close()
                closed = time.perf_counter() - t1
            outcome = RunOutcome(started, closed)
        finally:
            # SSHCluster.close returns before its remote processes are gone; they leave by
            # themselves within seconds (no scheduler left). Wait for it, so the next run has the
            # cores to itself; the files they leave are removed.
            lingered, gone = _wait_gone(th, None, SETTLE_TIMEOUT)
            if not gone:
                th.kill_leftovers()
            drop_sshcluster_files(th)
    if gone:
        outcome.phases["gone"] = lingered
    return outcome


def sshcluster_layout(first: str) -> str:
    return (
        f"SSHCluster layout: hosts = [{first}] + [{first} .. hostN] (N+1 entries): scheduler on "
        f"{first}, one worker (nanny, 1 thread) on each of the N hosts, {first} included. "
        "Ours and the floor: scheduler on this machine, one worker (nanny, 1 thread) per host. "
        "SSHCluster gets scheduler_options host=<address of the first host>: without it the "
        "scheduler binds 127.0.0.1 (the test hosts have no default route, so dask's get_ip falls "
        "back to loopback) and SSHCluster fails with 'Timed out trying to connect to "
        "tcp://127.0.0.1:<port>'."
    )


# -- section 1 and 2: start and cleanup ------------------------------------------------------------


def bench_start(
    th: TestHosts,
    n: int,
    repeat: int,
    warmup: int,
    workdir: str,
    cases: Sequence[str] = CASES,
) -> dict[str, CaseResult]:
    hosts = th.hosts[:n]
    names = [h.name for h in hosts]
    results = {case: CaseResult() for case in CASES}
    for case in CASES:
        if case not in cases:
            results[case].skipped = "not selected (--cases)"
    unavailable = sshcluster_unavailable()
    if unavailable:
        results[SSHCLUSTER].skipped = unavailable

    runners: dict[str, Callable[[], RunOutcome]] = {
        **{case: functools.partial(run_ours, th, names, case, workdir) for case in OURS_MODES},
        **{case: functools.partial(run_spec, th, names, case) for case in SPEC_MODES},
        FLOOR: lambda: run_floor(th, hosts, workdir),
        FLOOR_TCP: lambda: run_floor(th, hosts, workdir, tls=False),
        SSHCLUSTER: lambda: run_sshcluster(th, hosts),
    }
    for round_no in range(-warmup, repeat):
        label = "warm-up" if round_no < 0 else f"round {round_no + 1}/{repeat}"
        shown = []
        for case, runner in runners.items():
            result = results[case]
            if result.given_up or result.skipped:
                continue
            try:
                outcome = runner()
            except Exception as exc:
                result.errors.append(f"{label}: {_error_text(exc)}")
                shown.append(f"{case} FAILED")
                th.kill_leftovers()
                continue
            shown.append(f"{case} {outcome.start:.2f} s")
            if outcome.leftovers:  # checked on every run, warm-up included
                result.leftovers += outcome.leftovers
                th.kill_leftovers()
            if round_no < 0:
                continue
            result.starts.append(outcome.start)
            result.phases.append(outcome.phases)
            if outcome.cleanup is not None:
                result.cleanups.append(outcome.cleanup)
                result.cleanup_phases.append(outcome.cleanup_phases)
        print(f"  {n} hosts, {label}: {', '.join(shown)}", flush=True)
    return results


def _ratio(a: Timing | None, b: Timing | None) -> float | None:
    return a.median / b.median if a is not None and b is not None else None


def _secs(t: Timing | None, attr: str = "median") -> str:
    return "-" if t is None else f"{getattr(t, attr) / 1000:.2f}"


def _runs(r: CaseResult) -> str:
    """Failed runs of all runs (the timed ones, and a warm-up that failed)."""
    runs = failures(len(r.errors), len(r.starts) + len(r.errors))
    return runs + (", gave up" if r.given_up else "")


def start_rows(all_results: dict[int, dict[str, CaseResult]]) -> list[list[str]]:
    rows = []
    for n, results in all_results.items():
        floor, sshc = results[FLOOR].start, results[SSHCLUSTER].start
        for case in CASES:
            r = results[case]
            t = r.start
            if r.skipped or t is None:
                status = "skipped" if r.skipped else "FAILED"
                rows.append([str(n), case, status, "-", "-", "-", _runs(r)])
                continue
            vs_floor, vs_sshc = _ratio(t, floor), _ratio(t, sshc)
            rows.append(
                [
                    str(n),
                    case,
                    _secs(t),
                    _secs(t, "min"),
                    "-" if vs_floor is None else fmt_ratio(vs_floor),
                    "-" if vs_sshc is None else fmt_ratio(vs_sshc),
                    _runs(r),
                ]
            )
    return rows


#: Columns of the start breakdown; the top-level phases run one after another.
BREAKDOWN_COLUMNS = (
    "connect",
    "probe",
    "plan",
    "scheduler",
    "specs",
    "wdirs",
    "launch",
    "routes",
    "register",
    "verify",
    "other",
    "total",
)
#: One after another in start(); "worker routes" is left out: the routes are made while the
#: workers register (in a thread beside the wait), so counting both made "other" negative.
TOP_LEVEL = ("plan", "scheduler", "sched wait", "specs", "launch", "register", "verify")


def _derived(sample: dict[str, float]) -> dict[str, float]:
    """One run's phases as breakdown columns (routes out of scheduler, the rest as other)."""
    cols = dict(sample)
    if "scheduler" in cols:  # its start and the wait until it listens (it boots meanwhile)
        cols["scheduler"] += cols.get("sched wait", 0.0) - cols.get("sched routes", 0.0)
    if "working dirs" in cols:
        cols["wdirs"] = cols["working dirs"]
    if "sched routes" in cols or "worker routes" in cols:
        cols["routes"] = cols.get("sched routes", 0.0) + cols.get("worker routes", 0.0)
    if "total" in cols:
        cols["other"] = cols["total"] - sum(sample.get(p, 0.0) for p in TOP_LEVEL)
    return cols


def breakdown_rows(all_results: dict[int, dict[str, CaseResult]]) -> list[list[str]]:
    """Phase medians of ours; of the floor, its launch (ssh) and registration wait."""
    rows = []
    for n, results in all_results.items():
        for case in (*OURS_MODES, FLOOR, FLOOR_TCP):
            samples = results[case].phases
            if not samples:
                continue
            if case in (FLOOR, FLOOR_TCP):
                samples = [
                    {"launch": s[FLOOR_LAUNCH], "register": s[FLOOR_REGISTER], "total": start}
                    for s, start in zip(samples, results[case].starts, strict=True)
                ]
            else:
                samples = [_derived(s) for s in samples]
            cells = []
            for column in BREAKDOWN_COLUMNS:
                values = [s[column] for s in samples if column in s]
                cells.append(f"{_median(values):.2f}" if values else "-")
            rows.append([f"{n} hosts, {case}", *cells])
    return rows


def cleanup_rows(all_results: dict[int, dict[str, CaseResult]]) -> list[list[str]]:
    rows = []
    for n, results in all_results.items():
        for case in TIMED_CASES:
            r = results[case]
            t = r.cleanup
            left = f"{len(r.leftovers)} left" if r.leftovers else "none"
            if t is None:
                rows.append([str(n), case, "skipped" if r.skipped else "FAILED", "-", "-", left])
                continue
            rows.append([str(n), case, f"{t.median:.0f}", f"{t.min:.0f}", f"{t.p90:.0f}", left])
    return rows


def cleanup_breakdown_rows(all_results: dict[int, dict[str, CaseResult]]) -> list[list[str]]:
    rows = []
    names = [name for name, _, _ in CLEANUP_PHASES]
    for n, results in all_results.items():
        for case in OURS_MODES:
            samples = results[case].cleanup_phases
            if not samples:
                continue
            cells = []
            for name in names:
                values = [s[name] for s in samples if name in s]
                cells.append(f"{_median(values) * 1000:.0f}" if values else "-")
            total = _median([s["total"] for s in samples])
            serial = [p for p in names if p not in CLEANUP_BESIDE]
            other = _median([s["total"] - sum(s.get(p, 0.0) for p in serial) for s in samples])
            rows.append(
                [f"{n} hosts, {case}", *cells, f"{other * 1000:.0f}", f"{total * 1000:.0f}"]
            )
    return rows


def cleanup_references(all_results: dict[int, dict[str, CaseResult]]) -> list[str]:
    """What stopping takes without us: the floor's TERM until gone, SSHCluster's close()."""
    lines = []
    for n, results in all_results.items():
        parts = []
        floor = results[FLOOR].cleanups
        if floor:
            parts.append(
                f"floor TERM (ssh kill per host + scheduler) until nothing is left: median "
                f"{_median(floor) * 1000:.0f} ms"
            )
        sshc = results[SSHCLUSTER]
        gone = [p["gone"] for p in sshc.phases if "gone" in p]
        if sshc.cleanups and gone:
            parts.append(
                f"SSHCluster close() returns in {_median(sshc.cleanups) * 1000:.0f} ms, its "
                f"processes leave the hosts {_median(gone) * 1000:.0f} ms later (medians)"
            )
        if parts:
            lines.append(f"reference at {n} hosts: {'; '.join(parts)}")
    return lines


def start_targets(all_results: dict[int, dict[str, CaseResult]]) -> list[TargetResult]:
    targets = []
    for n, results in all_results.items():
        floor, sshc = results[FLOOR].start, results[SSHCLUSTER].start
        for case in TIMED_CASES:
            t = results[case].start
            targets.append(
                TargetResult(
                    f"start {case}, {n} hosts vs floor",
                    _secs(t),
                    _secs(floor),
                    _ratio(t, floor),
                    START_TARGET,
                    failed=len(results[case].errors) + len(results[FLOOR].errors),
                )
            )
            note = results[SSHCLUSTER].skipped or ""
            targets.append(
                TargetResult(
                    f"start {case}, {n} hosts vs SSHCluster",
                    _secs(t),
                    _secs(sshc),
                    _ratio(t, sshc),
                    SSHCLUSTER_TARGET,
                    note="skipped" if note else "",
                    failed=len(results[case].errors) + len(results[SSHCLUSTER].errors),
                )
            )
    return targets


def cleanup_targets(all_results: dict[int, dict[str, CaseResult]]) -> list[TargetResult]:
    targets = []
    for n, results in all_results.items():
        for case in TIMED_CASES:
            r = results[case]
            t = r.cleanup
            value = None if t is None else t.median / 1000
            if r.leftovers:  # a cleanup that leaves processes behind misses whatever its speed
                value = float("inf")
            targets.append(
                TargetResult(
                    f"cleanup {case}, {n} hosts (+ nothing left)",
                    "-" if t is None else f"{t.median / 1000:.2f}",
                    "-",
                    value,
                    CLEANUP_TARGET_S,
                    unit="s",
                    failed=len(r.errors),
                )
            )
    return targets


# -- section 3: tunnel throughput -----------------------------------------------------------------


def push(port: int, payload: bytes, chunks: int) -> float:
    """Send ``chunks`` x ``payload``, half-close, check the sink's count; returns seconds."""
    expected = len(payload) * chunks
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        for _ in range(chunks):
            sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while data := sock.recv(64):
            reply += data
    elapsed = time.perf_counter() - start
    if int(reply.strip() or b"-1") != expected:
        raise RuntimeError(f"the sink counted {reply!r} bytes, {expected} were sent")
    return elapsed


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_tunnel(
    th: TestHosts, size_mb: int, repeat: int, warmup: int
) -> tuple[list[list[str]], TargetResult]:
    host = th.hosts[0].name
    payload = os.urandom(CHUNK)  # incompressible, in case either side compresses
    sink = th.run_in(
        host,
        [sys.executable, "-c", SINK_CODE],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    runtime: Runtime | None = None
    mastered: Runtime | None = None
    openssh: subprocess.Popen[bytes] | None = None
    try:
        assert sink.stdout is not None
        sink_port = int(sink.stdout.readline())
        runtime = Runtime(host, ssh_config_path=str(th.ssh_config_path))
        paramiko_port = runtime.expose_port_from_runtime(sink_port)
        mastered = Runtime(host, ssh_config_path=str(th.ssh_config_path))
        if not mastered.use_openssh():
            raise RuntimeError(f"no OpenSSH master to {host}: see the log")
        ours_port = mastered.expose_port_from_runtime(sink_port)
        openssh_port = _free_port("127.0.0.1")
        openssh = subprocess.Popen(
            [
                "ssh",
                "-F",
                str(th.ssh_config_path),
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-L",
                f"127.0.0.1:{openssh_port}:127.0.0.1:{sink_port}",
                host,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_accepting(openssh_port, 15, openssh)
        _wait_accepting(ours_port, 15)
        _wait_accepting(paramiko_port, 15)
        ports = {"ours": ours_port, "paramiko": paramiko_port, "openssh": openssh_port}
        samples: dict[str, list[float]] = {name: [] for name in ports}
        for round_no in range(-warmup, repeat):
            for name, port in ports.items():
                seconds = push(port, payload, size_mb)
                if round_no >= 0:
                    samples[name].append(seconds)
    finally:
        for rt in (runtime, mastered):
            if rt is not None:
                rt.cleanup()
        if openssh is not None:
            _stop(openssh)
        _stop(sink)
    mib_s = {name: [size_mb / s for s in values] for name, values in samples.items()}
    ours, theirs = _median(mib_s["ours"]), _median(mib_s["openssh"])
    plain = _median(mib_s["paramiko"])
    rows = [
        [
            "ours: rt.expose_port_from_runtime (OpenSSH master)",
            f"{ours:.0f}",
            f"{max(mib_s['ours']):.0f}",
            f"{_median(samples['ours']):.2f}",
            fmt_ratio(ours / theirs),
        ],
        [
            "ours on paramiko (no master)",
            f"{plain:.0f}",
            f"{max(mib_s['paramiko']):.0f}",
            f"{_median(samples['paramiko']):.2f}",
            fmt_ratio(plain / theirs),
        ],
        [
            "OpenSSH: ssh -N -L",
            f"{theirs:.0f}",
            f"{max(mib_s['openssh']):.0f}",
            f"{_median(samples['openssh']):.2f}",
            fmt_ratio(1.0),
        ],
    ]
    target = TargetResult(
        f"tunnel throughput {size_mb} MiB",
        f"{ours:.0f} MiB/s",
        f"{theirs:.0f} MiB/s",
        ours / theirs,
        TUNNEL_TARGET,
        higher_is_better=True,
    )
    return rows, target


# -- main -----------------------------------------------------------------------------------------


def _host_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("host counts must be >= 1")
    return counts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cluster_layer", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--hosts",
        type=_host_counts,
        default=list(DEFAULT_HOSTS),
        help="comma-separated host counts (default: %(default)s)",
    )
    parser.add_argument(
        "--repeat", type=int, default=DEFAULT_REPEAT, help="timed samples per case (default: 3)"
    )
    parser.add_argument(
        "--size-mb",
        type=int,
        default=DEFAULT_SIZE_MB,
        help="tunnel payload in MiB, sent in 1 MiB chunks (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed rounds before the samples (default: 1)"
    )
    parser.add_argument(
        "--cases",
        type=lambda text: [c.strip() for c in text.split(",") if c.strip()],
        default=list(CASES),
        help="comma-separated start cases to run (default: all; the floor is always needed)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    unknown = [c for c in args.cases if c not in CASES]
    if unknown or FLOOR not in args.cases:
        parser.error(f"--cases: {unknown or 'the floor is needed'}; known: {', '.join(CASES)}")
    if args.size_mb < 1:
        parser.error("--size-mb must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def _openssh_version() -> str:
    res = subprocess.run(["ssh", "-V"], capture_output=True, text=True)
    return (res.stderr or res.stdout).strip().split(",")[0]


def _load() -> str:
    one, five, _ = os.getloadavg()
    others = [p for p in Path("/run/netns").glob("lct*")] if Path("/run/netns").exists() else []
    return (
        f"load average {one:.2f} (1 min) {five:.2f} (5 min); "
        f"{len(others)} network namespaces of other test-host runs"
    )


def _ssh_clients(th: TestHosts) -> list[str]:
    config = str(th.ssh_config_path)
    return [
        f"{p.info['pid']} {' '.join(p.info['cmdline'])}"
        for p in psutil.process_iter(["pid", "name", "cmdline"])
        if p.info["name"] == "ssh" and config in (p.info["cmdline"] or [])
    ]


def main(argv: Sequence[str] | None = None) -> list[TargetResult]:
    args = parse_args(argv)
    counts: list[int] = args.hosts
    asyncssh_version = "not installed"
    if sshcluster_unavailable() is None:
        import asyncssh

        asyncssh_version = asyncssh.__version__
    print(
        f"cluster layer benchmark: {', '.join(map(str, counts))} test host(s), "
        f"{os.cpu_count()} CPU(s), Python {platform.python_version()}, "
        f"distributed {distributed.__version__}, paramiko {paramiko.__version__}, "
        f"asyncssh {asyncssh_version}, {_openssh_version()}"
    )
    print(
        f"samples: {args.repeat} per case after {args.warmup} warm-up round(s), cases in turn; "
        f"every test host shares these {os.cpu_count()} cores: compare only within a host count"
    )
    print(f"machine: {_load()}")
    unavailable = sshcluster_unavailable()
    if unavailable:
        print(unavailable)

    previous_main_dir = Environment.get_main_directory()
    all_results: dict[int, dict[str, CaseResult]] = {}
    with tempfile.TemporaryDirectory(prefix="lct-bench-") as work, TestHosts(max(counts)) as th:
        Environment.set_main_directory(work)  # task execution logs go to a throw-away folder
        try:
            if len(th.hosts) < max(counts):
                raise RuntimeError(f"asked for {max(counts)} test hosts, got {len(th.hosts)}")
            if not unavailable:
                print(sshcluster_layout(th.hosts[0].name))
            for n in counts:
                all_results[n] = bench_start(th, n, args.repeat, args.warmup, work, args.cases)
            print(f"  tunnel: {args.size_mb} MiB x {args.repeat} per side ...", flush=True)
            tunnel_rows, tunnel_target = bench_tunnel(th, args.size_mb, args.repeat, args.warmup)
        finally:
            Environment.set_main_directory(previous_main_dir)
        leftover_check(th)
        clients = _ssh_clients(th)
        if clients:
            raise RuntimeError(f"ssh processes left: {clients}")

    print_table(
        START_TITLE + f", {args.repeat} samples",
        ["hosts", "case", "median s", "min s", "vs floor", "vs SSHCluster", "failures"],
        start_rows(all_results),
    )
    print(
        "floor = scheduler_argv/worker_argv (TLS, as ours) started by subprocess + one `ssh host "
        "'setsid nohup ... &'` per host at once, then Client.wait_for_workers; floor (tcp): the "
        "same without TLS, as SSHCluster runs; ours tunnelled runs with the hosts SSH-only "
        "(compared with the direct floor and SSHCluster, which cannot run there)"
    )
    for n, results in all_results.items():
        for case, r in results.items():
            for error in r.errors:
                print(f"{case} at {n} hosts failed in {error}")
    print_table(
        BREAKDOWN_TITLE,
        ["case", *BREAKDOWN_COLUMNS],
        breakdown_rows(all_results),
    )
    print(
        "connect/probe: SSH connections / preflight probes, all hosts (both inside plan); "
        "scheduler: start + wait until it listens (without routes); specs: worker command lines; "
        "wdirs: creating the hosts' working dirs (an explicit mode: inside plan, beside the "
        "environment check; auto: inside probe); launch: workers started on every host; "
        "routes: SSH forwards (tunnelled); register: until the scheduler lists every worker; "
        "other: the rest of start(); floor launch: every `ssh host 'setsid ...'` returned"
    )
    print_table(
        CLEANUP_TITLE + f", {args.repeat} samples",
        ["hosts", "case", "median ms", "min ms", "p90 ms", "left right after"],
        cleanup_rows(all_results),
    )
    print_table(
        CLEANUP_BREAKDOWN_TITLE,
        ["case", *(name for name, _, _ in CLEANUP_PHASES), "other", "total"],
        cleanup_breakdown_rows(all_results),
    )
    print(
        "close scheduler: the clients close and the scheduler is asked to close itself, beside "
        "stop processes (each host KILLs its workers first; the scheduler's host waits for the "
        "close); other: the rest of cleanup()"
    )
    for line in cleanup_references(all_results):
        print(line)
    for n, results in all_results.items():
        for case in TIMED_CASES:
            for line in results[case].leftovers[:5]:
                print(f"left after {case} cleanup at {n} hosts: {line}")
    print_table(
        TUNNEL_TITLE + f", {args.size_mb} MiB in 1 MiB chunks, {args.repeat} samples",
        ["case", "median MiB/s", "best MiB/s", "median s", "vs OpenSSH"],
        tunnel_rows,
    )
    targets = [*start_targets(all_results), *cleanup_targets(all_results), tunnel_target]
    print_table(
        SUMMARY_TITLE,
        ["target", "ours", "reference", "value", "limit", "result"],
        [
            [
                t.name,
                t.ours,
                t.reference,
                t.shown(t.value),
                f"{'>=' if t.higher_is_better else '<='} {t.shown(t.limit)}",
                t.status,
            ]
            for t in targets
        ],
    )
    print(f"machine: {_load()}")
    passed = sum(t.passed for t in targets)
    print(f"{passed}/{len(targets)} targets met; test hosts torn down, no leftovers")
    return targets


if __name__ == "__main__":
    sys.exit(exit_code(main()))
