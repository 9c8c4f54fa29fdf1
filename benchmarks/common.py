"""Shared helpers for the benchmarks: timing, OpenSSH multiplexing, tables, leftover checks."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from lazycluster_tasks.testing.hosts import TestHosts

T = TypeVar("T")

#: How long an OpenSSH master may take to accept clients.
MASTER_START_TIMEOUT = 15.0
#: How long closing sessions may take to leave the hosts before leftovers count.
LEFTOVER_GRACE = 3.0


# -- timing --------------------------------------------------------------------------------------

#: Failed repetitions after which a case is not run again (each failure may cost its timeout).
MAX_FAILURES = 3
PASS, MISS, FAIL = "PASS", "MISS", "FAIL"


@dataclass(frozen=True)
class Timing:
    """Wall-clock samples of one operation, in milliseconds, and its failed repetitions.

    ``errors`` has one line per failed repetition (a failed warm-up included): those count as
    runs and failures, never as samples, so the medians are over the successful repetitions
    only and ``failures`` says what they leave out. ``not_run``: repetitions not tried after
    :data:`MAX_FAILURES` failures. Without samples the statistics are NaN (shown as "-").
    """

    samples: tuple[float, ...]
    errors: tuple[str, ...] = ()
    not_run: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def min(self) -> float:
        return min(self.samples, default=math.nan)

    @property
    def p90(self) -> float:
        """Nearest-rank 90th percentile."""
        ordered = sorted(self.samples)
        return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)] if ordered else math.nan

    @property
    def failed(self) -> int:
        return len(self.errors)

    @property
    def runs(self) -> int:
        return len(self.samples) + len(self.errors)

    @property
    def failures(self) -> str:
        return failures(self.failed, self.runs, self.not_run)

    def __str__(self) -> str:
        return (
            f"median {fmt_ms(self.median)} ms, min {fmt_ms(self.min)} ms, "
            f"p90 {fmt_ms(self.p90)} ms, failures {self.failures}"
        )


def failures(failed: int, runs: int, not_run: int = 0) -> str:
    """The failures cell of a case: ``1/5``, or ``3/3, 2 not run`` for a case given up."""
    return f"{failed}/{runs}" + (f", {not_run} not run" if not_run else "")


def verdict(met: bool, failed: int) -> str:
    """FAIL when any repetition failed, whatever the medians of the others say; else PASS/MISS."""
    if failed:
        return FAIL
    return PASS if met else MISS


def exit_code(targets: Iterable[Any]) -> int:
    """1 when a target (anything with a ``status``) failed, else 0: a MISS is a result."""
    return 1 if any(t.status == FAIL for t in targets) else 0


def _error_line(label: str, exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{label}: {type(exc).__name__}: {text[:300]}"


def timeit(fn: Callable[[], object], repeat: int, warmup: int = 1) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeat`` times timed (see below)."""
    return timeit_interleaved({"fn": fn}, repeat, warmup)["fn"]


