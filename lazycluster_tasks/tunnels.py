"""SSH port forwards as values you own: list them, check them, close them.

* :class:`LocalForward` (``ssh -L``): our ``127.0.0.1:local_port`` -> the host's
  ``127.0.0.1:remote_port``: a listener of ours; each connection it accepts gets a
  ``direct-tcpip`` channel on the runtime's own (authenticated, host-key-verified) transport.
* :class:`RemoteForward` (``ssh -R``): the host's ``127.0.0.1:remote_port`` -> our
  ``127.0.0.1:local_port``, over the runtime's own paramiko transport.

Both ends bind 127.0.0.1. One SSH connection per runtime carries all its tunnels. Threads: one
accepts on every -L listener of this process, one keeper watches every open tunnel and
re-establishes those a dropped connection broke (both exit when no tunnel is open), and each
forwarded connection is pumped by a thread of its own while it is open; an idle forward costs
no thread. A -R forward re-established after a lost connection takes its port back from the
host's sshd, which may still hold it for the dead session.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paramiko

from lazycluster_tasks.errors import TunnelError
from lazycluster_tasks.gates import LoginUserGate
from lazycluster_tasks.ports import PROBE_COMMAND, parse_proc_net_tcp
from lazycluster_tasks.ssh import SSHConnection, close_channel, request_lock
from lazycluster_tasks.ssh_master import OpenSSHMaster

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CHUNK = 2**18
KEEPER_INTERVAL = 1.0
#: Seconds a -L connection waits for the host to open its channel.
CHANNEL_TIMEOUT = 15.0
#: Connections a -L listener queues before accepting them (many workers connect at once).
BACKLOG = 256
#: Seconds a re-established -R forward keeps asking for its port while a dead session of ours
#: may still hold it on the host (see RemoteForward._take_back).
TAKE_BACK_TIMEOUT = 5.0
#: Seconds a host has to answer a request for a -R forward.
REQUEST_TIMEOUT = 20.0


#: Seconds a tunnel's close waits for a pump to finish the send it is in before closing the
#: channel anyway (a send blocked on a full window is safe to close: paramiko sends nothing
#: more for it).
SEND_FINISH_TIMEOUT = 2.0


def pump(
    chan: paramiko.Channel,
    sock: socket.socket,
    stop: int | None = None,
    sending: threading.Lock | None = None,
) -> None:
    """Copy bytes both ways between a channel and a socket until both directions ended, or
    until the descriptor ``stop`` (a pipe's end) becomes readable.

    An end-of-file on one side is passed on as a half-close, so request/response protocols
    that shut down their sending side still get the answer. ``sending`` is held while bytes
    go into the channel: whoever closes the channel from another thread takes it first.
    paramiko checks that a channel is open, lets go of its lock, then sends the data; a close
    in between puts the data after the channel's close, and OpenSSH ends the whole connection
    for it ("data packet referred to nonexistent channel"): every forward on it, the
    scheduler's included, gone (measured: a worker lost when routes moved onto the links).
    The race is paramiko#1115 (open since 2017); a close sent by paramiko's own thread, when
    the far end closes first, can still meet a send that way.
    """
    guard = sending if sending is not None else contextlib.nullcontext()
    chan.settimeout(None)
    open_ends: list[Any] = [sock, chan]
    watch = selectors.DefaultSelector()  # epoll: no descriptor limit, unlike select()
    for end in open_ends:
        watch.register(end, selectors.EVENT_READ)
    if stop is not None:
        # closing a channel from another thread closes the descriptor watched here, which
        # wakes nobody: a pump left watching only its channel needs its own signal
        watch.register(stop, selectors.EVENT_READ)
    try:
        while open_ends:
            readable = [key.fileobj for key, _ in watch.select(5)]
            if stop is not None and stop in readable:
                break
            if sock in readable:
                data = sock.recv(CHUNK)
                if data:
                    with guard:
                        chan.sendall(data)
                else:
                    with guard:
                        chan.shutdown_write()
                    open_ends.remove(sock)
                    _unwatch(watch, sock)
            if chan in readable:
                data = chan.recv(CHUNK)
                if data:
                    sock.sendall(data)
                else:
                    sock.shutdown(socket.SHUT_WR)
                    open_ends.remove(chan)
                    _unwatch(watch, chan)
            if chan.closed and not chan.recv_ready():
                break  # closed (by the far end, or by our close) with nothing left to pass on
            transport = chan.get_transport()
            if not readable and (chan.closed or transport is None or not transport.is_active()):
                break
    except OSError:
        pass
    finally:
        watch.close()
        close_channel(chan)
        with contextlib.suppress(OSError):
            sock.close()


def _unwatch(watch: selectors.BaseSelector, end: Any) -> None:
    """Stop watching ``end``; a channel closed meanwhile (by the tunnel's close) answers
    fileno() with a new descriptor, unknown to the selector: nothing to unregister then."""
    with contextlib.suppress(KeyError, ValueError):
        watch.unregister(end)


class Tunnel:
    """Common surface of both kinds of forwards."""

    kind = ""

    def __init__(self, connection: SSHConnection, local_port: int, remote_port: int) -> None:
        self.connection = connection
        self.host = connection.host
        self.local_port = local_port
        self.remote_port = remote_port
        self.closed = False
        self.last_error: str | None = None
        #: Set when the host's sshd refused to forward a connection by its policy (measured)
        self.refused: str | None = None
        #: its connections being pumped: channel -> (our socket, held while sending into it)
        self._channels: dict[paramiko.Channel, tuple[socket.socket, threading.Lock]] = {}
        #: a pipe whose read end every pump watches, written once at close (made on first use)
        self._stop: tuple[int, int] | None = None
        self._lock = threading.Lock()
        #: One re-establishment at a time (the keeper, a reconnect and a caller's check may
        #: all find the tunnel down at once); taken after the connection's own lock.
        self._reopening = threading.Lock()

    @property
    def is_active(self) -> bool:
        raise NotImplementedError

    def _carry(self, chan: paramiko.Channel, sock: socket.socket) -> None:
        """Pump one forwarded connection until it ends; close() ends it too."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if self.closed:
                close_channel(chan)
                sock.close()
                return
            if self._stop is None:
                self._stop = os.pipe()
            stop = self._stop[0]
            sending = threading.Lock()
            self._channels[chan] = (sock, sending)
        try:
            pump(chan, sock, stop, sending)
        finally:
            with self._lock:
                self._channels.pop(chan, None)
                self._drop_stop()

    def _drop_stop(self) -> None:
        """Close the stop pipe once the tunnel is closed and no pump watches it (under the
        lock: a pump registers it while its channel is listed, so it is open then)."""
        if self.closed and not self._channels and self._stop is not None:
            for fd in self._stop:
                os.close(fd)
            self._stop = None

    def _end_channels(self, drain: bool) -> None:
        """At close: end the open connections, or (``drain``) leave them to end by themselves:
        the last one's pump then closes the stop pipe, or this does when none is open."""
        if not drain:
            self._close_channels()
            return
        with self._lock:
            self._drop_stop()

    def _close_channels(self) -> None:
        """End every connection now: its pump is signalled and ends at once (not at its next
        timeout), the channel closes, and our socket reads end-of-file."""
        with self._lock:
            pairs = list(self._channels.items())
            if self._stop is not None:
                os.write(self._stop[1], b"x")  # never read: stays readable for every pump
            self._drop_stop()
        for chan, (sock, sending) in pairs:
            finished = sending.acquire(timeout=SEND_FINISH_TIMEOUT)  # the send under way
            try:
                close_channel(chan)
            finally:
                if finished:
                    sending.release()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _reopen(self, transport: paramiko.Transport) -> None:
        raise NotImplementedError

    def close(self, drain: bool = False) -> None:
        """Take no more connections and end those open; ``drain``: those open go on until
        either end closes them (their pumps end by themselves, or when the connection to the
        host closes)."""
        raise NotImplementedError

    def check(self) -> bool:
        """True when the tunnel works; a broken one is re-established (TunnelError if it can't)."""
        if self.closed:
            return False
        if self.is_active:
            return True
        try:
            transport = self.connection.transport()  # a reconnect re-establishes it already
            with self._reopening:
                if self.is_active or self.closed:
                    return not self.closed
                logger.info("tunnel %s is down; re-establishing", self)
                self._reopen(transport)
        except Exception as exc:
            self.last_error = str(exc)
            raise TunnelError(
                f"tunnel {self} is down and could not be re-established: {exc}"
            ) from exc
        self.last_error = None
        return True

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("active" if self.is_active else "DOWN")
        return (
            f"<{self.kind} {self.host} local:{self.local_port} remote:{self.remote_port} {state}>"
        )


class LocalForward(Tunnel):
    """``ssh -L 127.0.0.1:local_port:127.0.0.1:remote_port host`` (0 = any free local port).

    The listener outlives dropped connections: a connection accepted after a drop gets its
    channel on the reconnected transport, on the same port.
    """

    kind = "-L"

    def __init__(self, connection: SSHConnection, remote_port: int, local_port: int = 0) -> None:
        super().__init__(connection, local_port, remote_port)
        self._listener: socket.socket | None = None
        self._open()
        _keeper.add(self)

    def _open(self) -> None:
        where = f"127.0.0.1:{self.local_port or '*'} to {self.host}:127.0.0.1:{self.remote_port}"
        try:
            self.connection.transport()  # a host that does not answer fails here, not later
        except Exception as exc:
            raise TunnelError(f"cannot forward {where}: {exc}") from exc
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((LOOPBACK, self.local_port))
            listener.listen(BACKLOG)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            raise TunnelError(f"cannot forward {where}: {exc}") from exc
        self._listener = listener
        self.local_port = int(listener.getsockname()[1])
        _acceptor.add(listener, self._accept)

    @property
    def is_active(self) -> bool:
        return bool(not self.closed and self._listener is not None and self.connection.is_connected)

    def _reopen(self, transport: paramiko.Transport) -> None:
        """Nothing to do: the listener stayed, and connections take the live transport."""

    def _accept(self, client: socket.socket) -> None:
        threading.Thread(
            target=self._serve, args=(client,), name=f"lct-fwd-L{self.local_port}", daemon=True
        ).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            client.setblocking(True)
            chan = self.connection.transport().open_channel(
                "direct-tcpip",
                (LOOPBACK, self.remote_port),
                client.getpeername(),
                timeout=CHANNEL_TIMEOUT,
            )
        except Exception as exc:  # the connecting side sees its connection closed
            prohibited = paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
            if isinstance(exc, paramiko.ChannelException) and exc.code == prohibited:
                if self.refused is None:
                    logger.warning("%s: the host's sshd refused the forward: %s", self, exc)
                self.refused = (
                    f"its sshd refused to forward connections to its 127.0.0.1:"
                    f"{self.remote_port} ({exc.text}: AllowTcpForwarding or PermitOpen forbid it)"
                )
            logger.info("%s: no channel to the host's port: %s", self, exc)
            with contextlib.suppress(OSError):
                client.close()
            return
        self._carry(chan, client)

    def close(self, drain: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        _keeper.remove(self)
        listener, self._listener = self._listener, None
        if listener is not None:
            _acceptor.remove(listener)
            listener.close()
        self._end_channels(drain)


class RemoteForward(Tunnel):
    """``ssh -R 127.0.0.1:remote_port:127.0.0.1:local_port host`` (0 = a port the host picks)."""

    kind = "-R"

    def __init__(
        self,
        connection: SSHConnection,
        local_port: int,
        remote_port: int = 0,
        gate: LoginUserGate | None = None,
        on_accept: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(connection, local_port, remote_port)
        #: who may open connections that reach our port (see gates); None: whoever reaches
        #: the forward on the host
        self.gate = gate
        #: called as each connection arrives (from the transport's thread; must not block)
        self.on_accept = on_accept
        self._transport: paramiko.Transport | None = None
        self._open()
        connection.on_reconnect(self._on_reconnect)
        _keeper.add(self)

    def _open(self, transport: paramiko.Transport | None = None, take_back: bool = False) -> None:
        transport = transport or self.connection.transport()
        dispatcher = _Dispatcher.of(transport)
        try:
            try:
                port = dispatcher.request(transport, self.remote_port)
            except paramiko.SSHException:
                if not take_back:
                    raise
                port = self._take_back(transport)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            why = self._why_denied() if transport.is_active() else "the connection dropped"
            raise TunnelError(
                f"{self.host} refused to forward its 127.0.0.1:{self.remote_port or '*'} to our "
                f"127.0.0.1:{self.local_port}: {why} ({exc})"
            ) from exc
        self.remote_port = int(port)
        dispatcher.routes[self.remote_port] = self
        self._transport = transport

    def _why_denied(self) -> str:
        """Why the host's sshd denied the forward, measured: the port is taken there, or it is
        free and the sshd's policy forbids it (its answer does not say which)."""
        policy = "its sshd forbids remote forwards (AllowTcpForwarding, PermitListen)"
        if not self.remote_port:
            return policy
        try:
            listing = self.connection.run(PROBE_COMMAND, timeout=10).stdout
        except Exception:  # the denial's own message goes with the error
            return f"port {self.remote_port} is taken there, or {policy}"
        if not listing.strip():  # no /proc/net/tcp there: not measured
            return f"port {self.remote_port} is taken there, or {policy}"
        if self.remote_port in parse_proc_net_tcp(listing):
            return f"port {self.remote_port} is taken there"
        return f"port {self.remote_port} is free there: {policy}"

    def _take_back(self, transport: paramiko.Transport) -> int:
        """Our port on the host, which a session of ours that died with the path may still
        hold: an idle sshd sends nothing, so it learns of the loss only when it next writes.
        A connection to the port makes it write (it offers the connection to its lost peer),
        the reset that answers ends it, and the port is free. Bounded by TAKE_BACK_TIMEOUT."""
        dispatcher = _Dispatcher.of(transport)
        deadline = time.monotonic() + TAKE_BACK_TIMEOUT
        pause = 0.1
        while True:
            poke(transport, self.remote_port, pause * 5)
            time.sleep(pause)
            try:
                port = dispatcher.request(transport, self.remote_port)
            except paramiko.SSHException:
                if time.monotonic() + pause > deadline:
                    raise
            else:
                logger.info("%s: port %d taken back from a lost session", self.host, port)
                return port
            pause = min(2 * pause, 1.0)

    def _on_reconnect(self, transport: paramiko.Transport) -> None:
        """Called under the connection's lock: one request, no take-back (the keeper does
        that, without holding every command to the host). Skipped while a check reopens it:
        that check may wait for this lock (it asks the host why a request was denied)."""
        if not self._reopening.acquire(blocking=False):
            return
        try:
            if self.closed:
                return
            try:
                self._open(transport)
                self.last_error = None
            except TunnelError as exc:
                self.last_error = str(exc)
                logger.info("%s; taken back by the next check", exc)
        finally:
            self._reopening.release()

    @property
    def is_active(self) -> bool:
        t = self._transport
        return bool(
            not self.closed
            and t is not None
            and t.is_active()
            and _Dispatcher.of(t).routes.get(self.remote_port) is self
        )

    def _reopen(self, transport: paramiko.Transport) -> None:
        self._open(transport, take_back=True)

    def _accept(self, chan: paramiko.Channel, origin: tuple[str, int]) -> None:
        if self.gate is not None and not self.gate.admits(int(origin[1]), self.remote_port):
            close_channel(chan)
            return
        if self.on_accept is not None:
            try:
                self.on_accept()
            except Exception:  # the connection is carried all the same
                logger.exception("%s: the accept hook failed", self)
        try:
            sock = socket.create_connection((LOOPBACK, self.local_port), timeout=10)
        except OSError as exc:
            logger.info("%s: nothing answers on 127.0.0.1:%s: %s", self, self.local_port, exc)
            close_channel(chan)
            return
        sock.settimeout(None)
        self._carry(chan, sock)

    def close(self, drain: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        _keeper.remove(self)
        self.connection.remove_on_reconnect(self._on_reconnect)
        t = self._transport
        if t is not None:
            _Dispatcher.of(t).routes.pop(self.remote_port, None)
            if t.is_active():
                with contextlib.suppress(Exception):
                    _Dispatcher.cancel(t, self.remote_port)
        self._end_channels(drain)


class MasterForward(Tunnel):
    """A forward carried by the host's OpenSSH master (:mod:`lazycluster_tasks.ssh_master`)
    instead of our paramiko transport: ``-L`` (our ``local_port`` -> the host's
    ``remote_port``) or ``-R`` (the host's ``remote_port``, 0: one it picks -> our
    ``local_port``). No thread of ours carries its bytes. Its close cancels it and leaves the
    connections open on it to end by themselves (OpenSSH's way, a drain); the master's close
    ends them all. If the master ends, the keeper starts it again and adds the forward back
    (a -R taking its port back from the dead session, as :class:`RemoteForward` does)."""

    def __init__(
        self,
        connection: SSHConnection,
        master: OpenSSHMaster,
        kind: str,
        local_port: int,
        remote_port: int,
        added: bool = False,
    ) -> None:
        """``added``: the master took it already (in a request for many, see
        :meth:`OpenSSHMaster.forward`)."""
        if kind not in ("-L", "-R"):
            raise ValueError(f"kind must be -L or -R, not {kind!r}")
        super().__init__(connection, local_port, remote_port)
        self.kind = kind
        self.master = master
        self._generation = master.generation if added else -1  # the start that carries it
        if not added:
            self._open()
        _keeper.add(self)

    @property
    def refused(self) -> str | None:
        """A -L whose connections the host's sshd refused to open (from the master's log)."""
        why = self.master.open_refused() if self.kind == "-L" else None
        if why is None:
            return None
        return (
            f"its sshd refused to forward connections to its 127.0.0.1 ports ({why}: "
            "AllowTcpForwarding or PermitOpen forbid it)"
        )

    @refused.setter
    def refused(self, value: str | None) -> None:
        """The master's log says it (Tunnel sets None at first)."""

    def _specs(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        if self.kind == "-L":
            return [(self.local_port, self.remote_port)], []
        return [], [(self.remote_port, self.local_port)]

    def _open(self) -> None:
        if self.kind == "-L" and not self.local_port:
            self.local_port = _free_local_port()
        local, remote = self._specs()
        generation = self.master.generation
        picked = self.master.forward(local, remote)
        if self.kind == "-R" and not self.remote_port:
            if not picked:
                raise TunnelError(f"{self.host}: no port picked for a forward to {self.local_port}")
            self.remote_port = picked[0]
        self._generation = generation

    @property
    def is_active(self) -> bool:
        return bool(
            not self.closed and self.master.alive and self._generation == self.master.generation
        )

    def _reopen(self, transport: paramiko.Transport) -> None:
        self.master.start()  # once, whichever of its forwards asks first
        if self._generation == self.master.generation:
            return
        deadline = time.monotonic() + TAKE_BACK_TIMEOUT
        pause = 0.1
        while True:
            try:
                self._open()
                return
            except TunnelError:
                if self.kind != "-R" or time.monotonic() + pause > deadline:
                    raise
            poke(transport, self.remote_port, pause * 5)  # a dead session of ours may hold it
            time.sleep(pause)
            pause = min(2 * pause, 1.0)

    def close(self, drain: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        _keeper.remove(self)
        if self.master.alive and self._generation == self.master.generation:
            local, remote = self._specs()
            try:
                self.master.cancel(local, remote)
            except TunnelError as exc:  # the master's close ends it
                logger.info("%s", exc)

    def forget(self) -> None:
        """Closed by the master's own close (no cancel of its own)."""
        self.closed = True
        _keeper.remove(self)


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def poke(transport: paramiko.Transport, port: int, timeout: float) -> None:
    """Open and close a connection to the host's ``127.0.0.1:port``: a session of ours that
    died with the path, and still holds a -R forward there, learns of its loss when it offers
    that connection to its lost peer (an idle sshd sends nothing), and the port is free."""
    with contextlib.suppress(paramiko.SSHException, OSError, EOFError):
        transport.open_channel(
            "direct-tcpip", (LOOPBACK, port), (LOOPBACK, 0), timeout=timeout
        ).close()


class _Dispatcher:
    """paramiko keeps one handler per transport: route incoming channels by their port."""

    def __init__(self) -> None:
        self.routes: dict[int, RemoteForward] = {}

    def request(self, transport: paramiko.Transport, port: int) -> int:
        """Ask the host to listen on its 127.0.0.1:``port`` for us; returns the port.
        paramiko.SSHException when it refuses, or when it does not answer within
        REQUEST_TIMEOUT (paramiko would wait as long as the connection looks open: the
        connection is dropped instead, as a hung one)."""
        fired: list[bool] = []

        def hung() -> None:
            fired.append(True)
            transport.close()

        with request_lock(transport):
            watchdog = threading.Timer(REQUEST_TIMEOUT, hung)
            watchdog.name, watchdog.daemon = "lct-forward-request", True
            watchdog.start()
            try:
                return int(transport.request_port_forward(LOOPBACK, port, self))
            except paramiko.SSHException:
                if fired:
                    raise paramiko.SSHException(
                        f"no answer in {REQUEST_TIMEOUT:.0f} s; connection dropped"
                    ) from None
                raise
            finally:
                watchdog.cancel()

    @staticmethod
    def cancel(transport: paramiko.Transport, port: int) -> None:
        """Ask the host to stop listening on its 127.0.0.1:``port`` for us, without waiting
        for its answer (a closing forward has no use for it). Not
        transport.cancel_port_forward(): that also drops the transport's handler of incoming
        channels, so every other -R forward on the host would be refused."""
        transport.global_request("cancel-tcpip-forward", (LOOPBACK, port), wait=False)

    @classmethod
    def of(cls, transport: paramiko.Transport) -> _Dispatcher:
        existing = getattr(transport, "_lct_dispatcher", None)
        if existing is None:
            existing = cls()
            transport._lct_dispatcher = existing  # type: ignore[attr-defined]
        return existing

    def __call__(self, chan: paramiko.Channel, origin: Any, server: tuple[str, int]) -> None:
        forward = self.routes.get(server[1])
        if forward is None:
            close_channel(chan)
            return
        threading.Thread(
            target=forward._accept,
            args=(chan, origin),
            name=f"lct-fwd-{server[1]}",
            daemon=True,
        ).start()


class _Acceptor:
    """One thread accepts on every -L listener of this process (an epoll selector: no limit on
    descriptors); it exits when no listener is left and starts again with the next one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: dict[socket.socket, Callable[[socket.socket], None]] = {}
        self._wake: socket.socket | None = None  # the running thread's wake-up end

    def add(self, listener: socket.socket, on_accept: Callable[[socket.socket], None]) -> None:
        with self._lock:
            self._listeners[listener] = on_accept
            if self._wake is None:
                wake, self._wake = socket.socketpair()
                threading.Thread(
                    target=self._run, args=(wake,), name="lct-tunnel-accept", daemon=True
                ).start()
            else:
                self._poke()

    def remove(self, listener: socket.socket) -> None:
        """Before the listener is closed: the thread stops watching it."""
        with self._lock:
            if self._listeners.pop(listener, None) is not None:
                self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            with contextlib.suppress(OSError):
                self._wake.send(b"x")

    def _run(self, wake: socket.socket) -> None:
        watch = selectors.DefaultSelector()
        watch.register(wake, selectors.EVENT_READ)
        watched: dict[socket.socket, Callable[[socket.socket], None]] = {}
        try:
            while True:
                with self._lock:
                    if not self._listeners:
                        own, self._wake = self._wake, None
                        if own is not None:
                            own.close()
                        return
                    current = dict(self._listeners)
                for listener in [s for s in watched if s not in current]:
                    with contextlib.suppress(KeyError, ValueError):
                        watch.unregister(listener)
                    del watched[listener]
                for listener, on_accept in current.items():
                    if listener not in watched:
                        try:
                            watch.register(listener, selectors.EVENT_READ)
                        except (OSError, ValueError):  # closed meanwhile
                            continue
                        watched[listener] = on_accept
                for key, _ in watch.select():
                    if key.fileobj is wake:
                        with contextlib.suppress(OSError):
                            wake.recv(4096)
                        continue
                    ready = key.fileobj
                    if isinstance(ready, socket.socket):
                        self._accept_all(ready, watched.get(ready))
        finally:
            watch.close()
            wake.close()

    @staticmethod
    def _accept_all(
        listener: socket.socket, on_accept: Callable[[socket.socket], None] | None
    ) -> None:
        while on_accept is not None:
            try:
                client, _ = listener.accept()
            except OSError:  # nothing more to accept (or the listener closed meanwhile)
                return
            try:
                on_accept(client)
            except Exception as exc:  # e.g. no thread to spare: this connection is refused
                logger.warning("forwarded connection dropped: %s", exc)
                client.close()


class _Keeper:
    """One thread for all tunnels of this process; it exits when no tunnel is open."""

    def __init__(self) -> None:
        self._tunnels: set[Tunnel] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, tunnel: Tunnel) -> None:
        with self._lock:
            self._tunnels.add(tunnel)
            if self._thread is None or not self._thread.is_alive():
                self._wake.clear()
                self._thread = threading.Thread(
                    target=self._run, name="lct-tunnel-keeper", daemon=True
                )
                self._thread.start()

    def remove(self, tunnel: Tunnel) -> None:
        with self._lock:
            self._tunnels.discard(tunnel)
            if not self._tunnels:
                self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(KEEPER_INTERVAL)
            with self._lock:
                tunnels = list(self._tunnels)
                if not tunnels:
                    self._thread = None
                    return
                self._wake.clear()
            for tunnel in tunnels:
                if tunnel.closed or tunnel.is_active:
                    continue
                try:
                    tunnel.check()
                except TunnelError as exc:
                    logger.warning("%s", exc)


_acceptor = _Acceptor()
_keeper = _Keeper()
