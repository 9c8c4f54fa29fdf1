"""One paramiko connection per host: every line to ``/bin/sh``, run, kill, SFTP.

A connection is opened from :class:`~lazycluster_tasks.ssh_settings.SSHSettings` (resolved from
the OpenSSH config), through a ProxyCommand or jump hosts (:mod:`lazycluster_tasks.proxy`),
checking host keys (:mod:`lazycluster_tasks.host_keys`) and offering our keys and certificates
(:mod:`lazycluster_tasks.ssh_keys`). It opens lazily, is shared by every command, transfer and
tunnel of a runtime, and reopens transparently after a drop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import socket
import stat
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import paramiko

from lazycluster_tasks.connection import Connection, Input, _Collector, chunks
from lazycluster_tasks.errors import (
    AuthenticationError,
    HostConnectionError,
    HostKeyError,
    InvalidRuntimeError,
    OperationTimeoutError,
)
from lazycluster_tasks.host_keys import load_known_hosts, missing_host_key_policy
from lazycluster_tasks.openssh_options import ALIVE
from lazycluster_tasks.proxy import ProxyCommandSocket, jump_channel, proxy_command_line
from lazycluster_tasks.ssh_keys import identities
from lazycluster_tasks.ssh_settings import SSHSettings, jump_settings

logger = logging.getLogger(__name__)


#: Bytes a line keeps as they are when it travels to /bin/sh through any login shell: printable
#: ASCII but what a shell would take for something (quotes, backslash, $, backtick, ! which tcsh
#: expands even in a script); every other byte goes as \0NNN for printf %b to restore.
_PLAIN = frozenset(range(0x20, 0x7F)) - set(b"\\'\"$`!")


def under_sh(line: str) -> str:
    """``line`` run by ``/bin/sh`` whatever the user's login shell is (sshd runs every command
    through it: sh, dash, bash, zsh, tcsh, fish...). The login shell only sees a single-quoted
    word of plain characters, which it passes to sh unchanged; sh restores the line with
    ``printf %b`` and runs it. ``exec`` keeps the pid, so the line's ``$$`` is the session's."""
    encoded = "".join(chr(b) if b in _PLAIN else f"\\0{b:03o}" for b in line.encode())
    return f"""exec /bin/sh -c 'eval "$(printf %b "{encoded}")"'"""


class _HandledRefusals(logging.Filter):
    """paramiko logs every refused channel open at ERROR, yet the caller handles and reports it
    (a session that waits its turn, a forward to a port that is closed): logged at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "open FAILED" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


logging.getLogger("paramiko.transport").addFilter(_HandledRefusals())
# without a handler of the application's, Python's last resort would print paramiko's own
# errors (a banner that never came, with its traceback) on stderr; the caller reports them
logging.getLogger("paramiko").addHandler(logging.NullHandler())

#: Seconds without a byte sent after which a connection is asked whether it is alive.
KEEPALIVE_SECONDS = 15
#: Seconds sent data may stay unacknowledged before the kernel ends the connection
#: (TCP_USER_TIMEOUT, Linux), or a ProxyCommand may take none of it: the bound our OpenSSH
#: connections keep (ServerAlive). Without it a send on a path that was cut, once the socket's
#: buffer is full, waits in paramiko until the kernel gives up (about 15 min; a ProxyCommand's
#: pipe: for good), holding the connection: its keep-alive, every command and the close of the
#: failed start behind it.
UNACKNOWLEDGED_LIMIT = ALIVE[0] * ALIVE[1]
#: Window and packet size of every channel: paramiko's defaults (2 MiB, 32 KiB) cap tunnels.
WINDOW_SIZE = 16 * 2**20
MAX_PACKET_SIZE = 2**17  # paramiko clamps this to what the server accepts
#: AES-GCM is one pass instead of cipher + MAC: prefer it where the server offers it.
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
#: Seconds a refused session is asked for again while sessions of ours are still closing.
CLOSE_LAG = 2.0


