"""Host-to-host SSH links: the tunnelled data plane between workers, without this machine.

Where only port 22 is open, a worker's port on host B is reached from host A through an OpenSSH
master connection between the two hosts: one per pair of hosts, which one of them dials (see
:func:`link_plan`), with a forward per worker port added to it as workers start — ``-L`` for the
dialling host's traffic, ``-R`` for the other's. Bytes between workers then cross one SSH hop,
encrypted by OpenSSH on the two hosts, instead of two hops through this machine's Python relays.

The masters log in with keys made for the cluster, one per dialling host (:class:`LinkKey`,
delivered as a 0600 file in that host's cluster folder only: a stolen key opens only that host's
pairs). Each host a key dials lets it in through one line of ``~/.ssh/authorized_keys``, set by
the host program ``hostside.authorized_keys`` (the only edit of that file: verified before it
replaces the original, byte-exact, under a lock): from the dialling host's own addresses only,
forwarding to and listening on exactly the 127.0.0.1 ports its links carry (updated as workers
come and go), nothing else, and valid for KEY_LIFETIME from the host's own clock, renewed while
the cluster runs. The far host's key is the one this machine verified for it. A pair whose link
does not come up (a host that cannot reach the other's sshd, no ssh client, an sshd that reads
keys elsewhere, a file that cannot be edited safely) is named in the log and keeps the route
through this machine; the links of a host that did not answer during the set-up are dialled
once it answers again. While the cluster runs, every host is asked every few seconds whether
its links' masters still run (one round trip per host); the routes of a link that ended go
through this machine again, and the link is dialled again once both its hosts answer (at once,
then after longer and longer pauses while it fails); when it is up, its routes move back onto
it. Masters are cluster processes (pid files in the cluster folder), so cleanup and
``teardown(record)`` stop them, and both revoke the keys; once a host has no process of the
cluster left (its controller died, say), its guard (``hostside.guard``) ends the masters,
removes the folder with the keys and revokes the lines by itself.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import posixpath
import queue
import socket
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from lazycluster_tasks import commands, hostside, link_commands, processes
from lazycluster_tasks.connection import INTERNAL_TIMEOUT, CommandResult, tail
from lazycluster_tasks.errors import GroupError, LazyclusterError, is_transient
from lazycluster_tasks.group import run_parallel
from lazycluster_tasks.processes import Guard, ProcessInfo, ProcessSpec
from lazycluster_tasks.runtime import Runtime
from lazycluster_tasks.ssh import SSHConnection

logger = logging.getLogger(__name__)

#: Seconds the set-up waits for all masters (they give up after LINK_CONNECT_TIMEOUT).
SETUP_TIMEOUT = 15.0
#: Seconds the start of a host's link processes may take (one round trip, the commands' bound).
START_TIMEOUT = INTERNAL_TIMEOUT
#: Seconds a cleanup waits for a link set-up under way (then it goes on without it).
CLOSE_WAIT = 2.0
#: Links a host dials at once.
LINK_BATCH = 4
#: Seconds between health checks of the links that are up (one round trip per host).
CHECK_INTERVAL = 5.0
#: Above this many hosts a pair's link is dialled when its hosts' workers first talk (a
#: connection through this machine's relay), not for every pair at the set-up: N(N-1)/2
#: links are only made where the job needs them.
ON_DEMAND_ABOVE = 16
#: Seconds a host has to answer a health check.
CHECK_TIMEOUT = 10.0
#: Seconds before a failed reopen of a lost link is tried again: the first pause, and the
#: longest (each failure doubles it).
REOPEN_PAUSE = (5.0, 60.0)
#: Seconds a key's lines in authorized_keys are valid (from the host's clock); renewed at half.
KEY_LIFETIME = 1800.0
#: Seconds an edit of a host's authorized_keys may take (it waits up to 10 s for a lock).
EDIT_TIMEOUT = 30.0
#: What a host prints of its own addresses (the ``from=`` of its key on the hosts it dials):
#: the address this machine reached it at, then every local address the kernel lists.
ADDRESSES_COMMAND = (
    'echo "ssh ${SSH_CONNECTION:-}"; cat /proc/net/fib_trie /proc/net/if_inet6 2>/dev/null; true'
)
KEY_FILE = "link/key"
GUARD = "guard"  # the host's guard, asked about with the masters
KNOWN_HOSTS = "link/known_hosts"
Pair = tuple[str, str]  # (from host, to host): the direction of workers' traffic
Link = tuple[str, str]  # (dialling host, dialled host): one master, both directions


@dataclass(frozen=True)
class LinkKey:
    """An Ed25519 key pair made for one dialling host of a cluster (OpenSSH formats)."""

    private: str = field(repr=False)
    public: str

    @classmethod
    def generate(cls) -> LinkKey:
        key = ed25519.Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        return cls(private.decode(), public.decode())


@dataclass(frozen=True)
class Peer:
    """How the other hosts log in to one host: address, port, user and its verified key."""

    host: str
    address: str
    port: int
    user: str
    key_type: str
    key: str

    @classmethod
    def of(cls, runtime: Runtime, address: str | None) -> Peer | str:
        """The host as a link target, or why it cannot be one."""
        connection = runtime.connection
        if not isinstance(connection, SSHConnection):
            return "not reached over SSH"
        if address is None:
            return "reached through a jump host (its address is unknown to the others)"
        sock = connection.transport().sock
        if not isinstance(sock, socket.socket):
            return "reached through a proxy (its address is unknown to the others)"
        server_key = connection.transport().get_remote_server_key()
        port = int(sock.getpeername()[1])
        user = connection.transport().get_username() or ""
        return cls(
            runtime.host, address, port, user, server_key.get_name(), server_key.get_base64()
        )

    @property
    def alias(self) -> str:
        return f"lazycluster-{self.host}"


def link_name(source: str, target: str) -> str:
    return f"link-{source}-{target}"


def link_plan(hosts: Sequence[str], targets: Collection[str]) -> dict[str, list[str]]:
    """Which host dials which: one link per pair of hosts, each host dialling about half of
    the others, the nearest first in the ring of ``hosts`` (so no sshd gets every handshake at
    once). Only a host in ``targets`` can be dialled: its pairs are dialled by the other host
    where need be; a pair with neither host in ``targets`` has no link."""
    n = len(hosts)
    plan: dict[str, list[str]] = {h: [] for h in hosts}
    for i, a in enumerate(hosts):
        for step in range(1, n):
            j = (i + step) % n
            if step > n - step or (step == n - step and i > j):
                continue  # the other host's half of the ring
            dialler, far = (a, hosts[j]) if hosts[j] in targets else (hosts[j], a)
            if far in targets:
                plan[dialler].append(far)
    return plan


def host_addresses(text: str) -> list[str]:
    """A host's own addresses from :data:`ADDRESSES_COMMAND`'s output: the one in
    ``SSH_CONNECTION``, the IPv4 addresses ``/proc/net/fib_trie`` marks ``host LOCAL`` and the
    global IPv6 ones of ``/proc/net/if_inet6``; loopback, link-local and duplicates left out."""
    found: list[str] = []

    def add(word: str) -> None:
        try:
            address = ipaddress.ip_address(word)
        except ValueError:
            return
        unusable = address.is_loopback or address.is_link_local or address.is_unspecified
        if not unusable and str(address) not in found:
            found.append(str(address))

    last = ""
    for line in text.splitlines():
        words = line.split()
        if line.startswith("ssh ") and len(words) >= 4:  # client, its port, server, its port
            add(words[3])
        elif len(words) >= 2 and words[0].endswith("--"):
            last = words[1]
        elif "/32 host LOCAL" in line:
            add(last)
        elif len(words) == 6 and len(words[0]) == 32 and words[3] == "00":  # global scope
            add(":".join(words[0][i : i + 4] for i in range(0, 32, 4)))
    return found


def _ranges(ports: Collection[int]) -> str:
    """``60000-60003,60010`` for a set of ports."""
    spans: list[list[int]] = []
    for port in sorted(ports):
        if spans and port == spans[-1][1] + 1:
            spans[-1][1] = port
        else:
            spans.append([port, port])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in spans) or "none"


def _named(result: CommandResult, value: str) -> set[str]:
    """The names a host answered ``name=<value>`` for (the lines the commands' checks print)."""
    return {line[: -len(value) - 1] for line in result.stdout.split() if line.endswith("=" + value)}


def pid_file(name: str) -> str:
    """Link process ``name``'s pid file, relative to the cluster folder."""
    return f"{name}.pid"


class Links:
    """The links of one cluster: set up in the background, used pair by pair by the routing."""

    def __init__(
        self,
        runtimes: Sequence[Runtime],
        addresses: Mapping[str, str],
        folder: Callable[[Runtime], str],
        marker: str,
        register: Callable[[Runtime, ProcessInfo], None],
        python: Callable[[Runtime], str] | None = None,
        guard: Callable[[Runtime], Guard] | None = None,
        ports: Callable[[], Mapping[str, Collection[int]]] = dict,
        key_lifetime: float = KEY_LIFETIME,
        host_lock: Callable[[Runtime], AbstractContextManager[object]] | None = None,
        on_demand: bool = False,
    ) -> None:
        self.runtimes = [rt for rt in runtimes if not rt.is_local]
        #: links are dialled when a pair's workers first talk (see want), not at the set-up
        self.on_demand = on_demand
        #: on demand: the planned links not dialled yet
        self._dormant: set[Link] = set()
        self._wake = threading.Event()  # a link is wanted: the check loop dials it now
        self._wanted: queue.SimpleQueue[Pair] = queue.SimpleQueue()  # see want
        self.addresses = dict(addresses)
        self.folder, self.marker, self.register = folder, marker, register
        #: the interpreter that runs the edit of a host's authorized_keys
        self.python = python or (lambda rt: rt.python_executable)
        #: started with the masters where none runs (it ends them once the host has no process
        #: of the cluster left; see hostside.guard)
        self.guard = guard
        #: held while masters start on a host: the owner's lock that its stops hold too (a
        #: stop that empties a host removes the folder; a master started meanwhile would
        #: lose its pid file with it and outlive the cluster)
        self.host_lock = host_lock or (lambda rt: contextlib.nullcontext())
        self.key_lifetime = key_lifetime
        #: host -> the ports its processes listen on, asked once, when the links are set up
        #: (sshd fixes a key's options when it logs in): its workers' and its next ones'. A
        #: dialler's key in a target's file opens the target's and listens on the dialler's,
        #: so each line names two hosts' ports, not the cluster's
        self._ports = ports
        self.granted: dict[str, frozenset[int]] = {}
        #: (from, to) -> control socket of a link that is up
        self.up: dict[Pair, str] = {}
        #: (from, to) -> why that pair goes through this machine
        self.down: dict[Pair, str] = {}
        self._forwarded: dict[Pair, set[int]] = {}
        self._peers: dict[str, Peer] = {}
        self._via: dict[Pair, Link] = {}  # pair -> the link that carries it (both ways)
        self._names: dict[Link, str] = {}  # link -> its current master's process name
        #: names given to link processes: a start whose answer was lost may have started them,
        #: so a name is never given twice (a pid file is never overwritten)
        self._given: set[str] = set()
        #: lost links to dial again -> (pause after the next failure, earliest next try)
        self._retry: dict[Link, tuple[float, float]] = {}
        #: lost links of a host that cleaned up (no process of the cluster was left there):
        #: dialled again once a route between their hosts is asked for
        self._idle: set[Link] = set()
        self._answered: set[str] = set()  # hosts that answered the last check
        self._keys: dict[str, LinkKey] = {}  # dialling host -> its key
        self._sources: dict[str, list[str]] = {}  # host -> its own addresses (its key's from=)
        #: target -> the dialling hosts whose keys its authorized_keys lets in
        self._granted: dict[str, frozenset[str]] = {}
        #: hosts whose authorized_keys may hold the cluster's lines (an edit ran there, or its
        #: answer was lost): the ones a cleanup revokes
        self.touched: set[str] = set()
        self._written: dict[str, float] = {}  # target -> when its lines were last written
        self._beyond: set[int] = set()  # ports asked for beyond ``granted`` (logged once)
        self._edits: dict[str, threading.Lock] = {}  # one edit of a host's file at a time
        self._sent: dict[str, str] = {}  # host -> the known_hosts text its folder has
        self._serial = 0
        self._lock = threading.Lock()
        #: held while link processes start and are registered: after close() no more start
        self._starting = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ending: threading.Thread | None = None  # the set-up thread, once closing
        self._closing = threading.Event()
        self._ready = threading.Event()
        self._settled = threading.Event()  # set up, and the routes moved onto the links
        #: Called in the links' thread once links came up: after the set-up, and after a lost
        #: link was reopened (the routing moves routes onto links).
        self.on_up: Callable[[], None] | None = None
        #: Called with the pairs whose link ended while running -> the ports it carried (the
        #: routing puts them back through this machine).
        self.on_lost: Callable[[dict[Pair, set[int]]], None] | None = None

    def start(self) -> None:
        """Set the links up in the background, once (they are needed when workers exchange
        data, not to start: the scheduler and the workers' registration go through here)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._setup_logged, name="lct-links", daemon=True
            )
            self._thread.start()

    @property
    def done(self) -> bool:
        """The set-up ended: ``up`` and ``down`` name every pair."""
        return self._ready.is_set()

    def wait(self) -> None:
        """Until the set-up ended (bounded: SETUP_TIMEOUT per batch of LINK_BATCH links)."""
        self.start()
        thread = self._thread
        # the thread goes on checking the links once they are set up and the routes moved onto
        # them: wait for that point
        while not self._settled.wait(0.1):
            if thread is None or not thread.is_alive():
                return

    def close(self, wait: float = CLOSE_WAIT) -> None:
        """:meth:`start_closing`, then :meth:`wait_closed`."""
        self.start_closing()
        self.wait_closed(wait)

    def start_closing(self) -> None:
        """Before cleanup: no link process starts any more (one being started is registered
        first, so the cleanup stops it) and no edit of authorized_keys either. The edits under
        way are not waited for: each host's stop ends them before its revoke, and one it did
        not see lets no line in, or takes it out again (hostside.authorized_keys). What the
        set-up thread is doing (moving routes onto the links) may go on while the cleanup
        stops the processes: see :meth:`wait_closed`. Called again, it waits again."""
        self._closing.set()
        self._wake.set()  # the check loop ends at once
        with self._lock:
            thread, self._thread = self._thread, threading.Thread()  # start() is a no-op now
            if thread is not None and thread.ident is not None:  # not a first call's no-op
                self._ending = thread
        if self._starting.acquire(timeout=START_TIMEOUT + 5):
            self._starting.release()
        else:
            logger.warning("a link start did not end within %.0f s", START_TIMEOUT + 5)

    def wait_closed(self, wait: float = CLOSE_WAIT) -> None:
        """The set-up thread gets ``wait`` seconds to end (before the connections it uses
        close: the cleanup closing them ends it otherwise)."""
        thread, self._ending = self._ending, None
        if thread is not None and thread.ident is not None:
            thread.join(wait)

    def _setup_logged(self) -> None:
        try:
            self._setup()
        except Exception as exc:  # every pair keeps the route through this machine
            logger.warning("host-to-host links not set up (routes go through here): %s", exc)
            for a in self.runtimes:
                for b in self.runtimes:
                    if a is not b and (a.host, b.host) not in self.up:
                        self.down.setdefault((a.host, b.host), f"set-up failed: {exc}")
        self._ready.set()
        self._links_up()
        self._settled.set()
        next_check = time.monotonic() + CHECK_INTERVAL
        while self.up or self._retry or self._idle or self._dormant:
            woken = self._wake.wait(max(0.0, next_check - time.monotonic()))
            if self._closing.is_set():
                return
            self._wake.clear()
            self._take_wanted()
            try:
                if not woken or time.monotonic() >= next_check:  # a wanted link: dial only
                    next_check = time.monotonic() + CHECK_INTERVAL
                    lost = self.check()
                    if lost and self.on_lost is not None and not self._closing.is_set():
                        self.on_lost(lost)
                if self.reopen():
                    self._links_up()
                self._renew()
            except Exception as exc:  # the next round asks again
                logger.warning("host-to-host links not checked: %s", exc)

    def want(self, a: str, b: str) -> None:
        """Hosts ``a`` and ``b`` talk through this machine: their link, if it waits to be
        dialled on demand, is dialled now by the check loop. Called from an SSH transport's
        thread: it only queues the pair (no lock, nothing that waits)."""
        if self.on_demand:
            self._wanted.put((a, b))
            self._wake.set()

    def forget_wanted(self) -> None:
        """Drop the pairs :meth:`want` queued so far (a start's readiness check made them talk)."""
        while True:
            try:
                self._wanted.get_nowait()
            except queue.Empty:
                return

    def _take_wanted(self) -> None:
        """The pairs :meth:`want` queued: their dormant links are due now."""
        while True:
            try:
                pair = self._wanted.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                link = self._via.get(pair)
                if link is None or link not in self._dormant:
                    continue
                self._dormant.discard(link)
                self._retry[link] = (REOPEN_PAUSE[0], 0.0)
            logger.info("link %s -> %s dialled: its hosts' workers talk", *link)

    def _links_up(self) -> None:
        if self.on_up is not None and not self._closing.is_set():
            try:
                self.on_up()
            except Exception as exc:  # the routes stay on this machine's relays
                if self._closing.is_set():  # the cleanup stopped what it was moving onto
                    logger.debug("routes not moved onto links (cluster closing): %s", exc)
                else:
                    logger.warning("routes not moved onto host-to-host links: %s", exc)

    def check(self) -> dict[Pair, set[int]]:
        """Ask every host of the links whether their masters still run (one round trip each,
        no process started there). The pairs of a link whose master ended are ``down`` ("link
        lost") and the link will be dialled again (see :meth:`reopen`); returns those pairs with
        the ports the link carried for them. A host whose guard ended has cleaned up after the
        cluster (no process of it was left there): its keys and lines are made again when it
        is dialled or dials again. A host that does not answer is left to the cluster's own
        watch."""
        with self._lock:
            by_host: dict[str, dict[str, Link]] = {rt.host: {} for rt in self.runtimes}
            for link in {self._via[pair] for pair in self.up}:
                by_host[link[0]][self._names[link]] = link
            masters = {h: {n: pid_file(n) for n in named} for h, named in by_host.items()}
            if self.guard is not None:
                for host in set(self._granted) | set(self._sent):
                    masters[host][GUARD] = commands.GUARD_PID
        # asked by path: a folder its guard removed is no place to run a command in
        for host, named in masters.items():
            where = self.folder(self._runtime(host))
            masters[host] = {n: posixpath.join(where, path) for n, path in named.items()}

        # host after host, in this thread: a check adds no thread to this process
        answers: dict[str, set[str]] = {}
        for host, named in masters.items():
            if self._closing.is_set():
                break
            if not named:
                answers[host] = set()
                continue
            try:
                line = link_commands.link_alive(named)
                result = self._runtime(host).connection.run(line, timeout=CHECK_TIMEOUT)
            except Exception as exc:  # the cluster's own watch deals with a host away
                logger.debug("links of %s not checked: %s", host, exc)
                continue
            answers[host] = _named(result, "0")
        lost: dict[Pair, set[int]] = {}
        ended: list[Link] = []
        with self._lock:
            self._answered = set(answers)
            cleaned = {host for host, names in answers.items() if GUARD in names}
            for host in cleaned:
                self._granted.pop(host, None)
                self._written.pop(host, None)
                self._sent.pop(host, None)
                logger.info("%s cleaned up after the cluster (no process of it was left)", host)
            for host, names in answers.items():
                for name in names - {GUARD}:
                    link = by_host[host][name]
                    for pair in (link, link[::-1]):
                        if self.up.pop(pair, None) is not None:
                            self.down[pair] = "link lost"
                            lost[pair] = self._forwarded.pop(pair, set())
                    ended.append(link)
                    if set(link) & cleaned:  # dialled again once a route asks for it
                        self._idle.add(link)
                    else:
                        self._retry.setdefault(link, (REOPEN_PAUSE[0], 0.0))
        for link in ended:
            ports = len(lost.get(link, ())) + len(lost.get(link[::-1], ()))
            logger.warning("link %s -> %s lost; its %d routes go through here again", *link, ports)
        return lost

    def reopen(self) -> list[Pair]:
        """Dial lost links again whose two hosts answered the last check and whose pause is
        over (each host's in one batch, host after host in this thread); returns the pairs
        that are up again. One that fails waits twice as long before the next try."""
        now = time.monotonic()
        with self._lock:
            due: dict[str, list[Link]] = {}
            for link, (_, after) in self._retry.items():
                if after <= now and set(link) <= self._answered:
                    due.setdefault(link[0], []).append(link)
        back: list[Pair] = []
        for source, links in due.items():
            for first in range(0, len(links), LINK_BATCH):
                if self._closing.is_set():
                    return back
                batch = links[first : first + LINK_BATCH]
                try:
                    targets = [self._ready_target(b) for _, b in batch]
                    self._start(self._runtime(source), targets, self._files_for(source))
                except Exception as exc:  # tried again after the pause
                    for link in batch:
                        self._link_down(link, f"not reopened: {exc}")
                with self._lock:
                    for link in batch:
                        pause, _ = self._retry.pop(link)
                        if link in self.up:
                            back += [link, link[::-1]]
                            logger.info("link %s -> %s up again", *link)
                            continue
                        self._retry[link] = (min(2 * pause, REOPEN_PAUSE[1]), now + pause)
                        logger.info(
                            "link %s -> %s not reopened (next try in %.0f s): %s",
                            *link,
                            pause,
                            self.down.get(link, "?"),
                        )
        return back

    def _setup(self) -> None:
        if len(self.runtimes) < 2:
            return
        away: dict[str, BaseException] = {}  # hosts that did not answer: tried again later
        peers: dict[str, Peer] = {}
        why_not: dict[str, str] = {}  # host -> why it cannot be dialled
        for rt in self.runtimes:
            try:
                peer = Peer.of(rt, self.addresses.get(rt.host))
            except Exception as exc:
                if not is_transient(exc):
                    raise
                away[rt.host] = exc
                continue
            if isinstance(peer, Peer):
                peers[rt.host] = peer
            else:
                why_not[rt.host] = peer
        self._peers = peers
        self._measure_sources([rt for rt in self.runtimes if rt.host not in away], away)
        # one link per pair: each host it dials lets its key in, every host starts its masters
        # and reports which came up
        hosts = [rt.host for rt in self.runtimes]
        plan = link_plan(hosts, set(peers) | set(away))
        for dialler, fars in plan.items():
            for far in fars:
                self._via[(dialler, far)] = self._via[(far, dialler)] = (dialler, far)
        for a in hosts:  # pairs without a link: why neither host can be dialled
            for b in hosts:
                if a != b and (a, b) not in self._via:
                    self.down[(a, b)] = why_not.get(b) or why_not.get(a) or "no link"
        if self.on_demand:  # dialled when a pair's workers first talk (see want)
            with self._lock:
                self._answered = set(peers)
                for dialler, fars in plan.items():
                    for far in fars:
                        self._dormant.add((dialler, far))
                        self.down[(dialler, far)] = self.down[(far, dialler)] = "not needed yet"
            logger.info("host-to-host links: %d pairs, each dialled on demand", len(self._dormant))
            return
        self._start_planned(plan, peers, away)
        # a link that did not come up is dialled once from its other host (one that cannot
        # reach the other's sshd may be reachable from it)
        again: dict[str, list[str]] = {}
        for dialler, fars in plan.items():
            for far in fars:
                link = (dialler, far)
                if link not in self.up and dialler in peers and not {dialler, far} & set(away):
                    self._via[link] = self._via[link[::-1]] = link[::-1]
                    again.setdefault(far, []).append(dialler)
        if again:
            logger.info("links dialled from their other host: %d", sum(map(len, again.values())))
            self._start_planned(again, peers, away)
        self._retry_away(away)
        if self.up:
            logger.info(
                "host-to-host SSH links up: %d of %d pairs",
                len(self.up),
                len(self.up) + len(self.down),
            )

    def _start_planned(
        self,
        plan: Mapping[str, list[str]],
        peers: Mapping[str, Peer],
        away: dict[str, BaseException],
    ) -> None:
        """Each host of ``plan`` dials its hosts, LINK_BATCH at a time, all hosts at once, once
        each of them lets its key in; a host that does not answer is added to ``away``."""
        targets = {f for fars in plan.values() for f in fars if f in peers and f not in away}
        refused: set[str] = set()
        try:
            run_parallel(
                "authorize link keys", {h: h for h in targets}, lambda h: self._ensure_lines(h)
            )
        except GroupError as exc:  # a host that refused is named (its pairs keep the relay)
            for host, error in exc.errors.items():
                if is_transient(error):
                    away[host] = error
                    continue
                refused.add(host)
                if not self._closing.is_set():
                    logger.warning(
                        "link keys not let in (its pairs are dialled from it): %s", error
                    )
                for dialler, fars in plan.items():
                    if host in fars:
                        self._link_down((dialler, host), f"could not authorize the key: {error}")
        jobs = {}
        for rt in self.runtimes:
            ready = [
                peers[f]
                for f in plan.get(rt.host, [])
                if f in targets and f not in refused | set(away)
            ]
            if ready and rt.host not in away:
                jobs[rt.host] = (rt, ready)

        def start(job: tuple[Runtime, list[Peer]]) -> None:
            runtime, ready = job
            for first in range(0, len(ready), LINK_BATCH):
                if self._closing.is_set():
                    return
                batch = ready[first : first + LINK_BATCH]
                self._start(runtime, batch, self._files_for(runtime.host))

        try:
            run_parallel("start links", jobs, start)
        except GroupError as exc:
            if not all(is_transient(e) for e in exc.errors.values()):
                raise
            away.update(exc.errors)

    def _retry_away(self, away: Mapping[str, BaseException]) -> None:
        """The links of hosts that did not answer during the set-up are dialled once both
        hosts answer a check (a host cut off for a while still gets its links)."""
        for host, exc in away.items():
            why = f"{host} did not answer during the set-up: {' '.join(str(exc).split())}"
            logger.info("links of %s not set up (tried again once it answers): %s", host, why)
            for rt in self.runtimes:
                link = self._via.get((host, rt.host))
                if rt.host != host and link is not None and link not in self.up:
                    self.down[link] = self.down[link[::-1]] = why
                    self._retry.setdefault(link, (REOPEN_PAUSE[0], 0.0))

    # -- keys and their lines in the hosts' authorized_keys ------------------------------

    def _key_of(self, host: str) -> LinkKey:
        """The key ``host`` dials with (made on first use)."""
        with self._lock:
            key = self._keys.get(host)
            if key is None:
                key = self._keys[host] = LinkKey.generate()
            return key

    def _measure_sources(
        self, runtimes: Sequence[Runtime], away: dict[str, BaseException] | None = None
    ) -> None:
        """Each host's own addresses (its key is accepted from those only), all at once; a
        host that does not answer is added to ``away`` (or the error raised)."""

        def measure(runtime: Runtime) -> list[str]:
            result = runtime.connection.run(ADDRESSES_COMMAND, timeout=CHECK_TIMEOUT)
            return host_addresses(result.stdout)

        try:
            found = run_parallel("host addresses", {rt.host: rt for rt in runtimes}, measure)
        except GroupError as exc:
            if away is None:
                raise
            found = exc.results
            away.update(exc.errors)
        for host, addresses in found.items():
            if not addresses:
                logger.info("%s: its own addresses are unknown; its key is not tied to them", host)
            with self._lock:
                self._sources[host] = addresses

    def _diallers(self, target: str) -> frozenset[str]:
        """Under the lock: the hosts that dial ``target``."""
        return frozenset(d for d, far in set(self._via.values()) if far == target)

    def _ensure_lines(self, target: str, renew: bool = False) -> None:
        """``target``'s authorized_keys lets in the key of every host that dials it (written
        only when it does not yet, or to ``renew`` the lines); raises LazyclusterError naming
        the host and the cause when the file was not edited."""
        with self._lock:
            edit = self._edits.setdefault(target, threading.Lock())
            if not self.granted:
                self.granted = {h: frozenset(p) for h, p in self._ports().items()}
        with edit:  # one edit per host at a time, each with everything known when it starts
            with self._lock:
                diallers = self._diallers(target)
                granted = self._granted.get(target)
            if granted == diallers and not renew:
                return
            unknown = [d for d in diallers if d not in self._sources]
            if unknown:  # a dialling host that does not answer is let in once it does
                away: dict[str, BaseException] = {}
                self._measure_sources([self._runtime(d) for d in unknown], away)
                diallers = diallers - set(away)
            self._write_lines(target, diallers, granted or frozenset())

    def _write_lines(
        self, target: str, diallers: frozenset[str], before: frozenset[str] = frozenset()
    ) -> None:
        """Set ``target``'s lines for ``diallers`` (``before``: those it had); one log line
        naming the file and the comments of the keys added (or renewed), one for those removed."""
        runtime = self._runtime(target)
        lines = [
            link_commands.authorized_line(
                self._key_of(dialler).public,
                link_commands.key_comment(self.marker, dialler, target),
                self._sources.get(dialler, []),
                self.granted.get(target, ()),
                self.granted.get(dialler, ()),
            )
            for dialler in sorted(diallers)
        ]
        scope = link_commands.key_scope(self.marker, target)
        # the lines go on stdin: with many hosts and ports they outgrow a command line
        args = ["--marker", scope, "--lifetime", f"{self.key_lifetime:g}"]
        args += ["--lines-on-stdin", str(len(lines))]  # an input cut short edits nothing
        # only while the cluster runs there: a cleanup needs not wait for this edit (the
        # trailing slash: the stop finds the edit by its folder in its command line)
        args += ["--alive", self.folder(runtime).rstrip("/") + "/"]
        with self._lock:
            if self._closing.is_set():  # the cleanup revokes: nothing more to let in
                raise LazyclusterError(f"{target}: authorized_keys not edited: links closed")
            known = target in self.touched
            self.touched.add(target)
        source = hostside.source("authorized_keys").encode()
        result = runtime.connection.run(
            commands.python_program_with_input(self.python(runtime), args),
            stdin=source + b"\0" + "".join(f"{line}\n" for line in lines).encode(),
            timeout=EDIT_TIMEOUT,
        )
        if not result.ok:
            if not known and result.exit_code in (1, 2):  # its answer: nothing was edited
                with self._lock:
                    self.touched.discard(target)
            why = " ".join(tail(result.stderr or result.output, 300).split())
            raise LazyclusterError(f"{target}: authorized_keys not edited: {why}")
        done = json.loads(result.stdout.strip().splitlines()[-1])
        with self._lock:
            self._granted[target] = diallers
            self._written[target] = time.monotonic()
        added = diallers - before
        comments = ", ".join(
            link_commands.key_comment(self.marker, d, target) for d in sorted(added or diallers)
        )
        if comments:
            logger.log(
                logging.INFO if added else logging.DEBUG,
                "%s: %s %s %s %s (ports %s, until %sZ)",
                target,
                "added" if added else "renewed",
                comments,
                "to" if added else "in",
                done["path"],
                _ranges(self.granted.get(target, set())),
                done["expiry"] or "-",
            )
        if done.get("removed"):
            logger.info("%s: removed %s from %s", target, ", ".join(done["removed"]), done["path"])

    def _renew(self) -> None:
        """Rewrite the lines of hosts whose lines are half way to their expiry (each host that
        answers; the next round tries the others again)."""
        now = time.monotonic()
        with self._lock:
            due = {
                host
                for host, written in self._written.items()
                if now - written >= self.key_lifetime / 2
            }
        for host in sorted(due):
            if self._closing.is_set():
                return
            try:
                self._ensure_lines(host, renew=True)
            except Exception as exc:  # tried again at the next round
                logger.warning("link keys on %s not renewed: %s", host, exc)

    def _ready_target(self, host: str) -> Peer:
        """``host`` as a link target for a reopen: its address and key known, the dialling
        hosts' keys let in there (a host away during the set-up has neither yet, a host that
        cleaned up after the cluster has no lines any more)."""
        peer = self._peers.get(host)
        if peer is None:
            found = Peer.of(self._runtime(host), self.addresses.get(host))
            if isinstance(found, str):
                raise LazyclusterError(found)
            peer = self._peers[host] = found
        self._ensure_lines(host)
        return peer

    def _files_for(self, host: str) -> dict[str, str]:
        """The key and known_hosts to deliver with ``host``'s next masters (none when its
        folder has them and knows every target)."""
        known = "".join(f"{p.alias} {p.key_type} {p.key}\n" for p in self._peers.values())
        if self._sent.get(host) == known:
            return {}
        return {KEY_FILE: self._key_of(host).private, KNOWN_HOSTS: known}

    def _link_down(self, link: Link, why: str) -> None:
        """Both pairs of ``link`` are down for ``why``; a link that was up once says it was
        lost first."""
        why = f"link lost; {why}" if link in self._names else why
        self.down[link] = self.down[link[::-1]] = why

    def _next_serial(self) -> int:
        with self._lock:
            self._serial += 1
            return self._serial

    def _runtime(self, host: str) -> Runtime:
        return next(rt for rt in self.runtimes if rt.host == host)

    def _start(self, runtime: Runtime, targets: list[Peer], files: dict[str, str]) -> None:
        """Start masters to ``targets`` on ``runtime`` (and the host's guard, unless one runs
        there) in one round trip, register them, and wait until they are up."""
        host, folder = runtime.host, self.folder(runtime)
        specs, links, controls = [], {}, {}
        for peer in targets:
            link = (host, peer.host)
            serial = self._next_serial()
            # a fresh socket each time (a killed master leaves its file behind), relative to
            # the cluster folder: however deep the folder, the path fits a socket address
            control = f"link{serial}.s"
            master = link_commands.link_master_argv(
                control,
                posixpath.join(folder, KEY_FILE),
                posixpath.join(folder, KNOWN_HOSTS),
                peer.alias,
                peer.key_type,
                peer.user,
                peer.address,
                peer.port,
            )
            name = link_name(*link)
            name = name if name not in self._given else f"{name}-{serial}"
            self._given.add(name)
            specs.append(ProcessSpec(name, master, role="link"))
            links[name], controls[name] = link, control
        if not specs:
            return
        # close() waits for _starting: whatever starts is registered
        with self._starting, self.host_lock(runtime):
            if self._closing.is_set():
                return
            guard = self.guard(runtime) if self.guard is not None else None
            infos = processes.start_processes(runtime, folder, specs, dict(files), guard)
            for info in infos:
                self.register(runtime, info)
        with self._lock:
            if KNOWN_HOSTS in files:
                self._sent[host] = files[KNOWN_HOSTS]
        states = self._run(
            runtime,
            link_commands.link_states(controls, {i.name: i.pid for i in infos}, SETUP_TIMEOUT),
            SETUP_TIMEOUT + 30,
        )
        up = _named(states, "1")
        failed = [i for i in infos if i.name not in up]
        logs = processes.read_logs(runtime, failed) if failed else {}
        for name, link in links.items():
            if name in up:
                with self._lock:
                    for pair in (link, link[::-1]):
                        self.up[pair] = controls[name]
                        self.down.pop(pair, None)
                    self._names[link] = name
                continue
            why = " ".join(tail(logs.get(name, ""), 200).split()) or "did not come up"
            self._link_down(link, why)
            logger.info("link %s -> %s not up (its routes go through here): %s", *link, why)

    # -- forwards -------------------------------------------------------------------------

    def forward(self, runtime: Runtime, ports: Mapping[str, Sequence[int]]) -> set[str]:
        """Forward each target host's ports to 127.0.0.1 on ``runtime`` through the link of the
        two hosts; return the target hosts whose link carried them — the others need the route
        through this machine."""
        return self.forward_all({runtime.host: ports}).get(runtime.host, set())

    def forward_all(self, ports: Mapping[str, Mapping[str, Sequence[int]]]) -> dict[str, set[str]]:
        """:meth:`forward` for many hosts at once (host -> target -> ports), one round trip per
        host whose masters are used; returns host -> the targets whose link carried them."""
        with self._lock:
            asked = [(h, t) for h, by_target in ports.items() for t, p in by_target.items() if p]
            for pair in asked:
                link = self._via.get(pair)
                if link in self._idle:  # workers came back to its hosts: dial it again
                    self._idle.discard(link)
                    self._retry.setdefault(link, (REOPEN_PAUSE[0], 0.0))
            todo = {pair: list(ports[pair[0]][pair[1]]) for pair in asked if pair in self.up}
            for pair, port_list in list(todo.items()):
                beyond = set(port_list) - self.granted.get(pair[1], frozenset())
                if beyond:  # its key could not use them: through here
                    todo.pop(pair)
                    new = beyond - self._beyond
                    self._beyond |= beyond
                    if new:
                        logger.info(
                            "ports %s of %s are beyond those the link keys were given (%s): "
                            "their routes go through here",
                            _ranges(new),
                            pair[1],
                            _ranges(self.granted.get(pair[1], set())),
                        )
            targets = {self._via[pair][1] for pair in todo}
        # a host whose guard cleaned up lets the keys in again first
        try:
            run_parallel("link keys", {t: t for t in targets}, self._ensure_lines)
        except GroupError as exc:  # those pairs keep the route through here
            for host, error in exc.errors.items():
                if not self._closing.is_set():
                    logger.warning(
                        "link keys not let in on %s (routes go through here): %s", host, error
                    )
            todo = {pair: p for pair, p in todo.items() if self._via[pair][1] not in exc.errors}
        taken = self._on_masters(todo) if todo else set()
        carried: dict[str, set[str]] = {}
        with self._lock:
            for pair, port_list in todo.items():
                if pair in taken:
                    self._forwarded.setdefault(pair, set()).update(port_list)
                    carried.setdefault(pair[0], set()).add(pair[1])
                else:  # these go through here; whether the master ended is the check's to say
                    logger.info(
                        "link %s -> %s did not take ports %s; they go through here",
                        *pair,
                        ",".join(map(str, port_list)),
                    )
        return carried

    def _on_masters(self, ports: Mapping[Pair, Sequence[int]], cancel: bool = False) -> set[Pair]:
        """Add (or cancel) the forwards of each pair's ports — (host, target): the target's
        ports at 127.0.0.1 on the host — on the masters of their links: ``-L`` where the host
        dialled the link, ``-R`` where the target did (run there). One round trip per host
        whose masters are used, all at once. Returns the pairs whose forwards were taken; a
        host that does not answer takes none."""
        # the host of the master -> its control socket -> the parts of its one call
        parts: dict[str, dict[str, dict[str, tuple[Sequence[int], bool]]]] = {}
        pairs = list(ports)
        with self._lock:
            for index, pair in enumerate(pairs):
                control, link = self.up.get(pair), self._via.get(pair)
                if control is None or link is None:
                    continue
                by_control = parts.setdefault(link[0], {}).setdefault(control, {})
                by_control[str(index)] = (ports[pair], link[0] != pair[0])
        lines = {
            host: [link_commands.link_forward_parts(c, p, cancel) for c, p in controls.items()]
            for host, controls in parts.items()
        }

        def run(master_host: str) -> set[Pair]:
            try:
                result = self._run(self._runtime(master_host), "; ".join(lines[master_host]), 30)
            except Exception as exc:  # those routes go through here
                logger.warning("link forwards on %s not changed: %s", master_host, exc)
                return set()
            return {pairs[int(i)] for i in _named(result, "1")}

        found = run_parallel("link forwards", {host: host for host in lines}, run)
        return set().union(*found.values())

    def _run(self, runtime: Runtime, line: str, timeout: float) -> CommandResult:
        """Run ``line`` in the runtime's cluster folder, where the control sockets are (their
        paths are relative to it)."""
        return runtime.connection.run(line, timeout=timeout, working_dir=self.folder(runtime))

    def process(self, pair: Pair) -> str | None:
        """The process name of the master of the pair's link (None: never up)."""
        with self._lock:
            link = self._via.get(pair)
            return self._names.get(link) if link is not None else None

    def link_of(self, pair: Pair) -> Link | None:
        """The link that carries ``pair``: (the host that dialled it, the host it dialled)."""
        with self._lock:
            return self._via.get(pair)

    def carried(self, runtime: Runtime) -> dict[str, set[int]]:
        """Target host -> ports forwarded on ``runtime`` through links."""
        with self._lock:
            return {b: set(p) for (a, b), p in self._forwarded.items() if a == runtime.host}

    def cancel(self, runtime: Runtime, ports: Sequence[int]) -> set[int]:
        """Cancel the link forwards of these ports on ``runtime``; return the ports that were
        link forwards (the rest are the controller's)."""
        jobs: dict[str, set[int]] = {}
        with self._lock:
            for (a, b), forwarded in self._forwarded.items():
                if a == runtime.host and forwarded & set(ports):
                    jobs[b] = forwarded & set(ports)
                    forwarded -= jobs[b]
        self._on_masters({(runtime.host, b): sorted(p) for b, p in jobs.items()}, cancel=True)
        return {p for ports_ in jobs.values() for p in ports_}

    def summary(self) -> dict[str, int]:
        with self._lock:
            return {
                "links_up": len(self.up),
                "links_down": len(self.down),
                "link_forwards": sum(len(p) for p in self._forwarded.values()),
            }
