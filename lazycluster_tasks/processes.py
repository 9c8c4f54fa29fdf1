"""Long-running processes we own on a runtime: started detached, found by pid file, stopped.

Each process runs in its own session (``setsid``), so its pid is its process-group id and one
``kill -TERM -PGID`` reaches its whole tree (a nanny and its worker, say). Pid files and logs live
in a per-cluster folder under the runtime's working dir, so a cleanup from another Python process
(a crash hook, a teardown flow) finds everything from the folder path alone.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import posixpath
import secrets
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from lazycluster_tasks import commands, hostside, link_commands
from lazycluster_tasks.commands import q
from lazycluster_tasks.connection import tail
from lazycluster_tasks.errors import LazyclusterError, OperationTimeoutError
from lazycluster_tasks.hostside import authorized_keys as host_keys
from lazycluster_tasks.hostside import guard as host_guard
from lazycluster_tasks.hostside import ready as host_ready
from lazycluster_tasks.runtime import Runtime

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 40
#: Seconds a stop waits for the guard's revoke (the edit waits up to 10 s for the file's lock).
GUARD_EDIT_WAIT = 12.0


@dataclass
class ProcessSpec:
    """What to start: a name (unique in the cluster), argv, env and the ports it binds."""

    name: str
    argv: list[str]
    role: str = "worker"
    env: dict[str, str] = field(default_factory=dict)
    ports: list[int] = field(default_factory=list)
    #: shell lines run before it, in the shell that becomes it (see commands.setup_file)
    setup: list[str] = field(default_factory=list)


@dataclass
class ProcessInfo:
    """A started process, as plain data (goes into cluster records)."""

    host: str
    name: str
    role: str
    pid: int
    pid_file: str
    log_file: str
    ports: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def start_processes(
    runtime: Runtime,
    folder: str,
    specs: Sequence[ProcessSpec],
    files: Mapping[str, str | bytes] | None = None,
    guard: Guard | None = None,
) -> list[ProcessInfo]:
    """Start every spec detached on ``runtime`` in one round trip; pids come back in order.

    ``files`` (path under ``folder`` -> content) and each process's environment travel in the
    command's stdin and are written with mode 0600 (folders 0700, processes inherit umask 077):
    no env value or file content is ever part of a command line. ``guard``: the folder's guard
    is started after them, unless one runs there (see hostside.guard)."""
    if not specs:
        return []
    payload: dict[str, str | bytes] = dict(files or {})
    lines = [commands.private_folder(folder)]
    infos = []
    starts = []
    for spec in specs:
        log_file = posixpath.join(folder, f"{spec.name}.log")
        pid_file = posixpath.join(folder, f"{spec.name}.pid")
        env = {**runtime.env_variables, **spec.env}
        env_file = None
        if env:
            env_file = f"{spec.name}.env"
            payload[env_file] = commands.env_file(env)
        setup_file = None
        if spec.setup:
            setup_file = f"{spec.name}.setup"
            payload[setup_file] = commands.setup_file(spec.setup)
        starts.append(
            commands.start_detached(spec.argv, folder, log_file, pid_file, env_file, setup_file)
        )
        infos.append(
            ProcessInfo(runtime.host, spec.name, spec.role, 0, pid_file, log_file, spec.ports)
        )
    if guard is not None:
        payload[hostside.BUNDLE] = hostside.bundle()
        starts.append(commands.ensure_guard(guard.argv(folder), folder))
    if payload:
        lines.append(commands.unpack_stdin(folder))
    result = runtime.connection.run(
        " && ".join(lines + starts), stdin=_archive(payload) if payload else None
    )
    pids = [int(x) for x in result.stdout.split() if x.isdigit()]
    if not result.ok or len(pids) != len(specs):
        raise LazyclusterError(
            f"could not start {', '.join(s.name for s in specs)} on {runtime.host} "
            f"(exit {result.exit_code}): {tail(result.output, 500)}"
        )
    for info, pid in zip(infos, pids, strict=True):
        info.pid = pid
    return infos


def _archive(files: Mapping[str, str | bytes]) -> bytes:
    """A tar of the files: 0600 each, 0700 for the folders in between."""
    outside = [p for p in files if posixpath.isabs(p) or ".." in p.split("/")]
    if outside:
        raise ValueError(f"file outside the cluster folder: {outside[0]!r}")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for folder in sorted({posixpath.dirname(p) for p in files} - {""}):
            entry = tarfile.TarInfo(folder)
            entry.type, entry.mode = tarfile.DIRTYPE, 0o700
            tar.addfile(entry)
        for path, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            entry = tarfile.TarInfo(path)
            entry.size, entry.mode = len(data), 0o600
            tar.addfile(entry, io.BytesIO(data))
    return buffer.getvalue()


def stop_processes(
    runtime: Runtime, infos: Sequence[ProcessInfo], marker: str, grace: float = 2.0
) -> list[int]:
    """Stop the processes (TERM, grace, KILL, verified) in one round trip; return the pgids
    that survived (their pid files are kept)."""
    if not infos:
        return []
    pid_files = [i.pid_file for i in infos]
    return _stop(runtime, commands.stop_pid_files(pid_files, marker, grace), grace)


def kill_now(
    runtime: Runtime, infos: Sequence[ProcessInfo], marker: str, timeout: float = 5.0
) -> None:
    """KILL the processes' groups in one round trip, without waiting for them to end (a stop
    must follow: it verifies)."""
    if infos:
        line = commands.kill_marked([i.pid for i in infos], marker)
        runtime.connection.check(line, timeout=timeout)


def stop_folder(
    runtime: Runtime,
    folder: str,
    grace: float,
    remove: str | None,
    revoke: Revoke | None = None,
    kill_first: Sequence[int] = (),
) -> list[int]:
    """Stop every process whose pid file is in ``folder`` (as stop_processes, found by their
    pid files: those on record and any whose start's answer was lost; the folder's guard too),
    then remove ``remove``; return the pgids that survived. ``revoke``: also remove the
    cluster's lines from the user's authorized_keys (the safe edit, hostside.authorized_keys),
    done by the folder's guard on the stop's TERM, else here, even when one survived; a
    failed edit fails the stop, naming the host and its cause. The cluster's hold on the
    host's environment (named after the folder; see hostside.envs) goes with the folder.
    ``kill_first``: leaders whose groups are KILLed before anything else (workers that would
    otherwise begin a graceful shutdown that outlasts the grace)."""
    release = commands.release_env(posixpath.basename(folder.rstrip("/"))) if remove else ""
    stop = commands.stop_folder(folder, grace, revoke is not None, kill_first)
    answer = None
    if revoke is not None:  # the guard first: it edits while the rest ends (a grace of 0 too)
        ask, answer = _guard_files(folder)
        stop = f"{commands.ask_guard(folder, ask, answer, revoke.marker)}; {stop}"
        # before either: no edit lets lines in any more, and those under way are ended
        edits = host_keys.EDIT_PID.format(pid="*")
        stop = f"{commands.stop_edits(folder, host_keys.STOPPING, edits)}; {stop}"
    return _stop(runtime, stop, grace, remove, revoke, release, answer)


@dataclass(frozen=True)
class Revoke:
    """Which lines a stop removes from authorized_keys, and the interpreter that edits."""

    python: str
    marker: str


@dataclass(frozen=True)
class Guard:
    """How a cluster's folders get their guard (see hostside.guard)."""

    python: str
    key_marker: str = ""
    remove: str = ""  # the working dir made for the cluster ("": the folder alone)

    def argv(self, folder: str) -> list[str]:
        bundle = posixpath.join(folder, hostside.BUNDLE)
        return commands.guard_argv(self.python, folder, bundle, self.key_marker, self.remove)


