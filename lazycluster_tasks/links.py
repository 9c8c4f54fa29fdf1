"""Host-to-host SSH links: the tunnelled data plane between workers, without this machine.

Where only port 22 is open, a worker's port on host B is reached from host A through an OpenSSH
master connection that A opens to B's sshd (one per pair of hosts), with one ``-L`` forward per
worker port added to it as workers start. Bytes between workers then cross one SSH hop, encrypted
by OpenSSH on the two hosts, instead of two hops through this machine's Python relays.

The masters log in with a key made for the cluster (:class:`LinkKey`), delivered as 0600 files
in the cluster folders and authorized in each host's ``~/.ssh/authorized_keys`` for the cluster's
lifetime with options that allow forwarding to the host's loopback and nothing else. The far host's
key is the one this machine verified for it. A pair whose link does not come up (a host that
cannot reach the other's sshd, no ssh client, sshd reading keys from elsewhere) is named in the
log and keeps the route through this machine; the pairs of a host that did not answer during the
set-up are dialled once it answers again. While the cluster runs, every host is asked every
few seconds whether its links' masters still run (one round trip per host); the routes of a
link that ended go through this machine again, and the link is dialled again once both its hosts
answer (at once, then after longer and longer pauses while it fails); when it is up, its routes
move back onto it. Masters are cluster processes (pid files in the cluster folder), so cleanup
and ``teardown(record)`` stop them; both revoke the key. One watch per host (see
commands.LINK_WATCH) ends the host's masters once the cluster has no worker there (its controller
died, say).
"""

from __future__ import annotations

import logging
import posixpath
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from lazycluster_tasks import commands, processes
from lazycluster_tasks.connection import INTERNAL_TIMEOUT, CommandResult, tail
from lazycluster_tasks.errors import GroupError, LazyclusterError, is_transient
from lazycluster_tasks.group import run_parallel
from lazycluster_tasks.processes import ProcessInfo, ProcessSpec
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
#: Seconds a host has to answer a health check.
CHECK_TIMEOUT = 10.0
#: Seconds before a failed reopen of a lost link is tried again: the first pause, and the
#: longest (each failure doubles it).
REOPEN_PAUSE = (5.0, 60.0)
#: Seconds a link lives on a host where no worker of its cluster has started yet.
KEEP_WITHOUT_WORKERS = 120
KEY_FILE = "link/key"
KNOWN_HOSTS = "link/known_hosts"
Pair = tuple[str, str]  # (from host, to host)


