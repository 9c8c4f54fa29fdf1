"""One paramiko connection per host: OpenSSH config, keys, known_hosts, jump hosts, run, SFTP.

paramiko does not read ``~/.ssh/config`` by itself; :func:`resolve_settings` does, and
``connection_kwargs`` override what it finds. The connection opens lazily, is shared by every
command, transfer and tunnel of a runtime, and reopens transparently after a drop.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import paramiko

from lazycluster_tasks.connection import Connection, _Collector
from lazycluster_tasks.errors import (
    AuthenticationError,
    HostConnectionError,
    HostKeyError,
    InvalidRuntimeError,
)

logger = logging.getLogger(__name__)

DEFAULT_SSH_CONFIG = "~/.ssh/config"
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
DEFAULT_CONNECT_TIMEOUT = 10.0
KEEPALIVE_SECONDS = 15
HOST_KEY_POLICIES = ("reject", "auto-add")

#: connection_kwargs we understand; anything else is a mistake worth naming.
CONNECTION_KWARGS = frozenset(
    {
        "hostname",
        "port",
        "username",
        "user",
        "key_filename",
        "password",
        "passphrase",
        "private_key",
        "connect_timeout",
        "timeout",
        "known_hosts",
        "host_key_policy",
        "proxy_jump",
        "allow_agent",
        "look_for_keys",
    }
)


@dataclass(frozen=True)
class SSHSettings:
    """Everything needed to open a connection to one host."""

    alias: str
    hostname: str
    port: int = 22
    username: str | None = None
    key_filenames: tuple[str, ...] = ()
    password: str | None = field(default=None, repr=False)
    passphrase: str | None = field(default=None, repr=False)
    private_key: str | None = field(default=None, repr=False)  # key text (e.g. from a Block)
    proxy_jump: str | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    known_hosts: tuple[str, ...] = ()
    host_key_policy: str = "reject"
    allow_agent: bool = True
    look_for_keys: bool = True
    ssh_config_path: str | None = None


def _load_config(path: str | None) -> paramiko.SSHConfig | None:
    expanded = os.path.expanduser(path or DEFAULT_SSH_CONFIG)
    if not os.path.exists(expanded):
        if path is not None:
            raise ValueError(f"ssh config file not found: {path!r}")
        return None
    return paramiko.SSHConfig.from_path(expanded)


def resolve_settings(
    alias: str,
    ssh_config_path: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SSHSettings:
    """Resolve ``alias`` through the OpenSSH config, then apply ``connection_kwargs``."""
    if not isinstance(alias, str) or not alias.strip() or any(c.isspace() for c in alias):
        raise ValueError(f"invalid host name: {alias!r}")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - CONNECTION_KWARGS)
    if unknown:
        raise ValueError(
            f"unknown connection_kwargs for {alias!r}: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(CONNECTION_KWARGS))})"
        )
    config = _load_config(ssh_config_path)
    entry: dict[str, Any] = dict(config.lookup(alias)) if config else {"hostname": alias}

    known = entry.get("userknownhostsfile", DEFAULT_KNOWN_HOSTS)
    strict = str(entry.get("stricthostkeychecking", "yes")).lower()
    identities_only = str(entry.get("identitiesonly", "no")).lower() == "yes"
    settings = SSHSettings(
        alias=alias,
        hostname=entry.get("hostname", alias),
        port=int(entry.get("port", 22)),
        username=entry.get("user"),
        key_filenames=tuple(os.path.expanduser(k) for k in entry.get("identityfile", [])),
        proxy_jump=entry.get("proxyjump") if entry.get("proxyjump", "none") != "none" else None,
        connect_timeout=float(entry.get("connecttimeout", DEFAULT_CONNECT_TIMEOUT)),
        known_hosts=tuple(os.path.expanduser(p) for p in str(known).split()),
        host_key_policy="auto-add" if strict in ("no", "off", "accept-new") else "reject",
        allow_agent=not identities_only,
        look_for_keys=not identities_only,
        ssh_config_path=ssh_config_path,
    )
    return _apply_overrides(settings, overrides)


def _apply_overrides(settings: SSHSettings, kw: dict[str, Any]) -> SSHSettings:
    changes: dict[str, Any] = {}
    for key in (
        "hostname",
        "password",
        "passphrase",
        "private_key",
        "proxy_jump",
        "allow_agent",
        "look_for_keys",
    ):
        if key in kw:
            changes[key] = kw[key]
    if "port" in kw:
        changes["port"] = int(kw["port"])
    if "username" in kw or "user" in kw:
        changes["username"] = kw.get("username", kw.get("user"))
    if "private_key" in kw and "key_filename" not in kw:
        changes["key_filenames"] = ()  # an explicit key replaces the config's IdentityFile
    if "key_filename" in kw:
        keys = kw["key_filename"]
        keys = [keys] if isinstance(keys, (str, os.PathLike)) else list(keys)
        changes["key_filenames"] = tuple(os.path.expanduser(str(k)) for k in keys)
    if "connect_timeout" in kw or "timeout" in kw:
        changes["connect_timeout"] = float(kw.get("connect_timeout", kw.get("timeout", 0)))
    if "known_hosts" in kw:
        files = kw["known_hosts"]
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        changes["known_hosts"] = tuple(os.path.expanduser(str(f)) for f in files)
    if "host_key_policy" in kw:
        policy = kw["host_key_policy"]
        if policy not in HOST_KEY_POLICIES:
            raise ValueError(f"host_key_policy must be one of {HOST_KEY_POLICIES}, not {policy!r}")
        changes["host_key_policy"] = policy
    if changes.get("port", settings.port) <= 0 or changes.get("port", settings.port) > 65535:
        raise ValueError(f"invalid port for {settings.alias!r}: {changes.get('port')}")
    return replace(settings, **changes)


def _parse_jump(spec: str) -> tuple[str, str | None, int | None]:
    """``[user@]host[:port]`` -> (host, user, port)."""
    user = None
    if "@" in spec:
        user, spec = spec.rsplit("@", 1)
    port = None
    if spec.startswith("["):  # [ipv6]:port
        host, _, rest = spec[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else None
    elif spec.count(":") == 1:
        host, port_text = spec.split(":")
        port = int(port_text)
    else:
        host = spec
    return host, user, port


def jump_settings(settings: SSHSettings) -> list[SSHSettings]:
    """The chain of jump hosts (first hop first) for ``settings.proxy_jump``."""
    if not settings.proxy_jump:
        return []
    hops = []
    for spec in settings.proxy_jump.split(","):
        host, user, port = _parse_jump(spec.strip())
        hop = resolve_settings(host, settings.ssh_config_path)
        overrides: dict[str, Any] = {}
        if user:
            overrides["username"] = user
        if port:
            overrides["port"] = port
        hops.append(replace(_apply_overrides(hop, overrides), proxy_jump=None))
    return hops


def load_private_key(text: str, passphrase: str | None, host: str) -> paramiko.PKey:
    """A private key from its text (OpenSSH or PEM; ed25519, ECDSA or RSA)."""
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text), passphrase)
        except paramiko.PasswordRequiredException:
            raise AuthenticationError(
                f"the private key for {host} is encrypted and needs a passphrase", host=host
            ) from None
        except (paramiko.SSHException, ValueError):
            continue
    hint = " (wrong passphrase?)" if passphrase else ""
    raise AuthenticationError(f"the private key given for {host} cannot be read{hint}", host=host)


#: Window and packet size of every channel: paramiko's defaults (2 MiB, 32 KiB) cap tunnels.
WINDOW_SIZE = 16 * 2**20
MAX_PACKET_SIZE = 2**17  # paramiko clamps this to what the server accepts
#: AES-GCM is one pass instead of cipher + MAC: prefer it where the server offers it.
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


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
    for path in settings.known_hosts:
        if os.path.exists(path):
            client.load_host_keys(path)
    if settings.host_key_policy == "auto-add":
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    else:
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    where = f"{settings.alias} ({settings.hostname}:{settings.port})"
    t = settings.connect_timeout
    try:
        client.connect(
            settings.hostname,
            port=settings.port,
            username=settings.username,
            key_filename=list(settings.key_filenames) or None,  # type: ignore[arg-type]
            pkey=load_private_key(settings.private_key, settings.passphrase, settings.alias)
            if settings.private_key
            else None,
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
        if "private key file is encrypted" in text or "passphrase" in text.lower():
            raise AuthenticationError(
                f"private key for {where} needs a passphrase: {text}", host=settings.alias
            ) from None
        raise HostConnectionError(f"SSH to {where} failed: {text}", host=settings.alias) from exc
    except socket.gaierror as exc:
        client.close()
        raise InvalidRuntimeError(
            f"cannot resolve host {where}: {exc}", host=settings.alias
        ) from None
    except (OSError, EOFError) as exc:
        client.close()
        reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        raise HostConnectionError(
            f"cannot connect to {where}: {reason}", host=settings.alias
        ) from exc
    transport = client.get_transport()
    if transport is not None:
        transport.set_keepalive(KEEPALIVE_SECONDS)
        if isinstance(transport.sock, socket.socket):
            # without it, delayed ACKs add ~40 ms to every command round trip
            transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


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

    # -- connection --------------------------------------------------------------------------

    def transport(self) -> paramiko.Transport:
        """The live transport, connecting (or reconnecting after a drop) when needed."""
        with self._lock:
            if self._closed:
                raise HostConnectionError(f"connection to {self.host} is closed", host=self.host)
            transport = self._client.get_transport() if self._client else None
            if transport is not None and transport.is_active():
                return transport
            reconnect = self._client is not None
            self._drop()
            self._client = self._open()
            self.connect_count += 1
            transport = self._client.get_transport()
            assert transport is not None
            if reconnect:
                logger.info("reconnected to %s", self.host)
                for callback in list(self._on_reconnect):
                    callback(transport)
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

    def open_socket(self) -> paramiko.Channel | None:
        """A fresh stream to the host's sshd through the jump host (None: connect directly)."""
        self.transport()
        if not self._jumps:
            return None
        hops = jump_settings(self.settings)
        return self._jump_channel(self._jumps[-1], hops[-1], self.settings)

    def private_keys(self) -> list[paramiko.PKey]:
        """The configured identity files, loaded (for further connections such as tunnels)."""
        keys = []
        if self.settings.private_key:
            keys.append(
                load_private_key(self.settings.private_key, self.settings.passphrase, self.host)
            )
        for path in self.settings.key_filenames:
            if os.path.exists(path):
                try:
                    keys.append(paramiko.PKey.from_path(path, self.settings.passphrase))
                except (paramiko.SSHException, ValueError, OSError) as exc:
                    logger.debug("cannot load key %s: %s", path, exc)
        return keys

    def host_key(self) -> paramiko.PKey:
        """The host's verified key (for further connections to the same host)."""
        return self.transport().get_remote_server_key()

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
                sock = self._jump_channel(client, hop, nxt)
            client = _connect_client(target, sock)
        except BaseException:
            for jump in reversed(jumps):
                jump.close()
            raise
        self._jumps = jumps
        return client

    def _jump_channel(
        self, client: paramiko.SSHClient, hop: SSHSettings, target: SSHSettings
    ) -> paramiko.Channel:
        transport = client.get_transport()
        assert transport is not None
        try:
            return transport.open_channel(
                "direct-tcpip",
                (target.hostname, target.port),
                ("127.0.0.1", 0),
                timeout=target.connect_timeout,
            )
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise HostConnectionError(
                f"jump host {hop.alias} cannot reach {target.alias} "
                f"({target.hostname}:{target.port}): {exc}",
                host=target.alias,
            ) from exc

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
            if self.is_connected:
                self.kill_running()
            self._closed = True
            self._drop()
            self._on_reconnect.clear()

    def open_session(self) -> paramiko.Channel:
        """A new session channel; one reconnect if the connection turned out to be dead."""
        for attempt in (1, 2):
            transport = self.transport()
            try:
                return transport.open_session(timeout=self.settings.connect_timeout)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                if attempt == 2 or transport.is_active():
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
        stdin: bytes | None,
    ) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        chan = self.open_session()
        try:
            if stderr is None:
                chan.set_combine_stderr(True)
            chan.exec_command(line)
            if stdin is not None:
                chan.sendall(stdin)
                chan.shutdown_write()
            if not self._read(chan, chan.recv, stdout, deadline):
                return None
            if stderr is not None and not self._read(chan, chan.recv_stderr, stderr, deadline):
                return None
            while not chan.status_event.wait(0.5):
                if not chan.get_transport().is_active():
                    raise HostConnectionError(
                        f"connection to {self.host} dropped while a command ran", host=self.host
                    )
                if deadline is not None and time.monotonic() > deadline:
                    return None
            return chan.recv_exit_status()
        finally:
            chan.close()

    def _read(
        self,
        chan: paramiko.Channel,
        recv: Callable[[int], bytes],
        collector: _Collector,
        deadline: float | None,
    ) -> bool:
        """Read one stream to its end; False when the deadline passed first."""
        while True:
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
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
            collector.feed(data)

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
