"""How cluster entities reach each other: one preflight probe per host, then a plan.

In ``auto`` mode the probe (run with the host's Python, one call per host, all hosts at once)
reports whether ``distributed`` is importable, the host's listening ports, and whether TCP
connections to the controller and to the other hosts get through. "direct" needs every one of
those paths; otherwise "tunnelled" routes everything over SSH forwards through the controller. A
refused connection counts as reachable (the packet arrived; nothing listened), a timeout or an
ICMP reject does not. With an explicit mode there is nothing to decide: a shell probe reads the
ports and checks that the interpreter exists, booting no Python on the hosts.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lazycluster_tasks import commands
from lazycluster_tasks.commands import q
from lazycluster_tasks.connection import tail
from lazycluster_tasks.errors import GroupError, RemoteEnvironmentError
from lazycluster_tasks.group import RuntimeGroup, fan_out
from lazycluster_tasks.ports import local_used_ports, parse_proc_net_tcp
from lazycluster_tasks.runtime import Runtime
from lazycluster_tasks.ssh import SSHConnection

logger = logging.getLogger(__name__)

NETWORK_MODES = ("auto", "direct", "tunnelled")
PROBE_TIMEOUT = 1.0

PROBE_SCRIPT = """
import importlib.util, json, socket, sys, threading
args = json.loads(sys.argv[1])
out = {"distributed": importlib.util.find_spec("distributed") is not None,
       "python": "%d.%d.%d" % sys.version_info[:3], "tcp": "", "reach": {}}
for path in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        with open(path) as handle:
            out["tcp"] += handle.read()
    except OSError:
        pass
def probe(key, host, port):
    try:
        socket.create_connection((host, port), timeout=args["timeout"]).close()
        out["reach"][key] = "open"
    except ConnectionRefusedError:
        out["reach"][key] = "refused"
    except OSError:
        out["reach"][key] = "blocked"
threads = [threading.Thread(target=probe, args=(k, h, p)) for k, (h, p) in args["targets"].items()]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(out))
"""


@dataclass
class HostReport:
    host: str
    python: str
    distributed: bool | None  # None: not checked (a worker without it fails at start, named)
    used_ports: set[int]
    reach: dict[str, str]


@dataclass
class NetworkPlan:
    """The resolved network layout of a cluster."""

    mode: str  # "direct" or "tunnelled"
    controller_address: str  # where hosts reach this machine in direct mode
    addresses: dict[str, str]  # host -> address its processes bind and advertise (direct)
    used_ports: dict[str, set[int]] = field(default_factory=dict)  # host -> taken ports
    local_used: set[int] = field(default_factory=set)  # taken on this machine
    reasons: list[str] = field(default_factory=list)  # why tunnelled was chosen

    def taken(self, hosts: Sequence[str], include_local: bool) -> set[int]:
        used = set(self.local_used) if include_local else set()
        for host in hosts:
            used |= self.used_ports.get(host, set())
        return used


def _reachable(state: str | None) -> bool:
    return state in ("open", "refused")


def probe_host(runtime: Runtime, python: str, targets: dict[str, tuple[str, int]]) -> HostReport:
    """Run the preflight probe on one host with the interpreter the cluster will use there
    (its working dir is created first, so every host has one once the plan exists)."""
    runtime.working_dir  # noqa: B018 - created here, in parallel with the other hosts
    args = json.dumps({"targets": targets, "timeout": PROBE_TIMEOUT})
    result = runtime.connection.run(commands.python_call(python, PROBE_SCRIPT, [args]))
    if result.exit_code == 127:
        raise RemoteEnvironmentError(
            f"{runtime.host}: Python interpreter {python!r} not found; set python_executable",
            host=runtime.host,
        )
    try:
        data = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RemoteEnvironmentError(
            f"{runtime.host}: the preflight probe with {python} failed: {tail(result.output, 500)}",
            host=runtime.host,
        ) from None
    return HostReport(
        runtime.host,
        data["python"],
        data["distributed"],
        parse_proc_net_tcp(data["tcp"]),
        data["reach"],
    )


def quick_probe(runtime: Runtime, python: str, targets: dict[str, tuple[str, int]]) -> HostReport:
    """The probe without Python (for an explicit network mode): ports and the interpreter's
    presence only, so a big cluster does not boot one more interpreter per host."""
    runtime.working_dir  # noqa: B018 - created here, in parallel with the other hosts
    command = f"cat /proc/net/tcp /proc/net/tcp6 2>/dev/null; command -v {q(python)} >/dev/null"
    result = runtime.connection.run(command)
    if not result.ok:
        raise RemoteEnvironmentError(
            f"{runtime.host}: Python interpreter {python!r} not found; set python_executable",
            host=runtime.host,
        )
    return HostReport(runtime.host, "", None, parse_proc_net_tcp(result.stdout), {})


def _peer_address(runtime: Runtime) -> str | None:
    """The host's address as this machine reaches it (None through a jump host)."""
    connection = runtime.connection
    assert isinstance(connection, SSHConnection)
    sock = connection.transport().sock
    return str(sock.getpeername()[0]) if isinstance(sock, socket.socket) else None


