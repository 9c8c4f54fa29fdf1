"""How cluster entities reach each other: one preflight probe per host, then a plan.

In ``auto`` mode every path a direct cluster needs is measured, never inferred: each host's probe
(its Python, one call per host, all hosts at once) opens a listener of its own and dials the
listeners of the other hosts and of this machine, while this machine dials every host's. A path
is open only when the handshake completes *and* the far end answers with this probe's nonce: a
TCP reset (a firewall's or a closed port's), an ICMP reject and silence are all "blocked". A
refused dial of a peer that may not listen yet is retried until the window closes; a dropped
dial is known after ``SILENT_AFTER`` seconds and one blocked path decides (see
``hostside/probe.py``), so a site where only SSH passes is known in well under a second.
"direct" needs every path; otherwise "tunnelled" routes everything over SSH forwards through
this machine. With an explicit mode there is nothing to decide: a shell probe reads the ports
and checks that the interpreter exists, booting no Python on the hosts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast, get_args

from lazycluster_tasks import commands, hostside
from lazycluster_tasks.commands import q
from lazycluster_tasks.connection import CommandResult, tail
from lazycluster_tasks.errors import GroupError, RemoteEnvironmentError
from lazycluster_tasks.group import Background, RuntimeGroup, fan_out
from lazycluster_tasks.hostside.probe import Probe
from lazycluster_tasks.ports import local_used_ports, parse_proc_net_tcp
from lazycluster_tasks.runtime import Runtime
from lazycluster_tasks.settings import settings
from lazycluster_tasks.ssh import SSHConnection

logger = logging.getLogger(__name__)

#: How the cluster's parts reach each other: measured at start ("auto"), every path direct,
#: or everything through SSH ("tunnelled"). The one place the word list lives.
NetworkMode = Literal["auto", "direct", "tunnelled"]
NETWORK_MODES: tuple[str, ...] = get_args(NetworkMode)


def network_mode(value: object, what: str = "network_mode") -> NetworkMode:
    """``value`` as a NetworkMode; ValueError naming ``what`` and the choices otherwise."""
    if not isinstance(value, str) or value not in NETWORK_MODES:
        raise ValueError(f"{what} must be one of {', '.join(NETWORK_MODES)}, not {value!r}")
    return cast(NetworkMode, value)


#: Seconds a probe keeps dialing a path that does not answer with its nonce.
PROBE_WINDOW = 1.5
#: Extra seconds this machine keeps dialing: the hosts' probes start a little later.
START_SLACK = 0.5
#: Candidate ports a host's probe listener tries (the cluster's own ports, first free one).
PROBE_PORTS = 4
CONTROLLER = "controller"

#: Runs on each host (its Probe class also makes this machine's own dials, in-process).
PROBE_SCRIPT = hostside.source("probe")


@dataclass
class HostReport:
    host: str
    python: str
    distributed: bool | None  # None: not checked (a worker without it fails at start, named)
    used_ports: set[int]
    reach: dict[str, str]
    probe_port: int | None = None


@dataclass
class NetworkPlan:
    """The resolved network layout of a cluster."""

    mode: NetworkMode  # "direct" or "tunnelled"
    controller_address: str  # where hosts reach this machine in direct mode
    addresses: dict[str, str]  # host -> address its processes bind and advertise (direct)
    used_ports: dict[str, set[int]] = field(default_factory=dict)  # host -> taken ports
    local_used: set[int] = field(default_factory=set)  # taken on this machine
    reasons: list[str] = field(default_factory=list)  # why tunnelled was chosen
    #: "from -> to" -> "open" or why not, for every path measured (auto mode)
    paths: dict[str, str] = field(default_factory=dict)
    probe_seconds: float = 0.0

    def taken(self, hosts: Sequence[str], include_local: bool) -> set[int]:
        used = set(self.local_used) if include_local else set()
        for host in hosts:
            used |= self.used_ports.get(host, set())
        return used

    def summary(self) -> str:
        """One line: the mode and why."""
        if not self.paths:
            return f"network mode {self.mode}" + (
                f" ({'; '.join(self.reasons)})" if self.reasons else ""
            )
        if self.mode == "direct":
            return f"network mode direct: all {len(self.paths)} paths open"
        return f"network mode tunnelled: {'; '.join(self.reasons)}"


def probe_host(
    runtime: Runtime, python: str, args: dict[str, object], timeout: float = 30.0
) -> HostReport:
    """Run the preflight probe on one host with the interpreter the cluster will use there
    (its working dir is made beside it, so every host has one once the plan exists)."""
    line = commands.python_call(python, PROBE_SCRIPT, [json.dumps(args)])
    result = _beside_working_dir(runtime, line, timeout)
    if result.exit_code in (126, 127):
        raise _interpreter_missing(runtime.host, python, result.exit_code == 126)
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
        data.get("port"),
    )


def quick_probe(runtime: Runtime, python: str | None) -> HostReport:
    """The probe without Python (for an explicit network mode): ports and the interpreter's
    presence only (``None``: not asked, as the environment check finds it), so a big cluster
    does not boot one more interpreter per host."""
    command = "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null"
    if python is not None:
        command += f'; p=$(command -v {q(python)}) || exit 127; [ -x "$p" ] || exit 126'
    result = _beside_working_dir(runtime, command)
    if not result.ok and python is not None:
        raise _interpreter_missing(runtime.host, python, result.exit_code == 126)
    return HostReport(runtime.host, "", None, parse_proc_net_tcp(result.stdout), {})


def _beside_working_dir(runtime: Runtime, line: str, timeout: float | None = None) -> CommandResult:
    """``line``'s result on the host, run while the host's working dir is made in a session
    of its own (every host has one once the plan exists): one round trip before the plan ends,
    not two in turn."""
    made = Background(lambda: runtime.working_dir, name="lct-working-dir")
    try:
        result = runtime.connection.run(line, timeout=timeout)
    finally:
        made.join()
    made.result()  # why the working dir could not be made
    return result


def quick_probes(
    group: RuntimeGroup, python: Callable[[Runtime], str | None]
) -> dict[str, HostReport]:
    """:func:`quick_probe` on every host at once (the interpreter to ask for on each, or None)."""
    return fan_out("preflight", group.runtimes, lambda rt: quick_probe(rt, python(rt)))


def _interpreter_missing(host: str, python: str, denied: bool) -> RemoteEnvironmentError:
    """The error for an interpreter the login user cannot run (the shell's 127 or 126)."""
    why = "not executable by the login user" if denied else "not found"
    return RemoteEnvironmentError(
        f"{host}: Python interpreter {python!r} {why}; give python=PATH", host=host
    )


def _peer_address(runtime: Runtime) -> str | None:
    """The host's address as this machine reaches it (None through a jump host)."""
    connection = runtime.connection
    assert isinstance(connection, SSHConnection)
    sock = connection.transport().sock
    return str(sock.getpeername()[0]) if isinstance(sock, socket.socket) else None


def plan_network(
    group: RuntimeGroup,
    mode: NetworkMode,
    probe_ports: Sequence[int],
    python: Callable[[Runtime], str],
    window: float = PROBE_WINDOW,
    probed: dict[str, HostReport] | None = None,
) -> NetworkPlan:
    """Probe every host once (concurrently) and decide how the cluster's entities connect.
    ``probed``: the quick probes, made already (beside the environment check)."""
    mode = network_mode(mode)
    started = time.monotonic()
    remote = [rt for rt in group.runtimes if not rt.is_local]
    local = [rt for rt in group.runtimes if rt.is_local]
    if not remote:
        no_paths = {"nonce": "", "me": "", "ports": [], "targets": {}, "window": 0, "expect": 0}
        reports = fan_out(
            "preflight",
            local,
            lambda rt: (
                probe_host(rt, python(rt), no_paths)
                if mode == "auto"
                else quick_probe(rt, python(rt))
            ),
        )
        _check_distributed(reports)
        return NetworkPlan(
            "direct",
            "127.0.0.1",
            {rt.host: "127.0.0.1" for rt in local},
            {h: r.used_ports for h, r in reports.items()},
            local_used_ports(),
            probe_seconds=time.monotonic() - started,
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
    if mode != "auto" or reasons:
        reports = probed if probed is not None else quick_probes(group, python)
        _check_distributed(reports)
        resolved: NetworkMode = "tunnelled" if mode == "tunnelled" or reasons else "direct"
        plan = NetworkPlan(
            resolved,
            controller,
            addresses,
            {h: r.used_ports for h, r in reports.items()},
            local_used_ports(),
            reasons,
            probe_seconds=time.monotonic() - started,
        )
        if reasons:
            logger.info("%s", plan.summary())
        return plan
    nonce = secrets.token_hex(8)
    ports = list(probe_ports)[:PROBE_PORTS]
    hosts = [rt.host for rt in remote]
    with socket.create_server((controller, 0)) as listener:
        back = listener.getsockname()[1]
        args = {
            rt.host: {
                "nonce": nonce,
                "me": rt.host,
                "ports": ports,
                "window": window,
                "expect": len(hosts),  # the other hosts and this machine
                "targets": {  # this machine listens already: its refusal is final
                    CONTROLLER: (controller, [back], CONTROLLER, True),
                    **{h: (addresses[h], ports, h, False) for h in hosts if h != rt.host},
                },
            }
            for rt in remote
        }
        done = threading.Event()  # set once every host's probe returned: nobody dials us then
        accepted = _serve(listener, nonce, len(hosts), started + window + START_SLACK, done)
        # this machine's dials of the hosts' probe listeners: the probe's own code, run here
        dialer = Probe(
            {
                "nonce": nonce,
                "me": CONTROLLER,
                "ports": [],
                "expect": 0,
                "window": window + START_SLACK,
                "targets": {h: (addresses[h], ports, h, False) for h in hosts},
            }
        )
        dialing = threading.Thread(target=dialer.dial_all, name="lct-probe-dials")
        dialing.start()
        try:
            reports = fan_out(
                "preflight", group.runtimes, lambda rt: probe_host(rt, python(rt), args[rt.host])
            )
        finally:
            done.set()
            dialer.decided.set()  # every host reported: a dial still going is not needed
            dialing.join()
            accepted.join()
        dials = dict(dialer.reach)
    _check_distributed(reports)
    paths = {f"{CONTROLLER} -> {h}": dials.get(h, "not measured") for h in hosts}
    for host, report in reports.items():
        if report.probe_port is None and host in hosts:
            paths[f"{CONTROLLER} -> {host}"] = f"no probe port free among {ports}"
        for target, state in report.reach.items():
            paths[f"{host} -> {target}"] = state
    for key, state in sorted(paths.items()):
        if state != "open":
            reasons.append(f"{key}: {state}")
    plan = NetworkPlan(
        "tunnelled" if reasons else "direct",
        controller,
        addresses,
        {h: r.used_ports for h, r in reports.items()},
        local_used_ports(),
        reasons,
        paths,
        time.monotonic() - started,
    )
    logger.info("%s (probe %.2f s)", plan.summary(), plan.probe_seconds)
    return plan


#: The modes ``auto`` chose for host sets, kept here (this machine's cache) as a guess only.
MODES_FILE = "network-modes.json"
#: Host sets remembered (the oldest are forgotten).
MODES_KEPT = 64


def _hosts_key(group: RuntimeGroup) -> str:
    """The same hosts reached the same way, as one key."""
    routes = sorted(
        rt.connection.settings.destination
        for rt in group.runtimes
        if isinstance(rt.connection, SSHConnection)
    )
    return hashlib.sha256("\n".join(routes).encode()).hexdigest()[:32]


def last_mode(group: RuntimeGroup) -> NetworkMode | None:
    """What ``auto`` chose for these hosts last time, if this machine remembers: a guess for
    what can start before the probe (the probe still decides)."""
    chosen = _known_modes(os.path.join(settings().cache_directory, MODES_FILE)).get(
        _hosts_key(group)
    )
    return chosen if chosen in ("direct", "tunnelled") else None


def _known_modes(path: str) -> dict[str, object]:
    """The remembered modes by host set ({} when the file is missing or broken)."""
    try:
        with open(path, encoding="utf-8") as f:
            known = json.load(f)
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def remember_mode(group: RuntimeGroup, mode: NetworkMode) -> None:
    """Keep what ``auto`` chose for these hosts (best effort: a guess lost is no error)."""
    folder = settings().cache_directory
    path = os.path.join(folder, MODES_FILE)
    key = _hosts_key(group)
    known = _known_modes(path)
    if known.get(key) == mode:
        return
    known.pop(key, None)
    known[key] = mode
    known = dict(list(known.items())[-MODES_KEPT:])
    temp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        with open(temp, "w", encoding="utf-8") as f:
            json.dump(known, f)
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)  # a full disk leaves no half-written file behind
        logger.debug("the network mode for these hosts is not kept: %s", exc)


def _serve(
    listener: socket.socket, nonce: str, expect: int, deadline: float, done: threading.Event
) -> threading.Thread:
    """Answer the hosts' dials of this machine with the nonce, in the background, until every
    host dialed, the deadline passed or ``done`` is set."""

    def serve() -> None:
        listener.settimeout(0.05)
        seen = 0
        while seen < expect and time.monotonic() < deadline and not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.sendall(f"{nonce} {CONTROLLER}\n".encode())
            seen += 1

    thread = threading.Thread(target=serve, name="lct-probe-listener")
    thread.start()
    return thread


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
