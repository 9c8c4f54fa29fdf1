"""SSH port forwards as values you own: list them, check them, close them.

* :class:`LocalForward` (``ssh -L``): our ``127.0.0.1:local_port`` -> the host's
  ``127.0.0.1:remote_port``: a listener here; each connection opens a channel on the runtime's
  own (already authenticated, host-key-verified) transport.
* :class:`RemoteForward` (``ssh -R``): the host's ``127.0.0.1:remote_port`` -> our
  ``127.0.0.1:local_port``, over the runtime's own paramiko transport.

Both ends bind 127.0.0.1. One SSH connection per runtime carries all its tunnels, and one relay
loop (:mod:`lazycluster_tasks.relay`) carries the bytes of every forwarded connection: no process
and no thread per tunnel or per connection. One keeper thread per Python process watches every
open tunnel and re-establishes those a dropped connection broke.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from typing import Any

import paramiko

from lazycluster_tasks.errors import TunnelError
from lazycluster_tasks.relay import RELAY
from lazycluster_tasks.ssh import SSHConnection

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
KEEPER_INTERVAL = 1.0
#: Seconds to open a forwarded connection (a channel there, or our local port).
OPEN_TIMEOUT = 10.0
#: Threads that open channels for new -L connections at once.
OPENERS = 8


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


class LocalForward(Tunnel):
    """``ssh -L 127.0.0.1:local_port:127.0.0.1:remote_port host`` (0 = any free local port)."""

    kind = "-L"

    def __init__(self, connection: SSHConnection, remote_port: int, local_port: int = 0) -> None:
        super().__init__(connection, local_port, remote_port)
        self._server: socket.socket | None = None
        self._channels: set[paramiko.Channel] = set()
        self._lock = threading.Lock()
        self._open()
        _keeper.add(self)

    def _open(self) -> None:
        try:
            server = socket.create_server((LOOPBACK, self.local_port), backlog=128)
        except OSError as exc:
            raise TunnelError(
                f"cannot forward 127.0.0.1:{self.local_port or '*'} to "
                f"{self.host}:127.0.0.1:{self.remote_port}: {exc}"
            ) from exc
        self.local_port = int(server.getsockname()[1])  # the same port on every reopen
        self._server = server
        RELAY.listen(server, self._accepted)

    def _accepted(self, conn: socket.socket) -> None:
        """(relay loop) Opening a channel waits for the host: done by the openers."""
        _openers.submit(lambda: self._connect(conn))

    def _connect(self, conn: socket.socket) -> None:
        try:
            chan = self.connection.transport().open_channel(
                "direct-tcpip",
                (LOOPBACK, self.remote_port),
                conn.getpeername(),
                timeout=OPEN_TIMEOUT,
            )
        except Exception as exc:
            logger.info("%s: cannot reach 127.0.0.1:%s there: %s", self, self.remote_port, exc)
            conn.close()
            return
        with self._lock:
            if self.closed:
                chan.close()
                conn.close()
                return
            self._channels.add(chan)
        RELAY.add(chan, conn, lambda: self._discard(chan))

    def _discard(self, chan: paramiko.Channel) -> None:
        with self._lock:
            self._channels.discard(chan)

    @property
    def is_active(self) -> bool:
        return bool(not self.closed and self._server is not None and self.connection.is_connected)

    def _reopen(self) -> None:
        self.connection.transport()  # new connections use the new transport
        if self._server is None:
            self._open()

    def close(self) -> None:
        if self.closed:
            return
        with self._lock:
            self.closed = True
            channels = list(self._channels)
        _keeper.remove(self)
        if self._server is not None:
            RELAY.unlisten(self._server)
            self._server = None
        for chan in channels:
            chan.close()


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
        """(paramiko's transport thread) Connect to our local port and hand both to the relay;
        a local connect is answered at once (accepted or refused)."""
        try:
            sock = socket.create_connection((LOOPBACK, self.local_port), timeout=OPEN_TIMEOUT)
        except OSError as exc:
            logger.info("%s: nothing answers on 127.0.0.1:%s: %s", self, self.local_port, exc)
            chan.close()
            return
        with self._lock:
            self._channels.add(chan)
        RELAY.add(chan, sock, lambda: self._discard(chan))

    def _discard(self, chan: paramiko.Channel) -> None:
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
                with contextlib.suppress(Exception):
                    t.cancel_port_forward(LOOPBACK, self.remote_port)
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
        forward._accept(chan)


class _Openers:
    """At most OPENERS threads open channels for new -L connections (a burst of connections
    does not become a burst of threads); they exit when nothing waits."""

    def __init__(self) -> None:
        self._jobs: list[Any] = []
        self._lock = threading.Lock()
        self._threads = 0

    def submit(self, job: Any) -> None:
        with self._lock:
            self._jobs.append(job)
            if self._threads >= OPENERS:
                return
            self._threads += 1
        threading.Thread(target=self._run, name="lct-open", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._threads -= 1
                    return
                job = self._jobs.pop(0)
            try:
                job()
            except Exception:
                logger.exception("opening a forwarded connection failed")


_openers = _Openers()


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
