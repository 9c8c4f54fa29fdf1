"""A running cluster's entry in this machine's state folder, and the socket other processes of
the same user reach its owner through.

The process that started a cluster (``lazycluster up``, a flow run, a notebook) owns it: its
SSH connections, tunnels, healing. It writes ``<state folder>/<cluster id>/`` (0700):

* ``cluster.json`` — who owns it (pid and start time) and where to connect (scheduler address,
  dashboard, the TLS files below);
* ``tls/`` — the CA and a client certificate and key (0600): what a client needs, nothing a
  scheduler or worker needs;
* ``control.sock`` — one JSON request and one JSON answer per connection (``info``, ``scale``,
  ``adapt``, ``close``); only this user's processes are answered (folder mode and the peer's
  uid, checked).

The owner removes the folder when the cluster closes. A folder whose owner is gone (killed)
is removed by the next :func:`entries` (every attach and every new cluster asks it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from lazycluster_tasks.errors import LazyclusterError
from lazycluster_tasks.security import ClusterTLS
from lazycluster_tasks.settings import settings

logger = logging.getLogger(__name__)

INFO_FILE = "cluster.json"
SOCKET_FILE = "control.sock"
TLS_FOLDER = "tls"
#: Longest request or answer (a JSON document) in bytes.
MAX_MESSAGE = 1 << 20
#: Seconds a request may take, unless the caller gives its own.
REQUEST_TIMEOUT = 60.0
#: Seconds the owner gives a connection to send its request.
READ_TIMEOUT = 10.0


class ControlError(LazyclusterError):
    """A request to a cluster's owner failed (the owner said why, or could not be reached)."""


Handler = Callable[..., Any]


@dataclass(frozen=True)
class Entry:
    """What ``cluster.json`` says about one running cluster."""

    cluster_id: str
    folder: Path
    pid: int
    started: float
    info: dict[str, Any]

    @property
    def alive(self) -> bool:
        """Its owner still runs (the same process: pid and start time)."""
        try:
            proc = psutil.Process(self.pid)
            same = abs(proc.create_time() - self.started) < 0.01
            return same and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def request(self, op: str, timeout: float = REQUEST_TIMEOUT, **args: Any) -> Any:
        """Ask the owner to do ``op``; its answer, or a ControlError saying why not."""
        return request(self.folder / SOCKET_FILE, op, timeout=timeout, **args)