def revoke(runtime: Runtime, what: Revoke) -> None:
    """Remove ``what``'s lines from the user's authorized_keys on ``runtime`` (the one edit)."""
    _stop(runtime, "true", 0.0, None, what)


def _stop(
    runtime: Runtime,
    stop: str,
    grace: float,
    remove: str | None = None,
    revoke: Revoke | None = None,
    release: str = "",
    answer: str | None = None,
) -> list[int]:
    """One round trip: ``stop``, then ``revoke``'s edit — the folder's guard's when the stop
    asked it and its ``answer`` file came — then the removal of ``remove`` and ``release``."""
    line, stdin = f"{stop}; s=$?", None
    if revoke is not None:  # whatever the stop's outcome
        edit = f"{link_commands.revoke_keys(revoke.python, revoke.marker)} || s=$?"
        stdin = hostside.source("authorized_keys").encode()
        if answer is None:
            line += f"; {edit}"
        else:  # the folder's guard edited on the stop's TERM (its interpreter ran already: a
            # new one costs ~45 ms of CPU per host); the program here only where it did not
            line += (
                f"; {commands.await_guard(GUARD_EDIT_WAIT)}; if [ -s {q(answer)} ]; "
                f"then cat -- {q(answer)}; else {edit}; fi"
            )
    if remove:  # only when every process is gone: a survivor keeps its folder and pid file
        line += f"; [ $s != 0 ] || {commands.remove_tree(remove)} || s=$?"
    if release:  # a survivor is in use anyway; a missing file is no error
        line += f"; {release}"
    result = runtime.connection.run(f"{line}; exit $s", timeout=grace + 30, stdin=stdin)
    if revoke is not None:  # one line per host: the file and each key's comment
        for path, removed, by in _edited(result.stdout):
            named = ", ".join(removed) or revoke.marker
            by = f" (by its {by})" if by else ""
            logger.info("%s: removed %s from %s%s", runtime.host, named, path, by)
    left = [int(x[5:]) for x in result.stdout.split() if x.startswith("left=")]
    if not result.ok and not left:
        why = tail(result.output, 300)
        raise LazyclusterError(f"cleanup on {runtime.host} failed (exit {result.exit_code}): {why}")
    return left


