"""RuntimeTask: a named chain of steps (commands, file transfers, Python functions) for one host."""

from __future__ import annotations

import base64
import copy
import logging
import os
import posixpath
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import cloudpickle

from lazycluster_tasks import commands, hostside
from lazycluster_tasks.connection import tail
from lazycluster_tasks.environment import ExecutionFileLogUtil
from lazycluster_tasks.errors import (
    LazyclusterError,
    OperationTimeoutError,
    RemoteEnvironmentError,
    TaskExecutionError,
)
from lazycluster_tasks.hostside.run_function import EXIT_NO_CLOUDPICKLE, RESULT_MARK

if TYPE_CHECKING:
    from lazycluster_tasks.connection import Connection

logger = logging.getLogger(__name__)


class TaskHost(Protocol):
    """What a task needs of where it runs (a ``Runtime`` is one; so is a bare connection)."""

    _connection: Connection

    @property
    def host(self) -> str: ...

    @property
    def env_variables(self) -> dict[str, str]: ...

    @property
    def python_executable(self) -> str: ...

    @property
    def working_dir(self) -> str: ...

    def _remote_path(self, path: str) -> str: ...


@dataclass
class _OnConnection:
    """Someone else's open connection as a task's host: its current dir (the home folder over
    SSH), no env of its own; it owns nothing and never closes the connection."""

    _connection: Connection
    env_variables: dict[str, str] = field(default_factory=dict)
    python_executable: str = sys.executable
    working_dir: str = "."

    @property
    def host(self) -> str:
        return self._connection.host

    def _remote_path(self, path: str) -> str:
        if path.startswith("~"):  # the SFTP session starts in the home folder
            return path[1:].lstrip("/") or "."
        return path


#: How long ``RuntimeTask.cleanup`` keeps killing a running task's command until its thread ends.
STOP_TIMEOUT = 10.0
#: Every command and function sees its runtime's working dir under this name (as in lazycluster).
WORKING_DIR_ENV_VAR_NAME = "WORKING_DIR"


