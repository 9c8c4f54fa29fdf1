"""Shared helpers for the benchmarks: timing, OpenSSH multiplexing, tables, leftover checks."""

from __future__ import annotations

import contextlib
import math
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from lazycluster_tasks.testing.hosts import TestHosts

#: How long an OpenSSH master may take to accept clients.
MASTER_START_TIMEOUT = 15.0
#: How long closing sessions may take to leave the hosts before leftovers count.
LEFTOVER_GRACE = 3.0


# -- timing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Wall-clock samples of one operation, in milliseconds."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def p90(self) -> float:
        """Nearest-rank 90th percentile."""
        ordered = sorted(self.samples)
        return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]

    def __str__(self) -> str:
        return f"median {self.median:.1f} ms, min {self.min:.1f} ms, p90 {self.p90:.1f} ms"


def _sample(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def timeit(fn: Callable[[], object], repeat: int, warmup: int = 1) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeat`` times timed."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, not {repeat}")
    for _ in range(warmup):
        fn()
    return Timing(tuple(_sample(fn) for _ in range(repeat)))


def timeit_interleaved(
    fns: Mapping[str, Callable[[], object]], repeat: int, warmup: int = 1
) -> dict[str, Timing]:
    """Like :func:`timeit` for several operations, taking their samples in turn (A B A B …).

    Interleaving spreads drift of the machine (other load, CPU frequency) over every operation
    alike, so their ratio is fairer than with one block of samples after another.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, not {repeat}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            samples[name].append(_sample(fn))
    return {name: Timing(tuple(values)) for name, values in samples.items()}


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
    return f"{value:.1f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"


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


def leftover_check(th: TestHosts, grace: float = LEFTOVER_GRACE) -> None:
    """Raise when processes are left on the test hosts (after ``grace`` s for closing sessions)."""
    deadline = time.monotonic() + grace
    left = th.leftovers()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = th.leftovers()
    if left:
        lines = "\n".join(f"  {host}: {proc}" for host, procs in left.items() for proc in procs)
        raise RuntimeError(f"processes left on test hosts:\n{lines}")
