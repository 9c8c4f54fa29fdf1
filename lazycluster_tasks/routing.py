"""How cluster traffic finds its way, as an object: a :class:`Routing`, either
:class:`DirectRouting` or :class:`TunnelledRouting` (siblings), made from the network plan by
:func:`make_routing`.

A routing owns the addresses processes bind to and are contacted at, which hosts' ports a port
must be free on, the SSH forwards it opens, and their closing. The cluster asks it; it never
compares mode names.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import logging
import socket
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

from lazycluster_tasks.errors import GroupError
from lazycluster_tasks.group import RuntimeGroup, fan_out
from lazycluster_tasks.links import Links
from lazycluster_tasks.network import NetworkMode, NetworkPlan
from lazycluster_tasks.processes import ProcessInfo
from lazycluster_tasks.runtime import Runtime
from lazycluster_tasks.settings import settings as current_settings
from lazycluster_tasks.ssh import SSHConnection

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
#: Seconds a host has to confirm that the relays moved onto links closed.
RELAY_CLOSE_TIMEOUT = 10.0
#: A route: (host, port) — the port of a process on that host ("" is this machine).
Route = tuple[str, int]


class Routing(abc.ABC):
    """What every routing does: the addresses and port scopes (each its own), the ports this
    machine exposes to the hosts, closing the routes of stopped processes."""

    #: The resolved network mode it serves.
    name: str
    #: Every process is reachable at 127.0.0.1:<port> on every node.
    loopback: bool
    #: What to try when a path the cluster needs is blocked.
    hint: str

    def __init__(self, plan: NetworkPlan, group: RuntimeGroup, controller: Runtime) -> None:
        self.plan, self.group, self.controller = plan, group, controller
        self.routed: set[Route] = set()
        #: Hosts that do not answer now (set by a healing cluster): routes to them wait for
        #: :meth:`reroute` instead of failing the workers started meanwhile elsewhere.
        self.unreachable: Callable[[], Collection[str]] = tuple
        self._missed: dict[str, set[Route]] = {}  # host -> routes it should get
        self._to_close: dict[str, set[int]] = {}  # host -> ports whose forwards must go
        self._lock = threading.Lock()

    @abc.abstractmethod
    def bind_address(self, runtime: Runtime) -> str:
        """The address a process on ``runtime`` binds to."""

    @abc.abstractmethod
    def contact_host(self, bind: str) -> str:
        """The host part other nodes use to reach a process bound to ``bind``."""

    @abc.abstractmethod
    def port_scope(self, runtime: Runtime) -> list[str]:
        """Hosts whose ports must be free for a port bound on ``runtime``."""

    @abc.abstractmethod
    def needs_local_port(self, runtime: Runtime) -> bool:
        """Whether the port must also be free on this machine."""

    @abc.abstractmethod
    def route_scheduler(self, runtime: Runtime, port: int) -> None:
        """Make a listening scheduler reachable."""

    @abc.abstractmethod
    def route_workers(self, workers: Sequence[ProcessInfo]) -> None:
        """Make started workers reachable."""

    def reroute(self, host: str) -> None:
        """``host`` answers again: its forwards must work before anything is placed there."""
        self._tunnels_up(self.group.get_runtime(host))

    @staticmethod
    def _tunnels_up(runtime: Runtime) -> None:
        """Re-establish the runtime's forwards that a dropped connection broke; TunnelError when
        one cannot be yet (e.g. the host's sshd still holds the port for the dead session)."""
        for tunnel in runtime.tunnels:
            tunnel.check()

    @contextlib.contextmanager
    def while_registering(self, workers: Callable[[], Sequence[ProcessInfo]]) -> Iterator[None]:
        """Route the workers in the background while they register (they dial out first)."""
        yield

    def routed_workers(self) -> bool:
        """Whether the workers being registered are routed already (their paths exist once
        they listen)."""
        return True

    def workers_up(self, checked: bool = False) -> None:  # noqa: B027 - a hook: nothing here
        """Started workers registered (``checked``: and the start's readiness check ran)."""

    def forward_to_hosts(self, local_ports: Sequence[int]) -> None:
        """This machine's 127.0.0.1:port as 127.0.0.1:port on every remote host, for the
        processes of the user the cluster logs in as there (the host's other users reach that
        port too: see gates)."""
        with self._lock:
            todo = [p for p in local_ports if ("", p) not in self.routed]
            self.routed.update(("", p) for p in todo)
        if not todo:
            return
        remote = [rt for rt in self.group.runtimes if not rt.is_local]
        try:
            fan_out(
                "forward ports to hosts",
                remote,
                lambda rt: [rt.expose_port_to_runtime(p, p, guarded=True) for p in todo],
            )
        except BaseException:
            with self._lock:
                self.routed -= {("", p) for p in todo}
            raise

    def unroute(self, processes: Sequence[ProcessInfo]) -> None:
        """Close the forwards of stopped processes' ports on every host."""
        routes = {(i.host, p) for i in processes for p in i.ports} & self.routed
        if not routes:
            return
        ports = {port for _, port in routes}
        away = set(self.unreachable())

        def close(runtime: Runtime) -> None:
            self._close(runtime, ports)

        with self._lock:
            self.routed -= routes
            for host in away:
                self._missed.setdefault(host, set()).difference_update(routes)
                self._to_close.setdefault(host, set()).update(ports)
        reached = [rt for rt in self.group.runtimes if rt.host not in away]
        fan_out("close worker routes", reached, close)

    def _close(self, runtime: Runtime, ports: Collection[int]) -> None:
        runtime.close_tunnels(ports)

    def close(self) -> None:
        """Before cleanup: nothing of the routing's own is still being set up."""
        self.start_closing()
        self.wait_closed()

    def start_closing(self) -> None:  # noqa: B027 - a hook: nothing by default
        """Before the cleanup's stop: nothing of the routing's own starts any more."""

    def wait_closed(self) -> None:  # noqa: B027 - a hook: nothing by default
        """After the stop, before the connections close: what was under way has ended."""

    def forget(self, process: ProcessInfo) -> None:
        """A process no longer runs: its routes are no longer ours to close."""
        with self._lock:
            self.routed -= {(process.host, p) for p in process.ports}


class DirectRouting(Routing):
    """Every node dials every other node's own address; no forward but the ports this machine
    exposes to the hosts (e.g. a Prefect API on its loopback)."""

    name = "direct"
    loopback = False
    hint = "network_mode='tunnelled' routes every path over SSH"

    def bind_address(self, runtime: Runtime) -> str:
        """The address a process on ``runtime`` binds to."""
        if runtime is self.controller:
            return self.plan.controller_address
        return self.plan.addresses[runtime.host]

    def contact_host(self, bind: str) -> str:
        """The host part other nodes use to reach a process bound to ``bind``."""
        return bind

    def port_scope(self, runtime: Runtime) -> list[str]:
        """Hosts whose ports must be free for a port bound on ``runtime``."""
        return [runtime.host] if self.group.contains_runtime(runtime.host) else []

    def needs_local_port(self, runtime: Runtime) -> bool:
        """Whether the port must also be free on this machine."""
        return runtime is self.controller or runtime.is_local

    def route_scheduler(self, runtime: Runtime, port: int) -> None:
        """Nothing to do: it listens on an address every node reaches."""

    def route_workers(self, workers: Sequence[ProcessInfo]) -> None:
        """Nothing to do: they listen on addresses every node reaches."""


class TunnelledRouting(Routing):
    """Only SSH reaches the hosts: every process binds 127.0.0.1, and SSH forwards through this
    machine put every scheduler and worker port at 127.0.0.1:<same port> on every node."""

    name = "tunnelled"
    loopback = True
    hint = "check that sshd allows TCP forwarding (AllowTcpForwarding) on every host"

    def __init__(self, plan: NetworkPlan, group: RuntimeGroup, controller: Runtime) -> None:
        super().__init__(plan, group, controller)
        #: Host-to-host SSH links for worker traffic (None: every route goes through here).
        self.links: Links | None = None
        #: Called with host -> worker ports whose routes there leave this machine's relay for
        #: links (its listeners closed, the links' not open yet): the connections still open
        #: on the relay are that host's workers' to end.
        self.on_moved: Callable[[dict[str, set[int]]], None] | None = None
        self._relayed: dict[str, set[Route]] = {}  # host -> routes through this machine
        #: starts each host's OpenSSH master for its forwards while the scheduler and the
        #: first workers boot; the workers' routes wait for it (the scheduler's do not)
        self._masters = start_masters(group.runtimes)
        self._routed_workers = threading.Event()  # those of the last while_registering

    def _masters_started(self) -> None:
        """Wait until every host's master is up or known not to come up (bounded by their
        connect timeouts)."""
        if self._masters is not None:
            self._masters.join()

    def workers_up(self, checked: bool = False) -> None:
        """Set the links up now, not earlier: a start does not share the hosts' CPUs with their
        handshakes (until they are up, routes go through here). ``checked``: the pairs the
        readiness check made talk are not the job's, and dial no link on demand."""
        if self.links is not None:
            if checked:
                self.links.forget_wanted()
            self.links.start()

    def use_links(self, links: Links) -> None:
        """Carry worker traffic over ``links`` where they come up."""
        self.links = links
        links.on_up = self._all_onto_links
        links.on_lost = self._off_links

    def _off_links(self, lost: Mapping[tuple[str, str], Collection[int]]) -> None:
        """Routes of links that ended go through this machine again (their listeners on the
        host ended with the link's master, so the relay can take the ports)."""
        for (host, target), ports in lost.items():
            runtime = self.group.get_runtime(host)
            routes = {(target, port) for port in ports}
            for _, port in sorted(routes):
                try:
                    runtime.expose_port_to_runtime(port, port)
                except Exception as exc:  # named; Dask's own retries see the refusal
                    logger.warning("route %s:%s not put back through here: %s", host, port, exc)
                    routes.discard((target, port))
            with self._lock:
                self._relayed.setdefault(host, set()).update(routes)

    def bind_address(self, runtime: Runtime) -> str:
        return LOOPBACK

    def contact_host(self, bind: str) -> str:
        return LOOPBACK

    def port_scope(self, runtime: Runtime) -> list[str]:
        return self.group.hosts  # the port is forwarded to every host

    def needs_local_port(self, runtime: Runtime) -> bool:
        return True  # and to this machine

    def route_scheduler(self, runtime: Runtime, port: int) -> None:
        """Only once it listens: a forward to a scheduler not listening yet would accept the
        workers' connections and drop them, which they do not retry (a refused one they do)."""
        others = [rt for rt in self.group.runtimes if rt is not runtime and not rt.is_local]
        try:
            if runtime is not self.controller and not runtime.is_local:
                runtime.expose_port_from_runtime(port, port)
            fan_out("route scheduler", others, lambda rt: rt.expose_port_to_runtime(port, port))
        except BaseException:  # none of its forwards stays open
            for rt in [runtime, *others]:
                rt.close_tunnel(port)
            raise
        logger.info("tunnels up: the scheduler at 127.0.0.1:%d on %d hosts", port, len(others))

    def route_workers(self, workers: Sequence[ProcessInfo]) -> None:
        """Every worker (and nanny) port at 127.0.0.1 here, every worker port at 127.0.0.1 on
        every other host — one forward batch per host, all hosts at once."""
        self._masters_started()
        with self._lock:
            todo = [(i.host, p) for i in workers for p in i.ports if (i.host, p) not in self.routed]
            self.routed.update(todo)
        if not todo:
            return
        worker_ports = {(i.host, i.ports[0]) for i in workers}
        away = set(self.unreachable())
        with self._lock:
            for host in away:  # routed once it answers (see reroute)
                missed = {r for r in todo if r[0] != host and r in worker_ports}
                self._missed.setdefault(host, set()).update(missed)
        if away:
            logger.info("routes to %s wait until it answers", ", ".join(sorted(away)))
        reached = [rt for rt in self.group.runtimes if rt.host not in away]
        try:
            self._route(todo, worker_ports, reached)
        except BaseException:  # none of these routes stays open (a retry makes them again)
            ports = {port for _, port in todo}
            with contextlib.suppress(GroupError):  # what a host keeps open, the cleanup closes
                fan_out("close worker routes", reached, lambda rt: self._close(rt, ports))
            with self._lock:
                self.routed -= set(todo)
            raise

    def reroute(self, host: str) -> None:
        """``host`` answers again: forward the worker ports it missed meanwhile and close those
        of workers stopped meanwhile."""
        runtime = self.group.get_runtime(host)
        self._tunnels_up(runtime)  # the scheduler's route first: a worker started there needs it
        with self._lock:
            missed = self._missed.pop(host, set()) & self.routed
            to_close = self._to_close.pop(host, set())
        self._close(runtime, to_close)
        self._to_host(runtime, sorted(missed))
        if missed or to_close:
            logger.info(
                "host %s: %d worker routes added, %d closed", host, len(missed), len(to_close)
            )

    def _route(
        self, todo: list[Route], worker_ports: set[Route], runtimes: Sequence[Runtime]
    ) -> None:

        def route(runtime: Runtime) -> None:
            if runtime.is_local:
                return
            runtime.expose_ports(from_runtime=[port for host, port in todo if host == runtime.host])
            own = [str(port) for host, port in todo if host == runtime.host]
            others = [r for r in todo if r[0] != runtime.host and r in worker_ports]
            self._to_host(runtime, others)
            logger.info(
                "tunnels up for %s: its ports %s here, %d worker ports of other hosts there",
                runtime.host,
                ",".join(own) or "-",
                len(others),
            )

        fan_out("route worker ports", list(runtimes), route)

    def _to_host(self, runtime: Runtime, routes: Collection[Route]) -> None:
        """Put other hosts' worker ports at 127.0.0.1 on ``runtime``: through the host-to-host
        link where one is up, else through this machine — also while the links are being set
        up; :meth:`_onto_links` moves those routes once they are."""
        if not routes:
            return
        links = self.links
        carried: set[str] = set()
        if links is not None and links.done:
            by_target: dict[str, list[int]] = {}
            for host, port in routes:
                by_target.setdefault(host, []).append(port)
            carried = links.forward(runtime, by_target)
        relayed = {r for r in routes if r[0] not in carried}
        self._relay(runtime, relayed)
        if links is not None and relayed and links.done:  # they may have come up meanwhile
            self._onto_links(runtime)

    def _relay(self, runtime: Runtime, routes: Collection[Route]) -> None:
        """Put these routes at 127.0.0.1 on ``runtime`` through this machine (a connection
        on one asks for the link of its two hosts, where links are dialled on demand)."""
        links = self.links if self.links is not None and self.links.on_demand else None
        plain = []  # no hook: at once (in one request on the host's OpenSSH master)
        for target, port in sorted(routes):
            if links is not None and target:
                wanted = functools.partial(links.want, runtime.host, target)
                runtime.expose_port_to_runtime(port, port, on_accept=wanted)
            else:
                plain.append(port)
        runtime.expose_ports(to_runtime=plain)
        if self.links is not None and routes:
            with self._lock:
                self._relayed.setdefault(runtime.host, set()).update(routes)

    def _onto_links(self, runtime: Runtime) -> None:
        """Move ``runtime``'s relayed routes whose pair has a link up onto it."""
        self._move_onto_links([runtime])

    def _all_onto_links(self) -> None:
        away = set(self.unreachable())
        self._move_onto_links(
            [rt for rt in self.group.runtimes if not rt.is_local and rt.host not in away]
        )

    def _move_onto_links(self, runtimes: Sequence[Runtime]) -> None:
        """Move the runtimes' relayed routes whose pair has a link up onto it: the relay's
        listener closes, the link's opens on the same port (a connection refused meanwhile is
        retried by Dask; open ones go on through the relay until they end, and
        :attr:`on_moved` has the workers end theirs once idle). One round trip per host whose
        masters are used, for all the runtimes at once; what no link takes goes back through
        here."""
        assert self.links is not None
        moves: dict[str, set[Route]] = {}
        with self._lock:
            for runtime in runtimes:
                mine = self._relayed.get(runtime.host, set())
                todo = {r for r in mine if (runtime.host, r[0]) in self.links.up}
                mine -= todo
                if todo:
                    moves[runtime.host] = todo
        if not moves:
            return
        movers = [rt for rt in runtimes if rt.host in moves]

        def close_relays(runtime: Runtime) -> None:
            # a transfer under way is not cut
            runtime.close_tunnels([port for _, port in moves[runtime.host]], drain=True)
            # the cancels are not answered; a request sent after them on the same connection
            # has an answer once the host's sshd handled them (it handles them in order), so
            # the ports are free for a link's -R, bound there by another sshd (a race lost
            # under load left routes on the relay)
            runtime.settle_tunnels(RELAY_CLOSE_TIMEOUT)

        try:
            fan_out("close relayed routes", movers, close_relays)
        except GroupError as exc:  # a host that did not answer: its routes may still be held
            logger.info("relays not confirmed closed: %s", exc)
        if self.on_moved is not None:  # before the links take the ports: the next connection
            try:  # the workers open is the link's
                self.on_moved(
                    {host: {port for _, port in routes} for host, routes in moves.items()}
                )
            except Exception as exc:  # their connections end on the relay, as they would
                logger.info("relayed connections not retired: %s", exc)
        by_target: dict[str, dict[str, list[int]]] = {}
        for host, routes in moves.items():
            for target, port in routes:
                by_target.setdefault(host, {}).setdefault(target, []).append(port)
        carried = self.links.forward_all(by_target)
        back = {
            rt.host: {r for r in moves[rt.host] if r[0] not in carried.get(rt.host, set())}
            for rt in movers
        }
        fan_out(
            "routes back through here",
            [rt for rt in movers if back[rt.host]],
            lambda rt: self._relay(rt, back[rt.host]),
        )

    def _close(self, runtime: Runtime, ports: Collection[int]) -> None:
        linked = self.links.cancel(runtime, list(ports)) if self.links is not None else set()
        with self._lock:
            mine = self._relayed.get(runtime.host, set())
            mine -= {r for r in mine if r[1] in ports}
        super()._close(runtime, set(ports) - linked)

    def start_closing(self) -> None:
        if self.links is not None:
            self.links.start_closing()

    def wait_closed(self) -> None:
        self._masters_started()
        if self.links is not None:
            self.links.wait_closed()

    @contextlib.contextmanager
    def while_registering(self, workers: Callable[[], Sequence[ProcessInfo]]) -> Iterator[None]:
        errors: list[BaseException] = []
        routed = threading.Event()
        self._routed_workers = routed

        def route() -> None:
            try:
                self.route_workers(workers())
                routed.set()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=route, name="lct-route-workers", daemon=True)
        thread.start()
        try:
            yield
        finally:
            thread.join()
        if errors:
            raise errors[0]

    def routed_workers(self) -> bool:
        return self._routed_workers.is_set()