def state_folder() -> Path:
    folder = Path(settings().state_directory)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def entries(prune: bool = True) -> dict[str, Entry]:
    """Running clusters of this user on this machine, by id; folders whose owner is gone are
    removed (with ``prune``), since nothing else would."""
    found: dict[str, Entry] = {}
    for info_file in sorted(state_folder().glob(f"*/{INFO_FILE}")):
        try:
            info = json.loads(info_file.read_text())
            entry = Entry(
                str(info["cluster_id"]),
                info_file.parent,
                int(info["pid"]),
                float(info["started"]),
                info,
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not ours
        if entry.alive:
            found[entry.cluster_id] = entry
        elif prune:
            logger.info("removing %s: its owner (pid %d) is gone", entry.folder, entry.pid)
            shutil.rmtree(entry.folder, ignore_errors=True)
    return found


class Registration:
    """The owner's side: the folder, and a thread that answers requests until :meth:`close`."""

    def __init__(
        self,
        cluster_id: str,
        info: Mapping[str, Any],
        tls: ClusterTLS | None,
        handlers: Mapping[str, Handler],
    ) -> None:
        entries()  # clears what killed owners left
        self.cluster_id = cluster_id
        self.folder = state_folder() / cluster_id
        self._handlers = dict(handlers)
        self._closed = threading.Event()
        self._busy = threading.Event()  # a request is being answered
        self.folder.mkdir(mode=0o700)
        try:
            me = psutil.Process()
            record = {
                **info,
                "cluster_id": cluster_id,
                "pid": me.pid,
                "started": me.create_time(),
                "tls": _write_tls(self.folder, tls) if tls is not None else None,
            }
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with _short(self.folder / SOCKET_FILE) as address:
                self._listener.bind(address)
            os.chmod(self.folder / SOCKET_FILE, 0o600)  # the folder guards it; so does this
            self._listener.listen(8)
            self._listener.settimeout(0.2)
            _write_private(self.folder / INFO_FILE, json.dumps(record, indent=1))
        except BaseException:
            self._remove()
            raise
        self._thread = threading.Thread(
            target=self._serve, name=f"lazycluster-control-{cluster_id}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop answering and remove the folder (idempotent). A request being answered (the
        owner's close asked through the socket) is finished by its thread, not waited for."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._remove()
        if not self._busy.is_set() and threading.current_thread() is not self._thread:
            self._thread.join(5)

    def _remove(self) -> None:
        listener = getattr(self, "_listener", None)
        if listener is not None:
            with contextlib.suppress(OSError):  # wakes the accept() at once (Linux)
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(READ_TIMEOUT)
        try:
            if not _same_user(conn):
                _send(conn, {"ok": False, "error": "not the cluster owner's user"})
                return
            message = _receive(conn)
            op, args = str(message.get("op")), dict(message.get("args") or {})
            handler = self._handlers.get(op)
            if handler is None:
                known = ", ".join(sorted(self._handlers))
                _send(conn, {"ok": False, "error": f"unknown request {op!r} (known: {known})"})
                return
            self._busy.set()
            try:
                result = handler(**args)
            except Exception as exc:
                logger.info("control request %s failed: %s", op, exc)
                _send(conn, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
                return
            finally:
                self._busy.clear()
            _send(conn, {"ok": True, "result": result})
        except (OSError, ValueError) as exc:
            logger.info("control connection dropped: %s", exc)


def request(path: Path, op: str, timeout: float = REQUEST_TIMEOUT, **args: Any) -> Any:
    """One request to the owner listening on ``path``; its result, or a ControlError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            with _short(path) as address:
                conn.connect(address)
            _send(conn, {"op": op, "args": args})
            answer = _receive(conn)
        except TimeoutError:
            what = f"the cluster's owner did not answer {op!r} in {timeout:g} s"
            raise ControlError(what) from None
        except (OSError, ValueError) as exc:
            raise ControlError(f"the cluster's owner could not be asked {op!r}: {exc}") from None
    if not answer.get("ok"):
        raise ControlError(f"{op} refused by the cluster's owner: {answer.get('error')}")
    return answer.get("result")


@contextlib.contextmanager
def _short(path: Path) -> Iterator[str]:
    """``path`` as a socket address: a Unix socket's path has at most 107 bytes, so a longer
    one is reached through its folder's descriptor (``/proc/self/fd/N/name``, Linux)."""
    if len(os.fsencode(path)) < 100 or not os.path.isdir("/proc/self/fd"):
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _send(conn: socket.socket, message: Mapping[str, Any]) -> None:
    data = json.dumps(message).encode()
    conn.sendall(struct.pack("!I", len(data)) + data)


def _receive(conn: socket.socket) -> dict[str, Any]:
    size = struct.unpack("!I", _exactly(conn, 4))[0]
    if size > MAX_MESSAGE:
        raise ValueError(f"a message of {size} bytes (at most {MAX_MESSAGE})")
    message = json.loads(_exactly(conn, size))
    if not isinstance(message, dict):
        raise ValueError("a message that is not a JSON object")
    return message


def _exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ValueError("the connection closed mid-message")
        data += chunk
    return data


def _same_user(conn: socket.socket) -> bool:
    """The peer runs as this process's user (Linux tells; elsewhere the 0700 folder decides)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return True
    creds = conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return bool(uid == os.getuid())


def _write_tls(folder: Path, tls: ClusterTLS) -> dict[str, str]:
    """The client's files (PEM contents written 0600; a user's own paths kept as they are)."""
    target = folder / TLS_FOLDER
    target.mkdir(mode=0o700)
    paths = {}
    for name, value in (("ca", tls.ca), ("cert", tls.client_cert), ("key", tls.client_key)):
        if "-----BEGIN" in value:
            path = target / f"client-{name}.pem"
            _write_private(path, value)
            paths[name] = str(path)
        else:
            paths[name] = value
    return paths


def _write_private(path: Path, text: str) -> None:
    """``text`` at ``path``, mode 0600 from the first byte, replaced in one step."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
