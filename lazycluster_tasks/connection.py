"""What every connection to a host offers, and the one ``run`` that executes commands on it.

Two implementations: :class:`~lazycluster_tasks.ssh.SSHConnection` (paramiko) and
:class:`~lazycluster_tasks.local.LocalConnection` (subprocess). Both get the same wrapped shell line
from :func:`lazycluster_tasks.commands.wrap_command`, so a command behaves the same everywhere, and
both can kill a running command's whole process group (on timeout or cleanup).
"""

from __future__ import annotations

import codecs
import logging
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from lazycluster_tasks import commands
from lazycluster_tasks.errors import HostConnectionError, OperationTimeoutError, TaskExecutionError

#: What a command reads on its stdin: bytes, or a stream read to its end (a large file).
Input = bytes | BinaryIO
#: Bytes a stream on stdin is sent in at a time.
STDIN_CHUNK = 2**18


def chunks(stdin: Input) -> Iterator[bytes]:
    """The input in pieces to send."""
    if isinstance(stdin, bytes):
        yield stdin
        return
    while block := stdin.read(STDIN_CHUNK):
        yield block


logger = logging.getLogger(__name__)

OutputCallback = Callable[[str], None]

#: Timeout for our own short commands (probes, mkdir, kill): they should take milliseconds.
INTERNAL_TIMEOUT = 30.0
#: How much output an error message or log tail carries.
TAIL_CHARS = 2000


@dataclass(frozen=True)
class CommandResult:
    command: str
    exit_code: int
    stdout: str
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def tail(text: str, limit: int = TAIL_CHARS) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]


class _Collector:
    """Collects a byte stream: takes the pid line off the front, decodes, hands out whole lines."""

    def __init__(
        self, on_output: OutputCallback | None, on_pid: Callable[[int], None] | None = None
    ) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._on_output = on_output
        self._on_pid = on_pid
        self._expect_pid = on_pid is not None
        self._head = ""
        self._partial = ""
        self.parts: list[str] = []

    def feed(self, data: bytes, final: bool = False) -> None:
        text = self._decoder.decode(data, final)
        if self._expect_pid:
            self._head += text
            if "\n" not in self._head and not final:
                return
            head, self._head, self._expect_pid = self._head, "", False
            first, _, rest = head.partition("\n")
            if first.strip().isdigit() and self._on_pid is not None:
                self._on_pid(int(first))
                text = rest
            else:
                text = head
        if not text and not final:
            return
        self.parts.append(text)
        if self._on_output is not None:
            lines = (self._partial + text).split("\n")
            self._partial = lines.pop()
            for line in lines:
                self._on_output(line)
            if final and self._partial:
                self._on_output(self._partial)
                self._partial = ""

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def pid_known(self) -> bool:
        """The pid line came, or none is expected."""
        return not self._expect_pid


