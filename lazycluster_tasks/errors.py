"""Every error lazycluster_tasks raises, in one place.

The tree::

    LazyclusterError
    ├── InvalidRuntimeError            a host cannot be used
    │   ├── HostConnectionError        cannot reach it (refused, unreachable, dropped)  [transient]
    │   ├── AuthenticationError        the host refused our credentials
    │   ├── HostKeyError               unknown or changed host key
    │   └── RemoteEnvironmentError     the host lacks python, cloudpickle or distributed
    ├── EnvironmentSyncError           this machine's environment cannot be sent as asked (code
    │                                  folders too large, bad names)
    ├── OperationTimeoutError          a network operation or command ran out of time  [transient]
    ├── TaskExecutionError             a RuntimeTask step failed (host, step, command, exit code)
    ├── PathCreationError              a directory could not be created
    ├── NoRuntimesDetectedError        no host qualifies for a group
    ├── GroupError                     some hosts of a group failed; carries per-host results
    ├── PortInUseError                 a single given port is taken
    ├── NoPortsLeftError               none of the given ports is free
    ├── TunnelError                    a port forward could not be opened or was lost
    ├── MasterStartError               the cluster master did not come up in time
    ├── WorkerStartError               workers did not register in time
    │   └── NetworkPathError           a path the cluster needs is blocked (from, to, port)
    └── ClusterLostError               a running cluster lost its scheduler, workers or paths

``transient`` marks the errors worth retrying (``is_transient`` answers for any exception).
Built-in ``TimeoutError`` is also a base of ``OperationTimeoutError`` so generic code catches it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class LazyclusterError(Exception):
    """Base of every error raised by lazycluster_tasks."""

    transient = False

    @property
    def msg(self) -> str:
        """The message (lazycluster's attribute name)."""
        return str(self.args[0]) if self.args else ""

    @property
    def predecessor_excp(self) -> BaseException | None:
        """The exception this one was raised from (lazycluster's name for ``__cause__``)."""
        return self.__cause__


class InvalidRuntimeError(LazyclusterError):
    """A host cannot be used as a runtime."""

    def __init__(self, message: str, host: str | None = None) -> None:
        super().__init__(message)
        self.host = host


class HostConnectionError(InvalidRuntimeError):
    """The host could not be reached or the connection dropped."""

    transient = True


class AuthenticationError(InvalidRuntimeError):
    """The host refused our credentials. Never retried."""


class HostKeyError(InvalidRuntimeError):
    """The host key is unknown or differs from known_hosts. Never retried."""


class RemoteEnvironmentError(InvalidRuntimeError):
    """The host lacks a program or module we need (nothing is installed for you)."""


class EnvironmentSyncError(LazyclusterError, ValueError):
    """This machine's environment cannot be sent as asked (what to do is in the message)."""


class OperationTimeoutError(LazyclusterError, TimeoutError):
    """A network operation or a command exceeded its timeout."""

    transient = True

    def __init__(self, message: str, host: str | None = None, output: str = "") -> None:
        super().__init__(message)
        self.host = host
        self.output = output


class TaskExecutionError(LazyclusterError):
    """A step of a RuntimeTask failed.

    Carries where and what: ``host``, ``step_index``, ``command``, ``exit_code``, ``output``
    (the tail of the step's output) and ``task_name``.
    """

    def __init__(
        self,
        message: str,
        *,
        host: str | None = None,
        task_name: str | None = None,
        step_index: int | None = None,
        command: str | None = None,
        exit_code: int | None = None,
        output: str = "",
    ) -> None:
        super().__init__(message)
        self.host = host
        self.task_name = task_name
        self.step_index = step_index
        self.command = command
        self.exit_code = exit_code
        self.output = output

    @property
    def task_step_index(self) -> int | None:
        """The failed step's index (lazycluster's name for ``step_index``)."""
        return self.step_index


class PathCreationError(LazyclusterError):
    """A directory could not be created on a host."""

    def __init__(self, path: str, host: str | None = None, reason: str = "") -> None:
        where = f" on {host}" if host else ""
        super().__init__(f"could not create directory {path!r}{where}: {reason}".rstrip(": "))
        self.path = path
        self.host = host


class NoRuntimesDetectedError(LazyclusterError):
    """No host qualifies for the requested group."""


class GroupError(LazyclusterError):
    """Some hosts of a group failed while the others succeeded.

    ``results`` maps each successful host to its result, ``errors`` each failed host to its
    exception; nothing is swallowed.
    """

    def __init__(
        self, operation: str, results: Mapping[str, Any], errors: Mapping[str, BaseException]
    ) -> None:
        lines = [f"{operation} failed on {len(errors)} of {len(results) + len(errors)} hosts:"]
        lines += [f"  {host}: {type(err).__name__}: {err}" for host, err in errors.items()]
        super().__init__("\n".join(lines))
        self.operation = operation
        self.results = dict(results)
        self.errors = dict(errors)

    @property
    def transient(self) -> bool:  # type: ignore[override]
        return all(is_transient(err) for err in self.errors.values())


class PortInUseError(LazyclusterError):
    """A single given port is not free."""

    def __init__(self, port: int, host: str | None = None) -> None:
        where = f" on {host}" if host else ""
        super().__init__(f"port {port} is already in use{where}")
        self.port = port
        self.host = host


class NoPortsLeftError(LazyclusterError):
    """None of the given ports is free (or not enough of them)."""


class TunnelError(LazyclusterError):
    """A port forward could not be opened, or it was lost."""

    transient = True


class MasterStartError(LazyclusterError):
    """The master instance did not start within its timeout."""

    def __init__(self, message: str, host: str | None = None, output: str = "") -> None:
        super().__init__(message)
        self.host = host
        self.output = output


class WorkerStartError(LazyclusterError):
    """Workers did not come up; ``missing`` names each host with the tail of its log."""

    def __init__(self, message: str, missing: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.missing = dict(missing or {})


class NetworkPathError(WorkerStartError):
    """Workers registered, but a path between the cluster's parts is blocked; ``paths`` maps
    "from -> to (address)" to what happened."""

    def __init__(self, message: str, paths: Mapping[str, str] | None = None) -> None:
        super().__init__(message, missing=paths)
        self.paths = dict(paths or {})


class ClusterLostError(LazyclusterError):
    """A running cluster lost its scheduler, its workers or a path between them; ``reason``
    says what was seen, when."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


def is_transient(error: BaseException) -> bool:
    """True for errors worth retrying: dropped or refused connections and timeouts."""
    if isinstance(error, LazyclusterError):
        return bool(error.transient)
    return isinstance(error, (ConnectionError, TimeoutError, EOFError))