def _tuned_transport(sock: Any, **kwargs: Any) -> paramiko.Transport:
    transport = paramiko.Transport(
        sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET_SIZE, **kwargs
    )
    options = transport.get_security_options()
    ciphers = tuple(options.ciphers)
    options.ciphers = tuple(c for c in FAST_CIPHERS if c in ciphers) + tuple(
        c for c in ciphers if c not in FAST_CIPHERS
    )
    return transport


def _connect_client(settings: SSHSettings, sock: Any | None) -> paramiko.SSHClient:
    """Open and authenticate one SSHClient; translate failures into our errors."""
    client = paramiko.SSHClient()
    load_known_hosts(client, settings)
    client.set_missing_host_key_policy(missing_host_key_policy(settings))
    pkey, key_files = identities(settings)
    proxy: ProxyCommandSocket | None = None
    if sock is None and settings.proxy_command:
        proxy = sock = ProxyCommandSocket(proxy_command_line(settings), UNACKNOWLEDGED_LIMIT)
    try:
        return _authenticate(client, settings, sock, pkey, key_files)
    except InvalidRuntimeError as exc:
        if proxy is None:
            raise
        detail = proxy.stderr_tail()
        proxy.close()
        if not detail:
            raise
        raise type(exc)(f"{exc} (ProxyCommand said: {detail})", host=settings.alias) from exc
    except BaseException:
        if proxy is not None:
            proxy.close()
        raise


def _authenticate(
    client: paramiko.SSHClient,
    settings: SSHSettings,
    sock: Any | None,
    pkey: paramiko.PKey | None,
    key_files: list[str],
) -> paramiko.SSHClient:
    where = f"{settings.alias} ({settings.hostname}:{settings.port})"
    t = settings.connect_timeout
    try:
        client.connect(
            settings.hostname,
            port=settings.port,
            username=settings.username,
            key_filename=key_files or None,  # type: ignore[arg-type]
            pkey=pkey,
            password=settings.password,
            passphrase=settings.passphrase,
            timeout=t,
            banner_timeout=t,
            auth_timeout=t,
            channel_timeout=t,
            sock=sock,
            allow_agent=settings.allow_agent,
            look_for_keys=settings.look_for_keys,
            transport_factory=_tuned_transport,
        )
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise HostKeyError(
            f"host key of {where} has CHANGED ({exc.key.get_name()} "
            f"{exc.key.fingerprint}); known_hosts has a different one. Refusing to connect.",
            host=settings.alias,
        ) from None
    except paramiko.AuthenticationException as exc:
        client.close()
        raise AuthenticationError(
            f"authentication to {where} as {settings.username or 'the default user'} failed: {exc}",
            host=settings.alias,
        ) from None
    except paramiko.SSHException as exc:
        client.close()
        text = str(exc)
        if "not found in known_hosts" in text:
            files = ", ".join(settings.known_hosts) or "(none)"
            raise HostKeyError(
                f"host key of {where} is unknown: it is not in {files}. Add it (ssh-keyscan) "
                f"or pass connection_kwargs={{'host_key_policy': 'auto-add'}} to trust it.",
                host=settings.alias,
            ) from None
        if "No authentication methods available" in text:
            raise AuthenticationError(
                f"no key for {where}: no IdentityFile found, no ssh-agent key "
                f"(SSH_AUTH_SOCK), no password",
                host=settings.alias,
            ) from None
        if "private key file is encrypted" in text or "passphrase" in text.lower():
            raise AuthenticationError(
                f"private key for {where} needs a passphrase: {text}", host=settings.alias
            ) from None
        if "protocol banner" in text or "Error reading SSH" in text:
            raise HostConnectionError(
                f"cannot connect to {where}: the port answers but not as an SSH server (or sshd "
                "closed the connection before greeting: MaxStartups, a tcp wrapper)",
                host=settings.alias,
            ) from None
        raise HostConnectionError(f"SSH to {where} failed: {text}", host=settings.alias) from exc
    except socket.gaierror as exc:
        client.close()
        raise InvalidRuntimeError(
            f"cannot resolve host {where}: {exc}", host=settings.alias
        ) from None
    except (OSError, EOFError) as exc:
        client.close()
        raise HostConnectionError(
            f"cannot connect to {where}: {_in_words(exc, settings.connect_timeout)}",
            host=settings.alias,
        ) from None
    transport = client.get_transport()
    if transport is not None:
        _watch_alive(transport, settings.alias)
        if isinstance(transport.sock, socket.socket):
            # without it, delayed ACKs add ~40 ms to every command round trip
            transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                limit = UNACKNOWLEDGED_LIMIT * 1000
                transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, limit)
    return client