class Connection(ABC):
    """A host we can run commands on and copy files to and from."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._running: dict[object, tuple[object, int | None]] = {}  # in flight: (owner, pgid)
        # (owner, pgid) of commands whose connection dropped while they ran: they may still run
        # there; killed with the owner's running commands, over the next connection, where
        # the group's leader still has the tag every command of this connection carries
        self._lost: list[tuple[object, int]] = []
        self._tag = f"lct-run-{secrets.token_hex(6)}"
        self._running_lock = threading.Lock()
        self.commands_run = 0  # round trips made through run(), for observability

    # -- implemented by each kind of connection --------------------------------------------------

    @abstractmethod
    def _execute(
        self,
        line: str,
        timeout: float | None,
        stdout: _Collector,
        stderr: _Collector | None,
        stdin: Input | None,
        stall: float | None = None,
    ) -> int | None:
        """Run ``line`` with ``sh``; feed the collectors; return the exit code, None on timeout
        (or when ``stdin``, then the output, did not move for ``stall`` seconds)."""

    @abstractmethod
    def put(self, local_path: str, remote_path: str) -> None:
        """Copy a local file or folder to the host (parents are created)."""

    @abstractmethod
    def get(self, remote_path: str, local_path: str) -> None:
        """Copy a file or folder from the host (parents are created)."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection; running commands are killed first."""

    @property
    def is_local(self) -> bool:
        return False

    def reopen(self) -> None:  # noqa: B027 - connections that cannot be closed for good keep it
        """Allow use again after :meth:`close`."""

    # -- shared ---------------------------------------------------------------------------------

    def run(
        self,
        command: str,
        *,
        timeout: float | None = INTERNAL_TIMEOUT,
        working_dir: str | None = None,
        env: Mapping[str, object] | None = None,
        on_output: OutputCallback | None = None,
        combine_stderr: bool = False,
        stdin: Input | None = None,
        owner: object = None,
        stall: float | None = None,
    ) -> CommandResult:
        """Run a shell command; the one place commands reach a host.

        On timeout the command's process group is killed and :class:`OperationTimeoutError` is
        raised with the output so far. ``owner`` tags the command for :meth:`kill_running`.
        ``stall``: seconds ``stdin``, and after it the output, may not move before that counts
        as a timeout (a long transfer, or the work after it, on a path that was cut: such a
        command reports progress).
        """
        line = commands.wrap_command(command, working_dir, env, self._tag)
        self.commands_run += 1
        key = object()

        def register(pid: int) -> None:
            with self._running_lock:
                self._running[key] = (owner, pid)

        out = _Collector(on_output, on_pid=register)
        err = None if combine_stderr else _Collector(None)
        with self._running_lock:
            self._running[key] = (owner, None)  # in flight, pid not known yet
        dropped = False
        try:
            code = self._execute(line, timeout, out, err, stdin, stall)
        except HostConnectionError:
            dropped = True
            raise
        finally:
            with self._running_lock:
                pgid = self._running.pop(key, (None, None))[1]
                if dropped and pgid is not None:
                    self._lost.append((owner, pgid))
        if code is None:
            if pgid is not None:
                self.kill_groups([pgid])
            short = command if len(command) <= 160 else f"{command[:120]} …"
            what = f"its timeout of {timeout:g} s" if timeout is not None else "its time"
            if stall is not None:
                what += f", or its input or output did not move for {stall:g} s"
            raise OperationTimeoutError(
                f"command on {self.host} exceeded {what}: {short!r}",
                host=self.host,
                output=tail(out.text + (err.text if err else "")),
            )
        return CommandResult(command, code, out.text, err.text if err else "")

    def running_groups(self, owner: object = None, wait: float = 0.0) -> list[int]:
        """Process groups of the commands in flight (of ``owner``, or all); ``wait`` for those
        just starting to report their pid."""
        deadline = time.monotonic() + wait
        while True:
            with self._running_lock:
                pids = [p for o, p in self._running.values() if owner is None or o is owner]
            if None not in pids or time.monotonic() >= deadline:
                return [p for p in pids if p is not None]
            time.sleep(0.01)

    def kill_groups(self, pgids: list[int], grace: float = 2.0) -> None:
        """TERM, grace, KILL the given process groups on the host."""
        if pgids:
            self._kill(commands.kill_group(pgids, grace), pgids)

    def _kill(self, line: str, pgids: list[int]) -> None:
        """Run a kill ``line`` of ``pgids``; a failure is logged (the host may be gone;
        callers report what is left)."""
        try:
            self._execute(line, INTERNAL_TIMEOUT, _Collector(None), None, None)
        except Exception as exc:
            logger.warning("could not kill process groups %s on %s: %s", pgids, self.host, exc)

    def kill_running(self, owner: object = None) -> None:
        """Kill the commands still running for ``owner`` (default: all of them), and those
        whose connection dropped while they ran (one attempt: a host still cut keeps them)."""
        self.kill_groups(self.running_groups(owner, wait=2.0))
        with self._running_lock:
            lost = [p for o, p in self._lost if owner is None or o is owner]
            self._lost = [(o, p) for o, p in self._lost if p not in lost]
        if lost:  # long ago, maybe: only a leader that still has our tag (a pid is reused)
            self._kill(commands.kill_marked(lost, self._tag), lost)

    def check(self, command: str, timeout: float | None = INTERNAL_TIMEOUT) -> str:
        """Run one of our own commands and return its stdout; raise on a non-zero exit."""
        result = self.run(command, timeout=timeout)
        if not result.ok:
            raise TaskExecutionError(
                f"command failed on {self.host} with exit code {result.exit_code}: {command!r}\n"
                f"{tail(result.output)}",
                host=self.host,
                command=command,
                exit_code=result.exit_code,
                output=tail(result.output),
            )
        return result.stdout

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