def start_masters(runtimes: Sequence[Runtime]) -> threading.Thread | None:
    """Start the remote runtimes' OpenSSH masters in the background (the thread that does it;
    None when ``openssh_forwards`` is off). Each is bounded by its host's connect timeout."""
    if not current_settings().openssh_forwards:
        return None
    remote = [rt for rt in runtimes if not rt.is_local]
    thread = threading.Thread(
        target=_use_openssh, args=(remote,), name="lct-ssh-masters", daemon=True
    )
    thread.start()
    return thread


def _use_openssh(runtimes: Sequence[Runtime]) -> None:
    """Each runtime's master, all at once; one that does not come up leaves paramiko's."""
    try:
        fan_out("OpenSSH masters", list(runtimes), lambda rt: rt.use_openssh())
    except GroupError as exc:  # a host that did not answer: paramiko's forwards, as before
        logger.info("forwards stay on paramiko: %s", exc)


ROUTINGS: dict[str, type[Routing]] = {
    DirectRouting.name: DirectRouting,
    TunnelledRouting.name: TunnelledRouting,
}


def make_routing(plan: NetworkPlan, group: RuntimeGroup, controller: Runtime) -> Routing:
    """The routing the plan chose."""
    return ROUTINGS[plan.mode](plan, group, controller)


def scheduler_bind_before_plan(group: RuntimeGroup, mode: NetworkMode) -> str | None:
    """The address a scheduler on this machine binds to in ``mode``, told before any host is
    reached, or None; the caller compares it with the plan's. ``tunnelled`` binds the
    loopback. ``direct`` binds the address this machine's packets to the first host leave
    from: the kernel's route for a UDP socket (no packet is sent), which the plan measures on
    the SSH connection. A host behind a jump host or a proxy command has no route from here;
    ``auto`` is only known once the plan is made."""
    remote = [rt for rt in group.runtimes if not rt.is_local]
    if mode == "tunnelled" or not remote:
        return LOOPBACK
    if mode != "direct":
        return None
    connection = remote[0].connection
    if not isinstance(connection, SSHConnection):
        return None
    settings = connection.settings
    if settings.proxy_jump or settings.proxy_command:
        return None
    try:
        family, _, _, _, address = socket.getaddrinfo(
            settings.hostname, settings.port, type=socket.SOCK_STREAM
        )[0]
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.connect(address)
            return str(udp.getsockname()[0])
    except (OSError, IndexError):
        return None  # the plan's connection says what is wrong, if anything