def request_lock(transport: paramiko.Transport) -> threading.Lock:
    """The lock a global request to ``transport``'s host is made under: paramiko hands an
    answer to whichever request waits last, so one at a time, or an answer reaches the wrong
    request."""
    with _REQUEST_LOCKS:
        lock = getattr(transport, "_lct_requests", None)
        if lock is None:
            lock = transport._lct_requests = threading.Lock()  # type: ignore[attr-defined]
        return lock


_REQUEST_LOCKS = threading.Lock()


def _watch_alive(transport: paramiko.Transport, host: str) -> None:
    """Once nothing was sent for KEEPALIVE_SECONDS, ask the host for an answer, and drop the
    connection when none comes within UNACKNOWLEDGED_LIMIT, as OpenSSH's ServerAlive does
    (paramiko's own keep-alive asks for none). It bounds what TCP_USER_TIMEOUT cannot: a
    ProxyCommand that never notices a cut and takes our bytes into its own buffers, a command
    waiting for output or for the host's window on a path that was cut."""
    ref = weakref.ref(transport)  # the transport's thread holds the check, not the reverse
    checking = threading.Lock()  # held while a check runs

    def check() -> None:
        try:
            t = ref()
            if t is None:
                return
            requests = request_lock(t)
            if not requests.acquire(blocking=False):
                return  # a forward's request is under way (watched itself)
            try:
                answered = t.completion_event = threading.Event()  # as global_request
                message = paramiko.Message()
                message.add_byte(paramiko.common.cMSG_GLOBAL_REQUEST)
                message.add_string("keepalive@openssh.com")
                message.add_boolean(True)  # an answer wanted: sshd refuses it at once
                t._send_user_message(message)  # type: ignore[attr-defined]
                if not answered.wait(UNACKNOWLEDGED_LIMIT) and t.is_active():
                    logger.warning(
                        "%s did not answer for %g s: connection dropped",
                        host,
                        UNACKNOWLEDGED_LIMIT,
                    )
                    t.close()
            finally:
                requests.release()
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the connection ended: its users are told
        finally:
            checking.release()

    def due(_: object = None) -> None:  # in the transport's own thread: it must not wait
        t = ref()
        if t is not None and t.is_active() and checking.acquire(blocking=False):
            threading.Thread(target=check, name=f"lct-alive-{host}", daemon=True).start()

    transport.packetizer.set_keepalive(KEEPALIVE_SECONDS, due)


def _in_words(exc: BaseException, timeout: float | None) -> str:
    """Why a TCP connection to sshd failed, as a user reads it (never paramiko's own text)."""
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        errors = list(exc.errors.values())
        exc = errors[0] if errors else exc
    number = getattr(exc, "errno", None)
    if isinstance(exc, TimeoutError) or number == errno.ETIMEDOUT:
        wait = f" after {timeout:g} s" if timeout else ""
        return f"timed out{wait} (no answer: a firewall drops the packets, or the host is down)"
    if isinstance(exc, ConnectionRefusedError) or number == errno.ECONNREFUSED:
        return "connection refused (no sshd listens on that port, or a firewall rejects it)"
    if number in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "no route to host (the network or a firewall says it cannot be reached)"
    if isinstance(exc, (ConnectionResetError, EOFError)) or number == errno.ECONNRESET:
        return "the connection was closed at once (sshd refuses this machine, or is not sshd)"
    return str(exc) or type(exc).__name__