def _controller_probe(targets: dict[str, tuple[str, int]]) -> dict[str, str]:
    results: dict[str, str] = {}

    def probe(key: str, address: tuple[str, int]) -> None:
        try:
            socket.create_connection(address, timeout=PROBE_TIMEOUT).close()
            results[key] = "open"
        except ConnectionRefusedError:
            results[key] = "refused"
        except OSError:
            results[key] = "blocked"

    threads = [threading.Thread(target=probe, args=item) for item in targets.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def plan_network(
    group: RuntimeGroup, mode: str, probe_port: int, python: Callable[[Runtime], str]
) -> NetworkPlan:
    """Probe every host once (concurrently) and decide how the cluster's entities connect."""
    if mode not in NETWORK_MODES:
        raise ValueError(f"network_mode must be one of {NETWORK_MODES}, not {mode!r}")
    remote = [rt for rt in group.runtimes if not rt.is_local]
    local = [rt for rt in group.runtimes if rt.is_local]
    probe = probe_host if mode == "auto" else quick_probe
    if not remote:
        reports = fan_out("preflight", local, lambda rt: probe(rt, python(rt), {}))
        _check_distributed(reports)
        return NetworkPlan(
            "direct",
            "127.0.0.1",
            {rt.host: "127.0.0.1" for rt in local},
            {h: r.used_ports for h, r in reports.items()},
            local_used_ports(),
        )
    peers = fan_out("connect", remote, _peer_address)
    first = remote[0].connection
    assert isinstance(first, SSHConnection)
    controller = first.local_address or "127.0.0.1"
    addresses = {h: a for h, a in peers.items() if a}
    addresses.update({rt.host: controller for rt in local})
    reasons = [f"{h} is reached through a jump host" for h, a in peers.items() if not a]
    if mode == "direct" and reasons:
        raise ValueError(f"network_mode='direct' is impossible: {'; '.join(reasons)}")
    probing = mode == "auto" and not reasons
    listener = socket.create_server((controller, 0)) if probing else None
    try:
        targets: dict[str, dict[str, tuple[str, int]]] = {rt.host: {} for rt in group.runtimes}
        if probing and listener is not None:
            for rt in remote:
                targets[rt.host]["controller"] = (controller, listener.getsockname()[1])
                for other in remote:
                    if other is not rt:
                        targets[rt.host][other.host] = (addresses[other.host], probe_port)
        here = {h: (a, probe_port) for h, a in peers.items() if a} if probing else {}
        reports = fan_out(
            "preflight", group.runtimes, lambda rt: probe(rt, python(rt), targets[rt.host])
        )
        from_controller = _controller_probe(here)
    finally:
        if listener is not None:
            listener.close()
    _check_distributed(reports)
    for host, report in reports.items():
        reasons += [
            f"{host} cannot reach {target} ({state})"
            for target, state in report.reach.items()
            if not _reachable(state)
        ]
    reasons += [
        f"this machine cannot reach {host} ({state})"
        for host, state in from_controller.items()
        if not _reachable(state)
    ]
    resolved = "tunnelled" if mode == "tunnelled" or (mode == "auto" and reasons) else "direct"
    if mode == "auto":
        logger.info("network mode: %s%s", resolved, f" ({'; '.join(reasons)})" if reasons else "")
    return NetworkPlan(
        resolved,
        controller,
        addresses,
        {h: r.used_ports for h, r in reports.items()},
        local_used_ports(),
        reasons,
    )


def _check_distributed(reports: dict[str, HostReport]) -> None:
    missing = {
        h: RemoteEnvironmentError(
            f"{h}: dask.distributed is not importable by its Python ({r.python}); install it "
            "there (nothing is installed for you)",
            host=h,
        )
        for h, r in reports.items()
        if r.distributed is False
    }
    if missing:
        raise GroupError(
            "dask preflight", {h: r for h, r in reports.items() if h not in missing}, missing
        )
