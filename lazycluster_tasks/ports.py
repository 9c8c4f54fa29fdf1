"""Which TCP ports are taken: one probe per host (``/proc/net/tcp*``), psutil on this machine.

A probe is only a hint: another process may take a port between probe and bind. Start paths
therefore move on to the next port of their list when a bind fails.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Sequence

import psutil

from lazycluster_tasks.errors import NoPortsLeftError

#: Lists every TCP socket of the host's network namespace (IPv4 and IPv6) in one call.
PROBE_COMMAND = "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null"

_TIME_WAIT = "06"


def parse_proc_net_tcp(text: str) -> set[int]:
    """Local ports held by a socket in ``/proc/net/tcp`` format: listening ones and open
    connections alike (a connection's ephemeral port, e.g. an sshd forward's, blocks a bind to
    it as much as a listener); TIME_WAIT does not (servers bind with SO_REUSEADDR)."""
    ports = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or ":" not in fields[1] or fields[3] == _TIME_WAIT:
            continue
        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def local_used_ports() -> set[int]:
    """Ports held by a TCP socket on this machine (any address, any process): listeners and
    open connections alike, TIME_WAIT excepted (see :func:`parse_proc_net_tcp`)."""
    return {
        c.laddr.port
        for c in psutil.net_connections(kind="tcp")
        if c.status != psutil.CONN_TIME_WAIT and c.laddr
    }


def check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"invalid port: {port!r}")
    return port


def as_port_list(ports: int | Iterable[int]) -> list[int]:
    if isinstance(ports, int):
        return [check_port(ports)]
    result = [check_port(p) for p in ports]
    if not result:
        raise ValueError("the port list is empty")
    return result


def first_free(ports: Sequence[int], used: set[int], where: str) -> int:
    for port in ports:
        if port not in used:
            return port
    raise NoPortsLeftError(f"none of the {len(ports)} given ports is free {where}: {_span(ports)}")


def free_ports(ports: Sequence[int], used: set[int], count: int, where: str) -> list[int]:
    """The first ``count`` ports of the list that are not used."""
    chosen = [p for p in ports if p not in used][:count]
    if len(chosen) < count:
        raise NoPortsLeftError(
            f"needed {count} free ports {where}, found {len(chosen)} in {_span(ports)}"
        )
    return chosen


def _span(ports: Sequence[int]) -> str:
    if len(ports) > 6:
        return f"{ports[0]}…{ports[-1]} ({len(ports)} ports)"
    return ", ".join(map(str, ports))


def bindable_here(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound on this machine right now. A probe's list misses
    ports that outgoing connections took since (our default ports lie in Linux's ephemeral
    range); a listener about to bind one asks this first."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Reservations:
    """Ports the cluster's processes hold, by host ("" is this machine): what a probe made
    before they bound cannot show. Safe from any thread."""

    def __init__(self) -> None:
        self._held: dict[str, set[int]] = {}
        self._lock = threading.Lock()

    def hold(self, hosts: Iterable[str], ports: Iterable[int]) -> None:
        ports = set(ports)
        with self._lock:
            for host in hosts:
                self._held.setdefault(host, set()).update(ports)

    def held(self, hosts: Iterable[str] | None = None) -> set[int]:
        """The ports held on ``hosts`` (default: anywhere)."""
        with self._lock:
            chosen = self._held if hosts is None else {h: self._held.get(h, set()) for h in hosts}
            return set().union(*chosen.values()) if chosen else set()

    def release(self, ports: Iterable[int]) -> None:
        ports = set(ports)
        with self._lock:
            for held in self._held.values():
                held.difference_update(ports)


class PortPool:
    """A cluster's ports: the candidates a start may still take, and those its processes
    hold, by host (``Reservations``). A start takes ports out, a stop gives them back. Safe
    from any thread."""

    def __init__(self, candidates: Iterable[int]) -> None:
        self._candidates = list(candidates)
        self._lock = threading.Lock()
        self.reserved = Reservations()

    @property
    def candidates(self) -> list[int]:
        """The ports not taken yet, in order (a copy)."""
        with self._lock:
            return list(self._candidates)

    @candidates.setter
    def candidates(self, ports: Iterable[int]) -> None:
        with self._lock:
            self._candidates = list(ports)

    def take(self, ports: Iterable[int]) -> None:
        """``ports`` are bound by our processes now: no longer candidates."""
        gone = set(ports)
        with self._lock:
            self._candidates = [p for p in self._candidates if p not in gone]

    def hold(self, hosts: Iterable[str], ports: Iterable[int]) -> None:
        """``ports`` are ours on ``hosts`` ("" is this machine), before a probe could see it."""
        self.reserved.hold(hosts, ports)

    def held(self, hosts: Iterable[str] | None = None) -> set[int]:
        return self.reserved.held(hosts)

    def give_back(self, ports: Iterable[int]) -> None:
        """Ports of a stopped process: free for the next processes."""
        ports = list(ports)
        self.reserved.release(ports)
        with self._lock:
            self._candidates.extend(p for p in ports if p not in self._candidates)