def _guard_files(folder: str) -> tuple[str, str]:
    """Where a stop asks the folder's guard for a revoke, and where its answer comes."""
    return (
        posixpath.join(folder, host_guard.REVOKE_ASK),
        posixpath.join(folder, host_guard.REVOKE_ANSWER),
    )


def _edited(output: str) -> list[tuple[str, list[str], str]]:
    """The files the edit of authorized_keys changed, the comments of the lines it removed and
    the host program that edited when not the edit program itself, from the JSON answers in
    ``output``."""
    found = []
    for line in output.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                answer = json.loads(line)
                if answer["changed"]:
                    removed = [str(c) for c in answer.get("removed", [])]
                    found.append((str(answer["path"]), removed, str(answer.get("by", ""))))
    return found


def alive(
    runtime: Runtime, infos: Sequence[ProcessInfo], timeout: float | None = None
) -> dict[str, bool]:
    """Which of the processes still run (one round trip; a zombie leader counts as gone)."""
    if not infos:
        return {}
    line = commands.leader_states({i.name: i.pid for i in infos})
    out = (
        runtime.connection.check(line)
        if timeout is None
        else runtime.connection.check(line, timeout=timeout)
    )
    states = dict(line.split("=", 1) for line in out.split() if "=" in line)
    return {i.name: states.get(i.name) == "1" for i in infos}


def read_logs(
    runtime: Runtime, infos: Sequence[ProcessInfo], lines: int | None = LOG_TAIL_LINES
) -> dict[str, str]:
    """The log (or its last ``lines``) of each process, in one round trip."""
    if not infos:
        return {}
    marker = f"==lazycluster-log-{secrets.token_hex(8)}=="
    reader = "cat --" if lines is None else f"tail -n {int(lines)} --"
    script = "; ".join(f"echo {q(marker + i.name)}; {reader} {q(i.log_file)} 2>&1" for i in infos)
    output = runtime.connection.run(script).stdout
    logs: dict[str, str] = {}
    name = None
    for line in output.splitlines(keepends=True):
        if line.startswith(marker):
            name = line[len(marker) :].rstrip("\n")
            logs[name] = ""
        elif name is not None:
            logs[name] += line
    return logs


def wait_ready(
    runtime: Runtime,
    python: str,
    ready_file: str,
    address: str,
    port: int,
    pid: int,
    timeout: float,
) -> tuple[str, float]:
    """Wait on the host until the process wrote ``ready_file`` and ``address:port`` accepts
    connections (a listener of someone else does not count), or until its process group died or
    ``timeout`` passed. Returns ("up" | "dead" | "timeout", seconds waited). On this machine
    the wait runs in this thread (no interpreter started beside the booting scheduler)."""
    if runtime.is_local:
        return host_ready.wait(ready_file, address, port, pid, timeout)
    argv = [ready_file, address, str(port), str(pid), str(timeout)]
    line = commands.python_call(python, hostside.source("ready"), argv, bare=True)
    try:
        result = runtime.connection.run(line, timeout=timeout + 10)
    except OperationTimeoutError:
        return "timeout", timeout
    words = result.stdout.split()
    if len(words) != 2:
        raise LazyclusterError(
            f"waiting for {address}:{port} on {runtime.host} failed: {tail(result.output, 500)}"
        )
    return words[0], float(words[1])


def folder_marker(folder: str) -> str:
    """The text every process command line of a cluster folder contains."""
    return folder.rstrip("/") + "/"