def _require_text(value: Any, what: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    return str(value)


@dataclass
class _Step:
    description: str

    def run(self, runtime: TaskHost, task: RuntimeTask, on_output: Callable[[str], None]) -> str:
        raise NotImplementedError


@dataclass
class _CommandStep(_Step):
    command: str = ""
    timeout: float | None = None

    def run(self, runtime: TaskHost, task: RuntimeTask, on_output: Callable[[str], None]) -> str:
        result = runtime._connection.run(
            self.command,
            timeout=self.timeout,
            working_dir=runtime.working_dir,
            env=task._effective_env(runtime),
            on_output=on_output,
            combine_stderr=True,
            owner=task,
        )
        if not result.ok:
            raise task._failure(runtime, self, result.exit_code, result.output)
        return result.output


@dataclass
class _SendStep(_Step):
    local_path: str = ""
    remote_path: str | None = None

    def run(self, runtime: TaskHost, task: RuntimeTask, on_output: Callable[[str], None]) -> str:
        target = runtime._remote_path(self.remote_path or os.path.basename(self.local_path))
        runtime._connection.put(os.path.expanduser(self.local_path), target)
        return f"sent {self.local_path} to {runtime.host}:{target}"


@dataclass
class _GetStep(_Step):
    remote_path: str = ""
    local_path: str | None = None

    def run(self, runtime: TaskHost, task: RuntimeTask, on_output: Callable[[str], None]) -> str:
        source = runtime._remote_path(self.remote_path)
        target = os.path.expanduser(self.local_path or posixpath.basename(source.rstrip("/")))
        runtime._connection.get(source, target)
        return f"fetched {runtime.host}:{source} to {target}"


@dataclass
class _FunctionStep(_Step):
    function: Callable[..., Any] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def run(self, runtime: TaskHost, task: RuntimeTask, on_output: Callable[[str], None]) -> str:
        payload = cloudpickle.dumps((self.function, self.kwargs))
        python = runtime.python_executable
        result = runtime._connection.run(
            commands.python_call(python, hostside.source("run_function")),
            timeout=None,
            working_dir=runtime.working_dir,
            env=task._effective_env(runtime),
            combine_stderr=True,
            stdin=payload,
            owner=task,
        )
        text, _, encoded = result.output.rpartition(RESULT_MARK)
        text = text.removesuffix("\n")
        for line in text.splitlines():
            on_output(line)
        if result.exit_code == EXIT_NO_CLOUDPICKLE:
            raise RemoteEnvironmentError(
                f"{runtime.host}: cloudpickle is not importable by {python}; install it there "
                f"(nothing is installed for you). {tail(text, 300)}",
                host=runtime.host,
            )
        if result.exit_code == 127:
            raise RemoteEnvironmentError(
                f"{runtime.host}: Python interpreter {python!r} not found; pass "
                f"python_executable= to Runtime. {tail(text, 300)}",
                host=runtime.host,
            )
        if not encoded:
            raise task._failure(runtime, self, result.exit_code, text)
        ok, value = cloudpickle.loads(base64.b64decode(encoded.strip()))
        if not ok:
            exc, remote_tb = value
            error = task._failure(runtime, self, result.exit_code, f"{text}\n{remote_tb}")
            raise error from exc
        task._returns.append(value)
        return text


class RuntimeTask:
    """A chain of steps executed in order on one runtime.

    Build it with the chainable ``run_command``, ``send_file``, ``get_file`` and ``run_function``,
    then hand it to ``Runtime.execute_task`` or ``RuntimeGroup.execute_task``.
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"task-{int(time.time() * 1000)}-{id(self) % 10000}"
        self._env_variables: dict[str, str] = {}
        self.omit_on_join = False
        self._steps: list[_Step] = []
        self._reset()

    def _reset(self) -> None:
        self._execution_log: list[str] = []
        self._execution_log_file_path: str | None = None
        self._returns: list[Any] = []
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._runtime: TaskHost | None = None
        self._cancelled = threading.Event()

    def __repr__(self) -> str:
        return f"RuntimeTask({self.name!r}, steps={len(self._steps)})"

    # -- building -------------------------------------------------------------------------

    def run_command(self, command: str, timeout: float | None = None) -> RuntimeTask:
        """Add a shell command; ``timeout`` (s) kills it and fails the task when exceeded."""
        command = _require_text(command, "command")
        self._steps.append(_CommandStep(f"run_command: {command}", command, timeout))
        return self

    def send_file(self, local_path: str, remote_path: str | None = None) -> RuntimeTask:
        """Add a copy of a local file or folder to the host (default: into its working dir)."""
        local_path = _require_text(local_path, "local_path")
        if remote_path is not None:
            remote_path = _require_text(remote_path, "remote_path")
        self._steps.append(_SendStep(f"send_file: {local_path}", local_path, remote_path))
        return self

    def get_file(self, remote_path: str, local_path: str | None = None) -> RuntimeTask:
        """Add a copy of a file or folder from the host (relative paths: its working dir)."""
        remote_path = _require_text(remote_path, "remote_path")
        if local_path is not None:
            local_path = _require_text(local_path, "local_path")
        self._steps.append(_GetStep(f"get_file: {remote_path}", remote_path, local_path))
        return self

    def run_function(self, function: Callable[..., Any], **func_kwargs: Any) -> RuntimeTask:
        """Add a call of ``function(**func_kwargs)`` on the host; its return value is kept."""
        if not callable(function):
            raise ValueError(f"function must be callable, got {function!r}")
        name = getattr(function, "__name__", repr(function))
        self._steps.append(_FunctionStep(f"run_function: {name}", function, dict(func_kwargs)))
        return self

    @property
    def env_variables(self) -> dict[str, str]:
        """Environment variables of this task's commands and functions (over the runtime's)."""
        return self._env_variables

    @env_variables.setter
    def env_variables(self, env_variables: dict[str, Any]) -> None:
        if not isinstance(env_variables, dict):
            raise ValueError(f"env variables must be a dict, got {env_variables!r}")
        self._env_variables = {commands.check_env_name(k): str(v) for k, v in env_variables.items()}

    # -- results --------------------------------------------------------------------------

    @property
    def execution_log(self) -> list[str]:
        """One entry per executed step (its output); empty before the task ran."""
        return self._execution_log

    @property
    def execution_log_file_path(self) -> str | None:
        """The log file of the last execution; None before the task ran."""
        return self._execution_log_file_path

    @property
    def function_returns(self) -> Iterator[Any]:
        """The return values of the task's function steps, in order."""
        self.join()
        yield from list(self._returns)

    @property
    def process(self) -> threading.Thread | None:
        """The thread an async execution runs in (lazycluster had a process here)."""
        return self._thread

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def join(self, timeout: float | None = None) -> None:
        """Wait for an async execution; re-raise its error here. Raise on ``timeout``."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise OperationTimeoutError(
                    f"task {self.name!r} still running after {timeout} s",
                    host=self._runtime.host if self._runtime else None,
                )
        if self._error is not None:
            raise self._error

    def print_log(self) -> None:
        for entry in self.execution_log:
            print(entry)

    def cleanup(self) -> None:
        """Stop this task: no further step starts, and its running command is killed.

        Returns once its thread ended (at most ``STOP_TIMEOUT`` seconds): the kill is repeated
        for a command that was just starting when the first kill looked for it.
        """
        self._cancelled.set()
        deadline = time.monotonic() + STOP_TIMEOUT
        while self._thread is not None and self.is_alive and self._runtime is not None:
            self._runtime._connection.kill_running(owner=self)
            self._thread.join(0.1)
            if time.monotonic() >= deadline:
                logger.warning("task %r still runs %s s after cleanup", self.name, STOP_TIMEOUT)
                break

    # -- execution ------------------------------------------------------------------------

    def execute(self, connection: TaskHost | Connection, debug: bool = False) -> None:
        """Run the task now, in this thread, on ``connection``: a ``Runtime`` (in its working
        dir, with its env variables) or a bare ``Connection`` (in that connection's current
        dir, which is the home folder over SSH). Raises ``TaskExecutionError`` on a failed step.

        ``debug=True`` prints the remote output as it arrives.
        """
        from lazycluster_tasks.connection import Connection

        runtime: TaskHost
        if isinstance(connection, Connection):
            runtime = _OnConnection(connection)
        elif all(hasattr(connection, a) for a in ("_connection", "_remote_path", "working_dir")):
            runtime = connection
        else:
            raise ValueError(f"expected a Runtime or a Connection, got {connection!r}")
        self._start(runtime, False, debug)

    def copy(self) -> RuntimeTask:
        """An independent task with the same steps (for broadcasting to several hosts)."""
        clone = copy.copy(self)
        clone._steps = list(self._steps)
        clone.env_variables = dict(self.env_variables)
        clone._reset()
        return clone

    def _effective_env(self, runtime: TaskHost) -> dict[str, str]:
        env = {WORKING_DIR_ENV_VAR_NAME: runtime.working_dir}
        env.update(runtime.env_variables)
        env.update(self.env_variables)
        return env

    def _failure(self, runtime: TaskHost, step: _Step, exit_code: int | None, output: str) -> Any:
        index = self._steps.index(step)
        command = getattr(step, "command", None) or step.description
        return TaskExecutionError(
            f"task {self.name!r} failed on {runtime.host} at step {index} ({step.description}) "
            f"with exit code {exit_code}:\n{tail(output)}",
            host=runtime.host,
            task_name=self.name,
            step_index=index,
            command=command,
            exit_code=exit_code,
            output=tail(output),
        )

    def _start(self, runtime: TaskHost, execute_async: bool, debug: bool) -> None:
        if self.is_alive:
            raise ValueError(f"task {self.name!r} is already running on {self._runtime}")
        self._reset()
        self._runtime = runtime
        if execute_async:
            self._thread = threading.Thread(
                target=self._run_guarded, args=(runtime, debug), name=f"lct-{self.name}"
            )
            self._thread.daemon = True
            self._thread.start()
        else:
            self._execute(runtime, debug)

    def _run_guarded(self, runtime: TaskHost, debug: bool) -> None:
        try:
            self._execute(runtime, debug)
        except BaseException as exc:
            self._error = exc  # surfaced by join()

    def _execute(self, runtime: TaskHost, debug: bool) -> None:
        log_file_util = ExecutionFileLogUtil(runtime.host, self.name)
        self._execution_log_file_path = log_file_util.file_path
        with open(self._execution_log_file_path, "a", encoding="utf-8") as log_file:
            for step in self._steps:
                if self._cancelled.is_set():
                    raise TaskExecutionError(
                        f"task {self.name!r} on {runtime.host} was cancelled by cleanup",
                        host=runtime.host,
                        task_name=self.name,
                    )
                self._run_step(runtime, step, debug, log_file)

    def _run_step(self, runtime: TaskHost, step: _Step, debug: bool, log_file: Any) -> None:
        lines: list[str] = []

        def on_output(line: str) -> None:
            lines.append(line)
            if debug:
                print(line, flush=True)

        log_file.write(f"[{runtime.host}] {step.description}\n")
        try:
            output = step.run(runtime, self, on_output)
        except LazyclusterError as exc:
            entry = "\n".join(lines) or getattr(exc, "output", "")
            self.execution_log.append(entry)
            log_file.write(entry + f"\n[{runtime.host}] failed: {exc}\n")
            raise
        self.execution_log.append(output)
        log_file.write(output + ("" if output.endswith("\n") else "\n"))
        if not debug and output:
            logger.debug("[%s] %s: %s", runtime.host, step.description, output.rstrip())