@dataclass(frozen=True)
class LinkKey:
    """An Ed25519 key pair made for one cluster (OpenSSH formats)."""

    private: str
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
    ) -> None:
        self.runtimes = [rt for rt in runtimes if not rt.is_local]
        self.addresses = dict(addresses)
        self.folder, self.marker, self.register = folder, marker, register
        #: (from, to) -> control socket of a link that is up
        self.up: dict[Pair, str] = {}
        #: (from, to) -> why that pair goes through this machine
        self.down: dict[Pair, str] = {}
        self._forwarded: dict[Pair, set[int]] = {}
        self._peers: dict[str, Peer] = {}
        self._names: dict[Pair, str] = {}  # pair -> its current master's process name
        #: names given to link processes: a start whose answer was lost may have started them,
        #: so a name is never given twice (a pid file is never overwritten)
        self._given: set[str] = set()
        #: lost pairs to dial again -> (pause after the next failure, earliest next try)
        self._retry: dict[Pair, tuple[float, float]] = {}
        self._answered: set[str] = set()  # hosts that answered the last check
        self._key: LinkKey | None = None
        self._authorized: set[str] = set()  # targets whose authorized_keys has the key
        self._sent: dict[str, str] = {}  # host -> the known_hosts text its folder has
        self._watches: dict[str, str] = {}  # host -> the name of its link watch that runs
        self._serial = 0
        self._lock = threading.Lock()
        #: held while link processes start and are registered: after close() no more start
        self._starting = threading.Lock()
        self._thread: threading.Thread | None = None
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
        """Before cleanup: no link process starts any more (one being started is registered
        first, so the cleanup stops it); the set-up under way gets ``wait`` seconds, and the
        cleanup closing the connections ends it."""
        self._closing.set()
        with self._lock:
            thread, self._thread = self._thread, threading.Thread()  # start() is a no-op now
        if self._starting.acquire(timeout=START_TIMEOUT + 5):
            self._starting.release()
        else:
            logger.warning("a link start did not end within %.0f s", START_TIMEOUT + 5)
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
        while (self.up or self._retry) and not self._closing.wait(CHECK_INTERVAL):
            try:
                lost = self.check()
                if lost and self.on_lost is not None and not self._closing.is_set():
                    self.on_lost(lost)
                if self.reopen():
                    self._links_up()
            except Exception as exc:  # the next round asks again
                logger.warning("host-to-host links not checked: %s", exc)

    def _links_up(self) -> None:
        if self.on_up is not None and not self._closing.is_set():
            try:
                self.on_up()
            except Exception as exc:  # the routes stay on this machine's relays
                logger.warning("routes not moved onto host-to-host links: %s", exc)

    def check(self) -> dict[Pair, set[int]]:
        """Ask every host of the links whether their masters still run (one round trip each,
        no process started there). A pair whose master ended is ``down`` ("link lost") and
        will be dialled again (see :meth:`reopen`); returns those pairs with the ports their
        link carried. A host that does not answer is left to the cluster's own watch."""
        with self._lock:
            by_host: dict[str, dict[str, Pair]] = {rt.host: {} for rt in self.runtimes}
            for pair in self.up:
                by_host.setdefault(pair[0], {})[self._names[pair]] = pair
            watches = {h: w for h, w in self._watches.items() if by_host.get(h)}
            masters = {h: {n: pid_file(n) for n in named} for h, named in by_host.items()}
            for host, watch in watches.items():  # asked with the masters it watches
                masters[host][watch] = pid_file(watch)

        # host after host, in this thread: a check adds no thread to this process
        answers: dict[str, set[str]] = {}
        for host, named in masters.items():
            if self._closing.is_set():
                break
            try:
                result = self._run(self._runtime(host), commands.link_alive(named), CHECK_TIMEOUT)
            except Exception as exc:  # the cluster's own watch deals with a host away
                logger.debug("links of %s not checked: %s", host, exc)
                continue
            answers[host] = _named(result, "0")
        lost: dict[Pair, set[int]] = {}
        unwatched = []
        with self._lock:
            self._answered = set(answers)
            for host, ended in answers.items():
                if watches.get(host) in ended:
                    del self._watches[host]
                    ended = ended - {watches[host]}
                    if set(by_host[host]) - ended:  # links that go on: they get a new watch
                        unwatched.append(host)
                for name in ended:
                    pair = by_host[host][name]
                    if self.up.pop(pair, None) is None:
                        continue
                    self.down[pair] = "link lost"
                    lost[pair] = self._forwarded.pop(pair, set())
                    self._retry.setdefault(pair, (REOPEN_PAUSE[0], 0.0))
        for pair, ports in lost.items():
            logger.warning(
                "link %s -> %s lost; its %d routes go through here again", *pair, len(ports)
            )
        for host in unwatched:
            try:
                self._start(self._runtime(host), [], {})
            except Exception as exc:  # the next check tries again
                logger.warning("link watch on %s not started: %s", host, exc)
        return lost

    def reopen(self) -> list[Pair]:
        """Dial lost links again whose two hosts answered the last check and whose pause is
        over (each host's in one batch, host after host in this thread); returns the pairs
        that are up again. One that fails waits twice as long before the next try."""
        now = time.monotonic()
        with self._lock:
            due: dict[str, list[Pair]] = {}
            for pair, (_, after) in self._retry.items():
                if after <= now and set(pair) <= self._answered:
                    due.setdefault(pair[0], []).append(pair)
        back: list[Pair] = []
        for source, pairs in due.items():
            for first in range(0, len(pairs), LINK_BATCH):
                if self._closing.is_set():
                    return back
                batch = pairs[first : first + LINK_BATCH]
                try:
                    targets = [self._ready_target(b) for _, b in batch]
                    self._start(self._runtime(source), targets, self._files_for(source))
                except Exception as exc:  # tried again after the pause
                    for pair in batch:
                        self.down[pair] = self._why_down(pair, f"not reopened: {exc}")
                with self._lock:
                    for pair in batch:
                        pause, _ = self._retry.pop(pair)
                        if pair in self.up:
                            back.append(pair)
                            logger.info("link %s -> %s up again", *pair)
                            continue
                        self._retry[pair] = (min(2 * pause, REOPEN_PAUSE[1]), now + pause)
                        logger.info(
                            "link %s -> %s not reopened (next try in %.0f s): %s",
                            *pair,
                            pause,
                            self.down.get(pair, "?"),
                        )
        return back

    def _setup(self) -> None:
        if len(self.runtimes) < 2:
            return
        away: dict[str, BaseException] = {}  # hosts that did not answer: tried again later
        peers: dict[str, Peer] = {}
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
                for other in self.runtimes:
                    if other is not rt:
                        self.down[(other.host, rt.host)] = peer
        self._peers = peers
        self._key = LinkKey.generate()
        # 1. every target authorizes the key (before anyone dials it)
        try:
            authorized = run_parallel(
                "authorize link key", {h: self._runtime(h) for h in peers}, self._authorize
            )
        except GroupError as exc:  # a refusal is named (the pairs to it keep the relay)
            authorized = exc.results
            away.update((h, e) for h, e in exc.errors.items() if is_transient(e))
        for host in set(peers) - set(authorized):
            peers.pop(host)
        # 2. every host starts its masters, 3. and reports which came up
        jobs = {}
        order = list(peers.values())
        for index, rt in enumerate(self.runtimes):
            # each host dials the others in its own rotation, LINK_BATCH at a time: no sshd
            # gets every host's handshake at once (MaxStartups drops beyond 10 by default)
            rotated = order[index % len(order) :] + order[: index % len(order)] if order else []
            targets = [p for p in rotated if p.host != rt.host]
            if targets and rt.host not in away:
                jobs[rt.host] = (rt, targets)

        def start(job: tuple[Runtime, list[Peer]]) -> None:
            runtime, targets = job
            for first in range(0, len(targets), LINK_BATCH):
                if self._closing.is_set():
                    return
                batch = targets[first : first + LINK_BATCH]
                self._start(runtime, batch, self._files_for(runtime.host))

        try:
            run_parallel("start links", jobs, start)
        except GroupError as exc:
            if not all(is_transient(e) for e in exc.errors.values()):
                raise
            away.update(exc.errors)
        self._retry_away(away)
        if self.up:
            logger.info(
                "host-to-host SSH links up: %d of %d pairs",
                len(self.up),
                len(self.up) + len(self.down),
            )

    def _retry_away(self, away: Mapping[str, BaseException]) -> None:
        """The pairs of hosts that did not answer during the set-up are dialled again once both
        answer a check (a host cut off for a while still gets its links)."""
        for host, exc in away.items():
            why = f"{host} did not answer during the set-up: {' '.join(str(exc).split())}"
            logger.info("links of %s not set up (tried again once it answers): %s", host, why)
            for rt in self.runtimes:
                for pair in ((host, rt.host), (rt.host, host)):
                    target_ok = pair[1] in self._peers or pair[1] in away  # else never one
                    if rt.host != host and pair not in self.up and target_ok:
                        self.down[pair] = why
                        self._retry.setdefault(pair, (REOPEN_PAUSE[0], 0.0))

    def _authorize(self, runtime: Runtime) -> None:
        """``runtime``'s host lets the cluster's key in (for forwards to its loopback only)."""
        assert self._key is not None
        line = commands.authorized_line(self._key.public, self.marker)
        result = runtime.connection.run(commands.authorize_key(line, self.marker), timeout=30)
        if not result.ok:
            why = f"could not authorize the key: {tail(result.output, 200)}"
            self._target_down(runtime.host, why)
            raise LazyclusterError(why)
        self._authorized.add(runtime.host)

    def _ready_target(self, host: str) -> Peer:
        """``host`` as a link target for a reopen: its address and key known, the key
        authorized there (a host away during the set-up has neither yet)."""
        peer = self._peers.get(host)
        if peer is None:
            found = Peer.of(self._runtime(host), self.addresses.get(host))
            if isinstance(found, str):
                raise LazyclusterError(found)
            peer = self._peers[host] = found
        if host not in self._authorized:
            self._authorize(self._runtime(host))
        return peer

    def _files_for(self, host: str) -> dict[str, str]:
        """The key and known_hosts to deliver with ``host``'s next masters (none when its
        folder has them and knows every target)."""
        assert self._key is not None
        known = "".join(f"{p.alias} {p.key_type} {p.key}\n" for p in self._peers.values())
        if self._sent.get(host) == known:
            return {}
        return {KEY_FILE: self._key.private, KNOWN_HOSTS: known}

    def _why_down(self, pair: Pair, why: str) -> str:
        """Why ``pair`` is down; a pair that was up once says its link was lost first."""
        return f"link lost; {why}" if pair in self._names else why

    def _next_serial(self) -> int:
        with self._lock:
            self._serial += 1
            return self._serial

    def _runtime(self, host: str) -> Runtime:
        return next(rt for rt in self.runtimes if rt.host == host)

    def _target_down(self, target: str, why: str) -> None:
        for rt in self.runtimes:
            if rt.host != target:
                self.down[(rt.host, target)] = why

    def _start(self, runtime: Runtime, targets: list[Peer], files: dict[str, str]) -> None:
        """Start masters to ``targets`` on ``runtime`` (and its link watch, unless one runs
        there) in one round trip, register them, and wait until they are up."""
        host, folder = runtime.host, self.folder(runtime)
        specs, pairs, controls = [], {}, {}
        for peer in targets:
            pair = (host, peer.host)
            serial = self._next_serial()
            # a fresh socket each time (a killed master leaves its file behind), relative to
            # the cluster folder: however deep the folder, the path fits a socket address
            control = f"link{serial}.s"
            master = commands.link_master_argv(
                control,
                posixpath.join(folder, KEY_FILE),
                posixpath.join(folder, KNOWN_HOSTS),
                peer.alias,
                peer.key_type,
                peer.user,
                peer.address,
                peer.port,
            )
            name = link_name(*pair)
            name = name if name not in self._given else f"{name}-{serial}"
            self._given.add(name)
            specs.append(ProcessSpec(name, master, role="link"))
            pairs[name], controls[name] = pair, control
        watch = None
        if host not in self._watches:
            watch = f"link-watch-{self._next_serial()}"
            argv = commands.link_watch_argv(folder, KEEP_WITHOUT_WORKERS)
            specs.append(ProcessSpec(watch, argv, role="link"))
        if not specs:
            return
        with self._starting:  # close() waits for this: whatever starts is registered
            if self._closing.is_set():
                return
            infos = processes.start_processes(runtime, folder, specs, files)
            for info in infos:
                self.register(runtime, info)
        with self._lock:
            if KNOWN_HOSTS in files:
                self._sent[host] = files[KNOWN_HOSTS]
            if watch is not None:
                self._watches[host] = watch
        infos = [i for i in infos if i.name in pairs]
        if not infos:
            return
        states = self._run(
            runtime,
            commands.link_states(controls, {i.name: i.pid for i in infos}, SETUP_TIMEOUT),
            SETUP_TIMEOUT + 30,
        )
        up = _named(states, "1")
        failed = [i for i in infos if i.name not in up]
        logs = processes.read_logs(runtime, failed) if failed else {}
        for name, pair in pairs.items():
            if name in up:
                with self._lock:
                    self.up[pair] = controls[name]
                    self._names[pair] = name
                continue
            why = " ".join(tail(logs.get(name, ""), 200).split()) or "did not come up"
            self.down[pair] = self._why_down(pair, why)
            logger.info("link %s -> %s not up (its routes go through here): %s", *pair, why)

    # -- forwards -------------------------------------------------------------------------

    def forward(self, runtime: Runtime, ports: Mapping[str, Sequence[int]]) -> set[str]:
        """Forward each target host's ports to 127.0.0.1 on ``runtime`` through its link (one
        round trip); return the target hosts whose link carried them — the others need the
        route through this machine."""
        todo = {t: list(p) for t, p in ports.items() if p and (runtime.host, t) in self.up}
        if not todo:
            return set()
        lines = [
            f"if {commands.link_forwards(self.up[(runtime.host, t)], p)} >/dev/null 2>&1; "
            f"then echo {commands.q(t + '=1')}; else echo {commands.q(t + '=0')}; fi"
            for t, p in todo.items()
        ]
        result = self._run(runtime, "; ".join(lines), 30)
        carried = _named(result, "1")
        with self._lock:
            for target, port_list in todo.items():
                pair = (runtime.host, target)
                if target in carried:
                    self._forwarded.setdefault(pair, set()).update(port_list)
                else:  # these go through here; whether the master ended is the check's to say
                    logger.info(
                        "link %s -> %s did not take ports %s; they go through here",
                        *pair,
                        ",".join(map(str, port_list)),
                    )
        return carried

    def _run(self, runtime: Runtime, line: str, timeout: float) -> CommandResult:
        """Run ``line`` in the runtime's cluster folder, where the control sockets are (their
        paths are relative to it)."""
        return runtime.connection.run(line, timeout=timeout, working_dir=self.folder(runtime))

    def process(self, pair: Pair) -> str | None:
        """The process name of the pair's current link master (None: never up)."""
        with self._lock:
            return self._names.get(pair)

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
            controls = {b: self.up.get((runtime.host, b)) for b in jobs}
        lines = [
            commands.link_forwards(control, jobs[b], cancel=True) + " >/dev/null 2>&1"
            for b, control in controls.items()
            if control
        ]
        if lines:
            self._run(runtime, "; ".join(lines) + "; true", 30)
        return {p for ports_ in jobs.values() for p in ports_}

    def summary(self) -> dict[str, int]:
        with self._lock:
            return {
                "links_up": len(self.up),
                "links_down": len(self.down),
                "link_forwards": sum(len(p) for p in self._forwarded.values()),
            }
