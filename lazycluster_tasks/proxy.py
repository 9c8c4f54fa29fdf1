"""The stream a connection travels through when it does not dial the host itself.

* ProxyCommand: :class:`ProxyCommandSocket` runs the command as OpenSSH runs it
  (``/bin/sh -c 'exec <command>'``, its %-tokens expanded by :func:`proxy_command_line`) and
  reaps it on close.
* ProxyJump: :func:`jump_channel` is a ``direct-tcpip`` channel from one hop to the next.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import tempfile
import threading
import time

import paramiko

from lazycluster_tasks import sshconfig
from lazycluster_tasks.errors import HostConnectionError, InvalidRuntimeError
from lazycluster_tasks.ssh_settings import SSHSettings

#: How long a ProxyCommand gets to exit after SIGTERM before SIGKILL.
PROXY_COMMAND_GRACE = 2.0
#: Characters a %-token may bring into a ProxyCommand (it runs through the shell, as OpenSSH's).
_SAFE_TOKEN = re.compile(r"[\w.:@\[\]%+-]*")


def proxy_command_line(settings: SSHSettings) -> str:
    """``settings.proxy_command`` with ``%h %p %r %n %%`` (and ``~``) expanded."""
    assert settings.proxy_command is not None
    for value in (settings.hostname, settings.username or "", settings.alias):
        if not _SAFE_TOKEN.fullmatch(value):
            raise InvalidRuntimeError(
                f"{value!r} cannot go into the ProxyCommand of {settings.alias}: "
                "it holds shell characters",
                host=settings.alias,
            )
    return sshconfig.expand_tokens(
        settings.proxy_command,
        hostname=settings.hostname,
        port=settings.port,
        username=settings.username,
        alias=settings.alias,
    )


class ProxyCommandSocket(paramiko.ProxyCommand):
    """paramiko's ProxyCommand run like OpenSSH runs it (``/bin/sh -c 'exec <command>'``),
    closed for good: SIGTERM, a bounded wait, SIGKILL, pipes closed, stderr kept for errors."""

    def __init__(self, command_line: str, stall: float | None = None) -> None:
        # no super(): it would start the command
        self.cmd = ["/bin/sh", "-c", f"exec {command_line}"]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            self.cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            bufsize=0,
            start_new_session=True,  # a terminal's ^C must not kill the connection
        )
        self.timeout: float | None = None
        self.stall = stall  # seconds the command may take no input (see send)
        assert self.process.stdin is not None
        os.set_blocking(self.process.stdin.fileno(), False)
        self._close_lock = threading.Lock()
        self._done = False
        self._stderr_text: str | None = None

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes of the command's output; ``b""`` once it has exited, as a socket
        at end of file (paramiko's own read spins on the closed pipe until its timeout)."""
        stdout = self.process.stdout
        assert stdout is not None
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            while True:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([stdout], [], [], wait)
                if ready:
                    return os.read(stdout.fileno(), size)
                if deadline is not None and time.monotonic() >= deadline:
                    break
        except (OSError, ValueError) as exc:
            raise paramiko.ProxyCommandFailure(" ".join(self.cmd), str(exc)) from exc
        raise TimeoutError(f"no output from the ProxyCommand in {self.timeout:g} s")

    def send(self, content: bytes) -> int:  # type: ignore[override]  # paramiko sends bytes
        """What the command takes of ``content`` now, after waiting for it to take any at most
        ``stall`` s: a command that stops reading (its own path cut, unnoticed) then fails
        the connection (paramiko's write would wait for it for good)."""
        stdin = self.process.stdin
        assert stdin is not None
        deadline = None if self.stall is None else time.monotonic() + self.stall
        try:
            while True:
                with contextlib.suppress(BlockingIOError):
                    return os.write(stdin.fileno(), content)
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    raise paramiko.ProxyCommandFailure(
                        " ".join(self.cmd), f"it took no input for {self.stall:g} s"
                    )
                select.select([], [stdin], [], wait)
        except (OSError, ValueError) as exc:
            raise paramiko.ProxyCommandFailure(" ".join(self.cmd), str(exc)) from exc

    def close(self) -> None:
        with self._close_lock:
            if self._done:
                return
            self._done = True
        proc = self.process
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(PROXY_COMMAND_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(PROXY_COMMAND_GRACE)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._stderr_text = self._read_stderr()  # paramiko may close us before we report
        with contextlib.suppress(OSError):
            self._stderr.close()

    @property
    def closed(self) -> bool:
        return self._done or self.process.returncode is not None

    def stderr_tail(self, limit: int = 500, wait: float = 1.0) -> str:
        """What the command wrote to stderr (after up to ``wait`` s for it to exit)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(wait)
        text = self._stderr_text if self._stderr_text is not None else self._read_stderr()
        return text.strip()[-limit:]

    def _read_stderr(self) -> str:
        try:
            self._stderr.seek(0)
            return str(self._stderr.read().decode(errors="replace"))
        except (OSError, ValueError):
            return ""


def jump_channel(
    client: paramiko.SSHClient, hop: SSHSettings, target: SSHSettings
) -> paramiko.Channel:
    """A ``direct-tcpip`` channel from the jump host ``hop`` (connected as ``client``) to
    ``target``'s sshd: the socket the connection to ``target`` travels through."""
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