def timeit_interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeat: int,
    warmup: int = 1,
    check: Callable[[], object] | None = None,
) -> dict[str, Timing]:
    """Time several operations, taking their samples in turn (A B A B …) after ``warmup`` rounds.

    Interleaving spreads drift of the machine (other load, CPU frequency) over every operation
    alike, so their ratio is fairer than with one block of samples after another. A repetition
    that raises is counted as failed (warm-up included) and the others go on; a case is not run
    again after :data:`MAX_FAILURES` failures. ``check`` runs untimed after every repetition,
    failed ones included; when it raises, the repetition failed. Each ``fn`` must bound its own
    time (timeouts).
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, not {repeat}")
    samples: dict[str, list[float]] = {name: [] for name in fns}
    errors: dict[str, list[str]] = {name: [] for name in fns}
    not_run = dict.fromkeys(fns, 0)
    for round_no in range(-warmup, repeat):
        label = "warm-up" if round_no < 0 else f"round {round_no + 1}/{repeat}"
        for name, fn in fns.items():
            if len(errors[name]) >= MAX_FAILURES:
                not_run[name] += 1
                continue
            error = None
            start = time.perf_counter()
            try:
                fn()
            except Exception as exc:
                error = _error_line(label, exc)
            elapsed = (time.perf_counter() - start) * 1000.0
            try:
                if check is not None:
                    check()
            except Exception as exc:
                error = error or _error_line(label, exc)
            if error is not None:
                errors[name].append(error)
            elif round_no >= 0:
                samples[name].append(elapsed)
    return {name: Timing(tuple(samples[name]), tuple(errors[name]), not_run[name]) for name in fns}


def error_lines(timings: Mapping[str, Timing]) -> list[str]:
    """One line per failed repetition, to print under the table that counted it."""
    return [f"{name} failed in {error}" for name, t in timings.items() for error in t.errors]


# -- OpenSSH multiplexing -------------------------------------------------------------------------


class OpenSSHMux:
    """One OpenSSH master connection per host; clients reuse it through a control socket.

    ``with OpenSSHMux(th, ["host1", "host2"]) as mux: subprocess.run(mux.argv("host1", "true"))``.
    On exit every master is asked to stop (``-O exit``), waited for (killed if need be) and the
    socket folder is removed, so no ssh process is left behind.
    """

    def __init__(self, th: TestHosts, hosts: Iterable[str]) -> None:
        self.config = str(th.ssh_config_path)
        self.hosts = list(hosts)
        if not self.hosts:
            raise ValueError("no hosts given")
        self._dir: Path | None = None
        self._masters: dict[str, subprocess.Popen[bytes]] = {}

    def socket(self, host: str) -> str:
        if self._dir is None:
            raise RuntimeError("OpenSSHMux is not started")
        if host not in self.hosts:
            raise ValueError(f"no master for {host!r}")
        return str(self._dir / host)

    def argv(self, host: str, *command: str) -> list[str]:
        """The ssh command line of a client that runs ``command`` through the master."""
        return ["ssh", "-F", self.config, "-S", self.socket(host), host, *command]

    def _control(self, host: str, op: str) -> subprocess.CompletedProcess[bytes]:
        argv = ["ssh", "-F", self.config, "-S", self.socket(host), "-O", op, host]
        return subprocess.run(argv, capture_output=True, timeout=10)

    def start(self) -> OpenSSHMux:
        # short path: a unix socket path must stay under ~100 characters
        self._dir = Path(tempfile.mkdtemp(prefix="lct-mux-"))
        try:
            for host in self.hosts:
                with open(self._dir / f"{host}.log", "wb") as log:  # the Popen keeps a copy
                    self._masters[host] = subprocess.Popen(
                        [
                            "ssh",
                            "-F",
                            self.config,
                            "-M",
                            "-S",
                            self.socket(host),
                            "-o",
                            "ControlPersist=no",
                            "-N",
                            host,
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                    )
            for host in self.hosts:
                self._wait_ready(host)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, host: str) -> None:
        master = self._masters[host]
        deadline = time.monotonic() + MASTER_START_TIMEOUT
        while True:
            if master.poll() is not None:
                assert self._dir is not None
                err = (self._dir / f"{host}.log").read_text(errors="replace").strip()
                raise RuntimeError(f"ssh master for {host} exited ({master.returncode}): {err}")
            if Path(self.socket(host)).exists() and self._control(host, "check").returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"ssh master for {host} not ready after {MASTER_START_TIMEOUT} s"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        for host, master in self._masters.items():
            if master.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                    self._control(host, "exit")
        for master in self._masters.values():
            try:
                master.wait(timeout=5)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait()
        self._masters.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> OpenSSHMux:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- output ---------------------------------------------------------------------------------------


def fmt_ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def fmt_ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print a plain-text table: first column left-aligned, the others right-aligned."""
    text_rows = [[str(cell) for cell in row] for row in rows]
    for row in text_rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells, headers have {len(headers)}")
    widths = [len(h) for h in headers]
    for row in text_rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "-" * len(line(["-" * w for w in widths]))
    print()
    print(title)
    print(rule)
    print(line(list(headers)))
    print(rule)
    for row in text_rows:
        print(line(row))
    print(rule, flush=True)


# -- hygiene --------------------------------------------------------------------------------------