def close_channel(chan: paramiko.Channel) -> None:
    """Close ``chan``. A connection gone already is no error: paramiko then fails to send the
    close (EOFError on a dead socket, SSHException once the transport stopped), and whoever
    closes must still release what belongs to the channel (our socket, its pump)."""
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        chan.close()


class SSHConnection(Connection):
    """A lazily opened, shared, self-healing paramiko connection to one host."""

    def __init__(self, settings: SSHSettings) -> None:
        super().__init__(settings.alias)
        self.settings = settings
        self._client: paramiko.SSHClient | None = None
        self._jumps: list[paramiko.SSHClient] = []
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.RLock()
        self._sftp_lock = threading.Lock()
        self._on_reconnect: list[Callable[[paramiko.Transport], None]] = []
        self._closed = False
        self.connect_count = 0
        # session channels our commands hold, and how many ended: a host that refuses one more
        # (sshd's MaxSessions per connection, 10 by default) gets it once one of them ends
        self._sessions = 0
        self._sessions_ended = 0
        self._session_limit: int | None = None  # learnt from the host's first refusal
        self._granted = 0  # sessions of ours the host granted and that have not ended
        self._most_open = 0  # the most it granted at once: its limit is no lower
        self._sessions_cv = threading.Condition()

    # -- connection --------------------------------------------------------------------------

    def transport(self) -> paramiko.Transport:
        """The live transport, connecting (or reconnecting after a drop) when needed."""
        with self._lock:
            if self._closed:
                raise HostConnectionError(f"connection to {self.host} is closed", host=self.host)
            transport = self._client.get_transport() if self._client else None
            if transport is not None and transport.is_active():
                return transport
            reconnect = self.connect_count > 0  # also after a drop and failed attempts
            self._drop()
            self._client = self._open()
            self.connect_count += 1
            transport = self._client.get_transport()
            assert transport is not None
            if reconnect:
                logger.info("reconnected to %s", self.host)
                for callback in list(self._on_reconnect):
                    callback(transport)
            else:
                logger.info("connected to %s (%s)", self.host, self.settings.destination)
            return transport

    def on_reconnect(self, callback: Callable[[paramiko.Transport], None]) -> None:
        """Call ``callback(transport)`` after every reconnect (tunnels re-establish themselves)."""
        self._on_reconnect.append(callback)

    def remove_on_reconnect(self, callback: Callable[[paramiko.Transport], None]) -> None:
        if callback in self._on_reconnect:
            self._on_reconnect.remove(callback)

    @property
    def is_connected(self) -> bool:
        transport = self._client.get_transport() if self._client else None
        return bool(transport and transport.is_active())

    @property
    def local_address(self) -> str | None:
        """Our address as the host sees it (the interface the connection leaves from)."""
        transport = self.transport()
        sock = transport.sock
        if isinstance(sock, socket.socket):
            return str(sock.getsockname()[0])
        return None  # through a jump host

    def _open(self) -> paramiko.SSHClient:
        sock: Any = None
        jumps: list[paramiko.SSHClient] = []
        target = self.settings
        try:
            hops = jump_settings(target)
            for i, hop in enumerate(hops):
                client = _connect_client(hop, sock)
                jumps.append(client)
                nxt = hops[i + 1] if i + 1 < len(hops) else target
                sock = jump_channel(client, hop, nxt)
            client = _connect_client(target, sock)
        except BaseException:
            for jump in reversed(jumps):
                jump.close()
            raise
        self._jumps = jumps
        return client

    def _drop(self) -> None:
        if self._sftp is not None:
            with contextlib.suppress(Exception):
                self._sftp.close()
            self._sftp = None
        if self._client is not None:
            self._client.close()
            self._client = None
        for jump in reversed(self._jumps):
            jump.close()
        self._jumps = []

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self.is_connected or self._lost:  # a dropped command may still run there
                self.kill_running()
            self._closed = True
            self._drop()
            self._on_reconnect.clear()

    def _drop_if_current(self, transport: paramiko.Transport) -> None:
        """Drop the connection if ``transport`` is still its own (a hung or dead one: the next
        use connects anew); a reconnect another thread made meanwhile is kept."""
        with self._lock:
            if self._client is not None and self._client.get_transport() is transport:
                self._drop()

    def reopen(self) -> None:
        """Allow use again after :meth:`close` (the next command connects anew)."""
        with self._lock:
            self._closed = False

    def open_session(self) -> paramiko.Channel:
        """A new session channel; one reconnect if the connection turned out to be dead."""
        for attempt in (1, 2):
            transport = self.transport()
            timeout = self.settings.connect_timeout
            start = time.monotonic()
            try:
                return transport.open_session(timeout=timeout)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                # an open transport whose server did not answer a channel request in time is
                # hung (the path was cut): dropped, so that this attempt or the next use
                # connects anew. A refusal is an answer: the link is fine. (paramiko keeps a
                # refusal's ChannelException per connection, not per request: with requests in
                # flight at once another may take it, and this one gets a bare SSHException.)
                answered = isinstance(exc, paramiko.ChannelException) or (
                    time.monotonic() - start < timeout
                )
                hung = (
                    transport.is_active()
                    and isinstance(exc, paramiko.SSHException)
                    and not answered
                )
                # EOF or a socket error: the connection is gone, even if the transport's thread
                # has not noticed yet (is_active still True right after the server dropped it)
                gone = isinstance(exc, (EOFError, OSError))
                if hung or gone:
                    self._drop_if_current(transport)
                if attempt == 2 or (transport.is_active() and not hung and not gone):
                    raise HostConnectionError(
                        f"cannot open a channel to {self.host}: {exc}", host=self.host
                    ) from exc
                logger.info("connection to %s dropped; reconnecting", self.host)
        raise AssertionError("unreachable")

    # -- commands ---------------------------------------------------------------------------

    def _execute(
        self,
        line: str,
        timeout: float | None,
        stdout: _Collector,
        stderr: _Collector | None,
        stdin: Input | None,
        stall: float | None = None,
    ) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        chan = self._session(deadline)
        try:
            if stderr is None:
                chan.set_combine_stderr(True)
            self._exec(chan, line)
            streamed = stdin is not None and not isinstance(stdin, bytes)
            # a stream's send may block (a path cut): its pid first, to kill the command by
            if streamed and not self._read(chan, chan.recv, stdout, deadline, stall, True):
                return None
            if stdin is not None:
                try:
                    chan.settimeout(None)  # none unless bounded (the pid's read set one)
                    for block in chunks(stdin):
                        if deadline is not None or stall is not None:  # a host that stops
                            left = deadline - time.monotonic() if deadline else float("inf")
                            chan.settimeout(max(0.1, min(left, stall or left)))  # reading
                        chan.sendall(block)
                    chan.shutdown_write()
                except TimeoutError:
                    return None
                except OSError:  # the command exited before reading it: its exit code tells
                    logger.debug("%s: the command did not take its input", self.host)
                except (EOFError, paramiko.SSHException):  # the connection ended under it
                    self._drop_if_current(chan.get_transport())
                    raise HostConnectionError(
                        f"connection to {self.host} dropped while a command's input was sent",
                        host=self.host,
                    ) from None
            if not self._read(chan, chan.recv, stdout, deadline, stall):
                return None
            if stderr is not None and not self._read(
                chan, chan.recv_stderr, stderr, deadline, stall
            ):
                return None
            while not chan.status_event.wait(0.5):
                if not chan.get_transport().is_active():
                    break
                if deadline is not None and time.monotonic() > deadline:
                    return None
            code = chan.exit_status if chan.status_event.is_set() else -1
            if code == -1 and not chan.get_transport().is_active():  # no status: it closed
                raise HostConnectionError(  # the channel (a command killed by a signal: -1)
                    f"connection to {self.host} dropped while a command ran", host=self.host
                )
            return code
        finally:
            close_channel(chan)  # a dropped connection fails the close: the session still ends
            with self._sessions_cv:
                self._sessions -= 1
                self._granted -= 1
                self._sessions_ended += 1
                self._sessions_cv.notify_all()

    def _session(self, deadline: float | None) -> paramiko.Channel:
        """A session channel for a command. When the host refuses one while commands of ours
        hold others (its sshd allows so many sessions per connection: MaxSessions, 10 by
        default), the command waits until one of them ends, within its own timeout; from then
        on no more than that many are asked for at once. A refusal while fewer of ours are
        open than it once granted together comes from sessions of ours it has not finished
        closing (sshd frees them a moment after their close): asked again, for CLOSE_LAG s."""
        lag_until = time.monotonic() + CLOSE_LAG
        while True:
            with self._sessions_cv:
                while self._session_limit is not None and self._sessions >= self._session_limit:
                    self._wait_for_a_session(deadline)
                self._sessions += 1  # counted from the request on: requests go out at once
                ended = self._sessions_ended
            try:
                chan = self.open_session()
            except HostConnectionError as exc:
                with self._sessions_cv:
                    self._sessions -= 1
                    held = self._sessions
                    refused = isinstance(exc.__cause__, paramiko.SSHException) and self.is_connected
                    if refused and held < self._most_open and time.monotonic() < lag_until:
                        self._wait_for_a_session(deadline, at_most=0.05)
                        continue
                    if held == 0 or not refused:
                        raise
                    if self._session_limit is None or held < self._session_limit:
                        logger.info("%s refused a session with %d of ours open", self.host, held)
                        self._session_limit = held
                    while self._sessions_ended == ended and self._sessions:
                        self._wait_for_a_session(deadline)
                continue
            with self._sessions_cv:
                self._granted += 1
                self._most_open = max(self._most_open, self._granted)
            return chan

    def _wait_for_a_session(self, deadline: float | None, at_most: float = 1.0) -> None:
        """(holding the condition) Wait for a session of ours to end, at most ``at_most`` s."""
        left = at_most if deadline is None else min(at_most, deadline - time.monotonic())
        if left <= 0:
            raise OperationTimeoutError(
                f"{self.host} allows no more sessions on one connection (sshd's MaxSessions) "
                f"and none of the {self._sessions} commands running there ended in time",
                host=self.host,
            )
        self._sessions_cv.wait(left)

    def _exec(self, chan: paramiko.Channel, line: str) -> None:
        """Ask the host to run ``line`` on ``chan``, its answer bounded by the connect timeout.

        paramiko's ``exec_command`` waits for the answer without a timeout: a path cut after the
        channel opened would hang the command. This is that request, with the wait bounded."""
        message = paramiko.Message()
        message.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
        message.add_int(chan.remote_chanid)
        message.add_string("exec")
        message.add_boolean(True)
        message.add_string(under_sh(line))
        chan._event_pending()  # type: ignore[attr-defined]  # paramiko internals, stable since 1.x
        transport = chan.get_transport()
        transport._send_user_message(message)  # type: ignore[attr-defined]
        wait = self.settings.connect_timeout
        if not chan.event.wait(wait):  # hung: the next use connects anew
            self._drop_if_current(transport)
            raise HostConnectionError(
                f"{self.host} did not answer a request to run a command within {wait:g} s "
                "(the connection is dropped)",
                host=self.host,
            )
        if chan.event_ready:
            return
        if not transport.is_active():
            raise HostConnectionError(
                f"connection to {self.host} dropped before a command started", host=self.host
            )
        raise HostConnectionError(
            f"{self.host} refused to run a command (its sshd closed the session: it could not "
            "start a process there, or allows no more sessions on one connection)",
            host=self.host,
        )

    def _read(
        self,
        chan: paramiko.Channel,
        recv: Callable[[int], bytes],
        collector: _Collector,
        deadline: float | None,
        stall: float | None = None,
        until_pid: bool = False,
    ) -> bool:
        """Read one stream to its end (``until_pid``: until its pid line came, if it has
        one); False when the deadline passed first, or when nothing came for ``stall`` s (a
        command that reports progress, on a path that was cut)."""
        silent_until = None if stall is None else time.monotonic() + stall
        while not (until_pid and collector.pid_known):
            now = time.monotonic()
            wait = 1.0 if deadline is None else min(1.0, deadline - now)
            if silent_until is not None:
                wait = min(wait, silent_until - now)
            if wait <= 0:
                return False
            chan.settimeout(wait)
            try:
                data = recv(65536)
            except TimeoutError:
                transport = chan.get_transport()
                if transport is None or not transport.is_active():
                    raise HostConnectionError(
                        f"connection to {self.host} dropped while a command ran", host=self.host
                    ) from None
                continue
            if not data:
                collector.feed(b"", final=True)
                return True
            if stall is not None:
                silent_until = time.monotonic() + stall
            collector.feed(data)
        return True

    # -- files ------------------------------------------------------------------------------

    def sftp(self) -> paramiko.SFTPClient:
        with self._sftp_lock:
            transport = self.transport()
            if self._sftp is None or self._sftp.get_channel().get_transport() is not transport:  # type: ignore[union-attr]
                client = paramiko.SFTPClient.from_transport(transport)
                assert client is not None
                client.get_channel().settimeout(max(self.settings.connect_timeout, 30.0))  # type: ignore[union-attr]
                self._sftp = client
            return self._sftp

    def put(self, local_path: str, remote_path: str) -> None:
        if not os.path.exists(local_path):
            raise FileNotFoundError(f"no such local file or folder: {local_path!r}")
        sftp = self.sftp()
        _sftp_makedirs(sftp, posixpath.dirname(remote_path))
        if os.path.isdir(local_path):
            for root, _dirs, files in os.walk(local_path):
                rel = os.path.relpath(root, local_path)
                target = (
                    remote_path if rel == "." else posixpath.join(remote_path, *rel.split(os.sep))
                )
                _sftp_makedirs(sftp, target)
                for name in files:
                    sftp.put(os.path.join(root, name), posixpath.join(target, name))
        else:
            sftp.put(local_path, remote_path)

    def get(self, remote_path: str, local_path: str) -> None:
        sftp = self.sftp()
        try:
            mode = sftp.stat(remote_path).st_mode or 0
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no such file or folder on {self.host}: {remote_path!r}"
            ) from None
        os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
        if stat.S_ISDIR(mode):
            _sftp_get_tree(sftp, remote_path, local_path)
        else:
            sftp.get(remote_path, local_path)


def _sftp_makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    if not path or path in ("/", "."):
        return
    try:
        if stat.S_ISDIR(sftp.stat(path).st_mode or 0):
            return
    except FileNotFoundError:
        pass
    _sftp_makedirs(sftp, posixpath.dirname(path))
    try:
        sftp.mkdir(path)
    except OSError:
        if not stat.S_ISDIR(sftp.stat(path).st_mode or 0):
            raise


def _sftp_get_tree(sftp: paramiko.SFTPClient, remote: str, local: str) -> None:
    os.makedirs(local, exist_ok=True)
    for entry in sftp.listdir_attr(remote):
        source = posixpath.join(remote, entry.filename)
        target = os.path.join(local, entry.filename)
        if stat.S_ISDIR(entry.st_mode or 0):
            _sftp_get_tree(sftp, source, target)
        else:
            sftp.get(source, target)
