"""One event loop relays every forwarded connection of this process.

A forwarded connection is a pair: an SSH channel and a TCP socket on 127.0.0.1. One thread
watches all pairs (and the local listeners of ``-L`` forwards) with a selector (epoll: no file
descriptor limit, unlike ``select()``), reads what is ready without blocking and writes through
per-direction buffers, so a slow reader holds back only its own pair. An end of file is passed on
as a half-close. Idle pairs cost nothing; the thread exits when nothing is left to watch.

paramiko channels have no descriptor that signals room to write: while a channel has bytes
waiting, the loop looks again every ``POLL`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
from collections.abc import Callable
from typing import Any

import paramiko

logger = logging.getLogger(__name__)

CHUNK = 2**18
#: Bytes buffered towards one end before its source is no longer read (back pressure).
HIGH_WATER = 2**22
#: Seconds between looks at channels that had no room (they have no write readiness signal).
POLL = 0.005


class _End:
    """One side of a pair: a socket or a channel, with the bytes waiting to be written to it."""

    def __init__(self, io: Any, is_channel: bool) -> None:
        self.io = io
        self.is_channel = is_channel
        self.out = bytearray()
        self.eof_in = False  # nothing more will be read from it
        self.eof_out = False  # its writing side was shut down
        self.events = 0  # what the selector watches it for now
        self.peer: _End
        self.pair: _Pair

    def read(self) -> bytes | None:
        """Bytes, b"" at end of file, None when nothing is ready."""
        try:
            return bytes(self.io.recv(CHUNK))
        except (TimeoutError, BlockingIOError, InterruptedError):
            return None

    def flush(self) -> None:
        while self.out:
            try:
                sent = self.io.send(self.out)
            except (TimeoutError, BlockingIOError, InterruptedError):
                return
            if not sent:
                return
            del self.out[:sent]
        if self.peer.eof_in and not self.eof_out:
            self.eof_out = True
            if self.is_channel:
                self.io.shutdown_write()
            else:
                with contextlib.suppress(OSError):
                    self.io.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.io.close()


class _Pair:
    def __init__(self, chan: paramiko.Channel, sock: socket.socket, on_close: Callable[[], None]):
        chan.setblocking(False)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.chan, self.sock = _End(chan, True), _End(sock, False)
        self.chan.peer, self.sock.peer = self.sock, self.chan
        self.chan.pair = self.sock.pair = self
        self.on_close = on_close

    @property
    def done(self) -> bool:
        ends = (self.chan, self.sock)
        return all(e.eof_in for e in ends) and not any(e.out for e in ends)


class Relay:
    """The process's relay loop (see the module docstring). ``add`` a channel and a socket to
    join them; ``listen`` a socket to be called back on each accepted connection."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._pairs: set[_Pair] = set()
        self._listeners: dict[socket.socket, Callable[[socket.socket], None]] = {}

    # -- from any thread -------------------------------------------------------------------

    def add(
        self, chan: paramiko.Channel, sock: socket.socket, on_close: Callable[[], None]
    ) -> None:
        """Relay between ``chan`` and ``sock`` until both directions ended; then close both and
        call ``on_close``."""
        self._call(lambda: self._add(_Pair(chan, sock, on_close)))

    def listen(self, server: socket.socket, on_accept: Callable[[socket.socket], None]) -> None:
        """Accept connections on ``server`` and hand each to ``on_accept`` (from the loop: it
        must not block)."""
        self._call(lambda: self._listen(server, on_accept))

    def unlisten(self, server: socket.socket, timeout: float = 5.0) -> None:
        """Stop accepting on ``server`` and close it; returns once it is closed (a connection
        attempt after this is refused)."""
        if threading.current_thread() is self._thread:
            self._unlisten(server)
            return
        done = threading.Event()

        def job() -> None:
            try:
                self._unlisten(server)
            finally:
                done.set()

        self._call(job)
        if not done.wait(timeout):
            server.close()  # the loop is stuck: at least refuse new connections

    @property
    def active(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _call(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._queue.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._selector = selectors.DefaultSelector()
                self._selector.register(self._wake_r, selectors.EVENT_READ)
                self._thread = threading.Thread(target=self._run, name="lct-relay", daemon=True)
                self._thread.start()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        sel = self._selector
        assert sel is not None
        while True:
            with self._lock:
                jobs, self._queue = self._queue, []
                if not jobs and not self._pairs and not self._listeners:
                    sel.close()
                    self._thread = None
                    return
            for job in jobs:
                try:
                    job()
                except Exception:
                    logger.exception("relay: a request failed")
            waiting = any(p.chan.out for p in self._pairs)
            for key, _ in sel.select(POLL if waiting else 1.0):
                target = key.data
                if key.fileobj is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                elif isinstance(target, _End):
                    self._step(target)
                elif key.fileobj in self._listeners:
                    self._accept(key.fileobj)
            for pair in list(self._pairs):  # channels with bytes waiting: is there room now?
                if pair.chan.out:
                    self._step(pair.chan.peer, read=False)

    def _add(self, pair: _Pair) -> None:
        self._pairs.add(pair)
        self._update(pair)

    def _listen(self, server: socket.socket, on_accept: Callable[[socket.socket], None]) -> None:
        server.setblocking(False)
        self._listeners[server] = on_accept
        assert self._selector is not None
        self._selector.register(server, selectors.EVENT_READ)

    def _unlisten(self, server: socket.socket) -> None:
        if self._listeners.pop(server, None) is not None:
            assert self._selector is not None
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(server)
        server.close()

    def _accept(self, server: socket.socket) -> None:
        try:
            conn, _ = server.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            logger.warning("relay: accepting on %s failed: %s", server.getsockname(), exc)
            return
        try:
            self._listeners[server](conn)
        except Exception:
            logger.exception("relay: handling a new connection failed")
            conn.close()

    def _step(self, source: _End, read: bool = True) -> None:
        """Move what ``source`` has to its peer; flush what waits for both."""
        pair = source.pair
        try:
            if read and not source.eof_in and len(source.peer.out) < HIGH_WATER:
                data = source.read()
                if data == b"":
                    source.eof_in = True
                elif data:
                    source.peer.out += data
            source.peer.flush()
            source.flush()
        except Exception as exc:  # a reset, a closed channel: the pair is over
            logger.debug("relay: pair ended: %s", exc)
            self._close(pair)
            return
        if pair.done or (source.is_channel and source.io.closed and not source.peer.out):
            self._close(pair)
        else:
            self._update(pair)

    def _update(self, pair: _Pair) -> None:
        """Watch each end for reading while its peer has room, the socket also for room."""
        sel = self._selector
        assert sel is not None
        for end in (pair.chan, pair.sock):
            events = 0
            if not end.eof_in and len(end.peer.out) < HIGH_WATER:
                events |= selectors.EVENT_READ
            if not end.is_channel and end.out:
                events |= selectors.EVENT_WRITE
            if events == end.events:
                continue  # no system call when nothing changes (the common case)
            try:
                if not end.events:
                    sel.register(end.io, events, end)
                elif events:
                    sel.modify(end.io, events, end)
                else:
                    sel.unregister(end.io)
                end.events = events
            except (KeyError, ValueError, OSError):  # closed underneath us
                self._close(pair)
                return

    def _close(self, pair: _Pair) -> None:
        if pair not in self._pairs:
            return
        self._pairs.discard(pair)
        sel = self._selector
        for end in (pair.chan, pair.sock):
            if sel is not None and end.events:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    sel.unregister(end.io)
                end.events = 0
            end.close()
        try:
            pair.on_close()
        except Exception:
            logger.exception("relay: on_close failed")

    def stats(self) -> tuple[int, int]:
        """(pairs, listeners) being relayed now."""
        return len(self._pairs), len(self._listeners)


#: The relay of this process.
RELAY = Relay()