def _left(th: TestHosts, grace: float = LEFTOVER_GRACE) -> dict[str, list[str]]:
    """What is still on the test hosts after ``grace`` s for closing sessions (an SSH session
    ends on its host a moment after its client did), as the tests' ``no_leftovers`` allows."""
    deadline = time.monotonic() + grace
    left = th.leftovers()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = th.leftovers()
    return left


def leftover_check(th: TestHosts, grace: float = LEFTOVER_GRACE) -> None:
    """Raise when processes are left on the test hosts (after ``grace`` s for closing sessions)."""
    left = _left(th, grace)
    if left:
        lines = "\n".join(f"  {host}: {proc}" for host, procs in left.items() for proc in procs)
        raise RuntimeError(f"processes left on test hosts:\n{lines}")


def clean_sample(th: TestHosts, run: Callable[[], T]) -> tuple[T | None, str | None]:
    """One sample on the test hosts: (its result, or None when it raised; what went wrong —
    its exception or the processes it left on the hosts, or None). Leftovers are killed, so
    the next sample starts clean. (What a cleanup leaves right after it returns is measured
    where cleanup is timed: cluster_layer.)"""
    try:
        value = run()
    except Exception as exc:
        th.kill_leftovers()
        return None, f"{type(exc).__name__}: {exc}"
    left = _left(th)
    if left:
        th.kill_leftovers()
        return value, f"left on hosts: {left}"
    return value, None


# -- distributed's SSHCluster, as both benchmarks run it -----------------------------------------


def ssh_user(th: TestHosts, host: str) -> str:
    import os

    import paramiko

    config = paramiko.SSHConfig.from_path(str(th.ssh_config_path))
    return str(config.lookup(host).get("user") or os.environ.get("USER", "root"))


@contextlib.contextmanager
def quiet_sshcluster() -> Iterator[None]:
    """SSHCluster relays every remote log line at INFO; the tables are what we print."""
    import logging

    quiet = logging.getLogger("distributed.deploy.ssh")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        yield
    finally:
        quiet.setLevel(level)


def lazy_cluster(th: TestHosts, n: int, mode: str, **options: Any) -> Any:
    """A LazySSHCluster on the first ``n`` test hosts in ``mode``, one thread per worker, as
    the data-plane and scale benchmarks start theirs (``options``: more of its arguments)."""
    from lazycluster_tasks.ssh_cluster import LazySSHCluster

    hosts = [h.name for h in th.hosts[:n]]
    return LazySSHCluster(
        hosts,
        ssh_config_path=str(th.ssh_config_path),
        network_mode=mode,
        threads_per_worker=1,
        **options,
    )


#: The checkout this package lives in (what SSHCluster's processes import it from).
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_sshcluster(th: TestHosts, addresses: Sequence[str]) -> Any:
    """``SSHCluster`` with the scheduler on the first host, bound to its address (without
    ``host`` it binds 127.0.0.1 and no other host reaches it), and one worker (nanny, 1 thread)
    on each host, the first included. SSHCluster ships no code: its processes get this
    checkout on ``PYTHONPATH`` (the test hosts see this machine's files), or a task graph
    naming ``benchmarks`` cannot be unpickled by its scheduler."""
    import shlex
    import sys

    from distributed.deploy.ssh import SSHCluster

    first = th.hosts[[h.address for h in th.hosts].index(addresses[0])].name
    return SSHCluster(
        [addresses[0], *addresses],
        connect_options={
            "known_hosts": str(th.known_hosts_path),
            "client_keys": [str(th.identity_file)],
            "username": ssh_user(th, first),
        },
        worker_options={"nthreads": 1},
        scheduler_options={"dashboard_address": ":0", "host": addresses[0]},
        remote_python=f"env PYTHONPATH={shlex.quote(CHECKOUT)} {shlex.quote(sys.executable)}",
    )


def drop_sshcluster_files(th: TestHosts) -> list[str]:
    """SSHCluster's processes leave files in the hosts' temp dir when they exit (Dask's
    dask-scratch-space, the __pycache__ of a text preload): remove them and say which, so the
    next case starts clean and the tables stay honest about it."""
    left = th.leftover_files()
    for path in left:
        if Path(path).is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            Path(path).unlink(missing_ok=True)
    return [Path(p).name for p in left]
