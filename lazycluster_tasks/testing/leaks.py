"""What a test leaves on this machine: threads, listening sockets and file descriptors of this
process (:class:`LocalState`), and entries in the session's temp dir (:func:`wait_tmp_clean`).

Plain classes and functions: the fixtures that use them are in the tests' ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class LocalState:
    """This process's threads, listening ports and open file descriptors at one moment."""

    threads: frozenset[threading.Thread]
    ports: frozenset[int]
    fd_count: int
    fds: dict[str, str]

    @classmethod
    def take(cls) -> LocalState:
        """The state now."""
        threads, fd_count = frozenset(threading.enumerate()), psutil.Process().num_fds()
        return cls(threads, frozenset(listening_ports()), fd_count, fd_targets())

    def assert_none_left(self, grace: float = 10.0) -> None:
        """Raise AssertionError when threads, listening sockets or file descriptors made since
        this state are still there after ``grace`` s (what goes within it is no leak; a links
        thread ending after its cluster's cleanup once took more than 5 s on a loaded machine)."""
        me = psutil.Process()
        started = time.monotonic()
        while True:
            threads = [t for t in threading.enumerate() if t not in self.threads and t.is_alive()]
            ports = listening_ports() - self.ports
            extra_fds = me.num_fds() - self.fd_count
            if not (threads or ports or extra_fds > 0) or time.monotonic() > started + grace:
                break
            if extra_fds > 0 and time.monotonic() > started + 1:
                # a socket only garbage still holds (a client's cancelled reconnect) is closed
                # by the collector: collected now, what is left is held by something alive
                gc.collect()
            time.sleep(0.05)
        assert not threads, f"threads left running: {[t.name for t in threads]}"
        assert not ports, f"sockets left listening: {sorted(ports)}"
        new = {fd: target for fd, target in fd_targets().items() if self.fds.get(fd) != target}
        assert extra_fds <= 0, f"{extra_fds} file descriptors leaked: {new}"


def listening_ports() -> set[int]:
    """The TCP ports this process listens on."""
    me = psutil.Process()
    return {c.laddr.port for c in me.net_connections("tcp") if c.status == psutil.CONN_LISTEN}


def fd_targets() -> dict[str, str]:
    """This process's open descriptors and what each points to (for a leak's message)."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return found


def tmp_entries(tmp_dir: str) -> list[str]:
    """What the session's temp dir holds, pytest's own tmp_path folders left out."""
    return sorted(p for p in os.listdir(tmp_dir) if not p.startswith("pytest-of-"))


def wait_tmp_clean(
    tmp_dir: str, before: set[str], grace: float = 3.0, ignore: str | None = None
) -> list[str]:
    """Entries of ``tmp_dir`` not in ``before`` still there after ``grace`` s; those starting
    with ``ignore`` never count (nor are waited for)."""
    deadline = time.monotonic() + grace

    def new() -> list[str]:
        entries = tmp_entries(tmp_dir)
        return [p for p in entries if p not in before and not (ignore and p.startswith(ignore))]

    left = new()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = new()
    return left
