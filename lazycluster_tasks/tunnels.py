"""SSH port forwards as values you own: list them, check them, close them.

* :class:`LocalForward` (``ssh -L``): our ``127.0.0.1:local_port`` -> the host's
  ``127.0.0.1:remote_port``: sshtunnel's listener and handlers, carried by the runtime's own
  (already authenticated, host-key-verified) transport.
* :class:`RemoteForward` (``ssh -R``): the host's ``127.0.0.1:remote_port`` -> our
  ``127.0.0.1:local_port``, over the runtime's own paramiko transport.

Both ends bind 127.0.0.1. One SSH connection per runtime carries all its tunnels; no process
and no sleeping thread per tunnel: one keeper thread per Python process watches every open tunnel
and re-establishes those a dropped connection broke.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
from typing import Any

import paramiko
import sshtunnel

from lazycluster_tasks.errors import TunnelError
from lazycluster_tasks.ssh import SSHConnection

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CHUNK = 2**18
KEEPER_INTERVAL = 1.0
#: Connections a -L listener queues before accepting them (many workers connect at once).
BACKLOG = 256


class _Chatter(logging.Logger):
    """sshtunnel's logger: its INFO lines (one per tunnel opened, connected, released) are
    debug detail here — the cluster logs one line per host event itself."""

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)


#: Given to sshtunnel so that it does not attach console handlers to its and paramiko's loggers.
_SSHTUNNEL_LOGGER = _Chatter("lazycluster_tasks.tunnels.sshtunnel")
_SSHTUNNEL_LOGGER.parent = logger


def pump(chan: paramiko.Channel, sock: socket.socket) -> None:
    """Copy bytes both ways between a channel and a socket until both directions ended.

    An end-of-file on one side is passed on as a half-close, so request/response protocols
    that shut down their sending side still get the answer.
    """
    chan.settimeout(None)
    open_ends: list[Any] = [sock, chan]
    watch = selectors.DefaultSelector()  # epoll: no descriptor limit, unlike select()
    for end in open_ends:
        watch.register(end, selectors.EVENT_READ)
    try:
        while open_ends:
            readable = [key.fileobj for key, _ in watch.select(5)]
            if sock in readable:
                data = sock.recv(CHUNK)
                if data:
                    chan.sendall(data)
                else:
                    chan.shutdown_write()
                    open_ends.remove(sock)
                    watch.unregister(sock)
            if chan in readable:
                data = chan.recv(CHUNK)
                if data:
                    sock.sendall(data)
                else:
                    sock.shutdown(socket.SHUT_WR)
                    open_ends.remove(chan)
                    watch.unregister(chan)
            transport = chan.get_transport()
            if not readable and (chan.closed or transport is None or not transport.is_active()):
                break
    except OSError:
        pass
    finally:
        watch.close()
        chan.close()
        with contextlib.suppress(OSError):
            sock.close()


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

    @property
    def is_active(self) -> bool:
        raise NotImplementedError

    def _reopen(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def check(self) -> bool:
        """True when the tunnel works; a broken one is re-established (TunnelError if it can't)."""
        if self.closed:
            return False
        if self.is_active:
            return True
        logger.info("tunnel %s is down; re-establishing", self)
        try:
            self._reopen()
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


class _SharedForwarder(sshtunnel.SSHTunnelForwarder):
    """sshtunnel's local listener and handlers, carried by the runtime's own SSH transport.

    No second connection (and handshake) per tunnel: the runtime's transport is already
    authenticated and its host key verified, so gateway login and auth are skipped, and stopping
    the tunnel stops its listener but never closes the shared transport.
    """

    def __init__(self, connection: SSHConnection, **kwargs: Any) -> None:
        self._lct_connection = connection
        super().__init__(**kwargs)

    @staticmethod
    def _consolidate_auth(*args: Any, **kwargs: Any) -> tuple[None, list[Any]]:
        return None, []  # authentication happened on the runtime's connection

    def _connect_to_gateway(self) -> None:
        self._transport = self._lct_connection.transport()

    def _stop_transport(self, force: bool = False) -> None:
        for server in self._server_list:
            server.shutdown()
            server.server_close()
        self.is_alive = False

    def __del__(self) -> None:
        pass  # LocalForward.close() stops it; the shared transport is not ours to close

    def _make_ssh_forward_server_class(self, remote_address_: Any) -> Any:
        base = super()._make_ssh_forward_server_class(remote_address_)

        class Server(base):  # type: ignore[misc, valid-type]
            request_queue_size = BACKLOG  # socketserver's 5 turns a burst into SYN retries

        return Server

    def _make_ssh_forward_handler_class(self, remote_address_: Any) -> Any:
        base = super()._make_ssh_forward_handler_class(remote_address_)

        class Handler(base):  # type: ignore[misc, valid-type]
            def _redirect(self, chan: paramiko.Channel) -> None:
                sock = self.request
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                pump(chan, sock)

        return Handler


class LocalForward(Tunnel):
    """``ssh -L 127.0.0.1:local_port:127.0.0.1:remote_port host`` (0 = any free local port)."""

    kind = "-L"

    def __init__(self, connection: SSHConnection, remote_port: int, local_port: int = 0) -> None:
        super().__init__(connection, local_port, remote_port)
        self._forwarder: _SharedForwarder | None = None
        self._open()
        connection.on_reconnect(self._on_reconnect)
        _keeper.add(self)

    def _open(self) -> None:
        s = self.connection.settings
        try:
            forwarder = _SharedForwarder(
                self.connection,
                ssh_address_or_host=(s.hostname, s.port),
                ssh_config_file=None,  # already resolved by the runtime
                allow_agent=False,
                host_pkey_directories=[],
                local_bind_address=(LOOPBACK, self.local_port),
                remote_bind_address=(LOOPBACK, self.remote_port),
                mute_exceptions=False,
                logger=_SSHTUNNEL_LOGGER,
            )
            forwarder.start()
        except Exception as exc:
            raise TunnelError(
                f"cannot forward 127.0.0.1:{self.local_port or '*'} to "
                f"{self.host}:127.0.0.1:{self.remote_port}: {exc}"
            ) from exc
        self._forwarder = forwarder
        self.local_port = int(forwarder.local_bind_port)  # the same port on every reopen

    @property
    def is_active(self) -> bool:
        f = self._forwarder
        return bool(f is not None and not self.closed and f.is_active and f.is_alive)

    def _on_reconnect(self, transport: paramiko.Transport) -> None:
        self._stop()  # its handlers hold the dead transport
        try:
            self._open()
            self.last_error = None
        except TunnelError as exc:
            self.last_error = str(exc)
            logger.warning("%s", exc)

    def _reopen(self) -> None:
        self.connection.transport()  # reconnecting reopens it through _on_reconnect
        if not self.is_active:
            self._stop()
            self._open()

    def _stop(self) -> None:
        if self._forwarder is not None:
            with contextlib.suppress(Exception):
                self._forwarder.stop()
            self._forwarder = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        _keeper.remove(self)
        self.connection.remove_on_reconnect(self._on_reconnect)
        self._stop()


class RemoteForward(Tunnel):
    """``ssh -R 127.0.0.1:remote_port:127.0.0.1:local_port host`` (0 = a port the host picks)."""

    kind = "-R"

    def __init__(self, connection: SSHConnection, local_port: int, remote_port: int = 0) -> None:
        super().__init__(connection, local_port, remote_port)
        self._transport: paramiko.Transport | None = None
        self._channels: set[paramiko.Channel] = set()
        self._lock = threading.Lock()
        self._open()
        connection.on_reconnect(self._on_reconnect)
        _keeper.add(self)

    def _open(self, transport: paramiko.Transport | None = None) -> None:
        transport = transport or self.connection.transport()
        dispatcher = _Dispatcher.of(transport)
        try:
            port = transport.request_port_forward(LOOPBACK, self.remote_port, dispatcher)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise TunnelError(
                f"{self.host} refused to forward its 127.0.0.1:{self.remote_port or '*'} to our "
                f"127.0.0.1:{self.local_port} (port taken there?): {exc}"
            ) from exc
        self.remote_port = int(port)
        dispatcher.routes[self.remote_port] = self
        self._transport = transport

    def _on_reconnect(self, transport: paramiko.Transport) -> None:
        try:
            self._open(transport)
            self.last_error = None
        except TunnelError as exc:
            self.last_error = str(exc)
            logger.warning("%s", exc)

    @property
    def is_active(self) -> bool:
        t = self._transport
        return bool(
            not self.closed
            and t is not None
            and t.is_active()
            and _Dispatcher.of(t).routes.get(self.remote_port) is self
        )

    def _reopen(self) -> None:
        self.connection.transport()  # reconnecting calls _on_reconnect
        if not self.is_active:
            self._open()

    def _accept(self, chan: paramiko.Channel) -> None:
        try:
            sock = socket.create_connection((LOOPBACK, self.local_port), timeout=10)
        except OSError as exc:
            logger.info("%s: nothing answers on 127.0.0.1:%s: %s", self, self.local_port, exc)
            chan.close()
            return
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._channels.add(chan)
        try:
            pump(chan, sock)
        finally:
            with self._lock:
                self._channels.discard(chan)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        _keeper.remove(self)
        self.connection.remove_on_reconnect(self._on_reconnect)
        t = self._transport
        if t is not None:
            _Dispatcher.of(t).routes.pop(self.remote_port, None)
            if t.is_active():
                # not t.cancel_port_forward(): it also drops the transport's handler of
                # incoming channels, so every other -R forward on that host would be refused
                with contextlib.suppress(Exception):
                    t.global_request("cancel-tcpip-forward", (LOOPBACK, self.remote_port))
        with self._lock:
            channels = list(self._channels)
        for chan in channels:
            chan.close()


class _Dispatcher:
    """paramiko keeps one handler per transport: route incoming channels by their port."""

    def __init__(self) -> None:
        self.routes: dict[int, RemoteForward] = {}

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
            chan.close()
            return
        threading.Thread(
            target=forward._accept, args=(chan,), name=f"lct-fwd-{server[1]}", daemon=True
        ).start()


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


_keeper = _Keeper()
