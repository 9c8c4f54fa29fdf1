"""RuntimeGroup: many runtimes driven at once; partial failure is data, not silence."""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import posixpath
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from lazycluster_tasks import ports as portlib
from lazycluster_tasks.errors import GroupError, PortInUseError
from lazycluster_tasks.runtime import Runtime, RuntimeProcess
from lazycluster_tasks.ssh_settings import SSHSettings
from lazycluster_tasks.task import RuntimeTask

logger = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K")

#: Where group ports come from when none is given (as in lazycluster).
GROUP_PORT_RANGE = range(5800, 6000)


class Background:
    """``fn()`` in a thread of its own, started at once: work for the hosts that goes on while
    the caller does something else. The thread runs in a copy of the caller's context (as
    asyncio.to_thread does): an orchestrator's run context and settings reach it (without them,
    a Prefect logger in a job started a temporary API server of its own)."""

    def __init__(self, fn: Callable[[], T], name: str = "lct-background") -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run, fn), name=name)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # the caller's result() raises it
            self._error = exc

    def join(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        """Wait for ``fn``; its value, or its error raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def run_parallel(operation: str, jobs: Mapping[str, K], fn: Callable[[K], T]) -> dict[str, T]:
    """Run ``fn`` on every job concurrently; results by key, or GroupError naming failures.

    Each job in a :class:`Background` of its own (plain threads, not an executor: an executor
    takes no work once the interpreter is exiting, and the cleanup at exit fans out too)."""
    if not jobs:
        return {}
    results: dict[str, T] = {}
    errors: dict[str, BaseException] = {}
    if len(jobs) == 1:  # no thread for a single job
        ((key, job),) = jobs.items()
        try:
            results[key] = fn(job)
        except Exception as exc:
            errors[key] = exc
    else:
        running: dict[str, Background] = {}
        try:
            for i, (key, job) in enumerate(jobs.items()):
                running[key] = Background(functools.partial(fn, job), name=f"lct-fan-out_{i}")
        finally:  # the jobs under way end before this returns, or raises
            for task in running.values():
                task.join()
        for key, task in running.items():
            try:
                results[key] = task.result()
            except Exception as exc:  # an interrupt is not a host's failure: it goes up
                errors[key] = exc
    if errors:
        raise GroupError(operation, results, errors)
    return results


def destination(runtime: Runtime) -> str:
    """Where a runtime's commands run: ``user@hostname:port`` (plus its route) for SSH
    (resolved through the config, so two aliases of one machine compare equal); the host
    name for local runtimes."""
    settings = getattr(runtime.connection, "settings", None)
    if isinstance(settings, SSHSettings):
        return settings.destination
    return f"local {runtime.host}"


def fan_out(
    operation: str, runtimes: Iterable[Runtime], fn: Callable[[Runtime], T]
) -> dict[str, T]:
    """Run ``fn`` on every runtime concurrently; results by host, or GroupError naming failures."""
    return run_parallel(operation, {rt.host: rt for rt in runtimes}, fn)


class RuntimeGroup:
    """Several runtimes used together; every operation fans out to the hosts concurrently.

    Parameters
    ----------
    runtimes, hosts
        The runtimes, or host names to make them from (exactly one of the two).
    working_dir, ssh_config_path, connection_kwargs, python_executable
        For the runtimes made from ``hosts``, as for :class:`Runtime`.
    """

    def __init__(
        self,
        runtimes: list[Runtime] | None = None,
        hosts: list[str] | None = None,
        working_dir: str | None = None,
        *,
        ssh_config_path: str | None = None,
        connection_kwargs: Mapping[str, Any] | None = None,
        python_executable: str | None = None,
    ) -> None:
        if (runtimes is None) == (hosts is None):
            raise ValueError("give exactly one of runtimes or hosts")
        if hosts is not None:
            if isinstance(hosts, str):
                raise ValueError("hosts must be a list of host names, not a string")
            runtimes = [
                Runtime(
                    h,
                    working_dir,
                    connection_kwargs,
                    ssh_config_path,
                    python_executable=python_executable,
                )
                for h in hosts
            ]
        assert runtimes is not None
        self._runtimes: dict[str, Runtime] = {}
        for runtime in runtimes:
            if not isinstance(runtime, Runtime):
                raise ValueError(f"expected a Runtime, got {runtime!r}")
            self._add(runtime, owned=hosts is not None)
        if working_dir is not None:
            for runtime in self._runtimes.values():
                runtime.request_working_dir(working_dir)
        self._info_thread: threading.Thread | None = None
        self._group_tasks: list[RuntimeTask] = []  # started through the group, in order

    # -- membership -----------------------------------------------------------------------

    @property
    def hosts(self) -> list[str]:
        return list(self._runtimes)

    @property
    def runtimes(self) -> list[Runtime]:
        return list(self._runtimes.values())

    @property
    def runtime_count(self) -> int:
        return len(self._runtimes)

    def __len__(self) -> int:
        return len(self._runtimes)

    def __repr__(self) -> str:
        return f"RuntimeGroup({self.hosts})"

    def add_runtime(self, host: str | None = None, runtime: Runtime | None = None) -> None:
        if (host is None) == (runtime is None):
            raise ValueError("give exactly one of host or runtime")
        owned = runtime is None
        if runtime is None:
            assert host is not None
            runtime = Runtime(host)
        if not isinstance(runtime, Runtime):
            raise ValueError(f"expected a Runtime, got {runtime!r}")
        self._add(runtime, owned)

    def _add(self, runtime: Runtime, owned: bool) -> None:
        """Add ``runtime`` unless the group already reaches its destination (user@host:port)
        under another alias: then log it and drop it (cleaned up if the group created it)."""
        if runtime.host in self._runtimes:
            raise ValueError(f"host {runtime.host!r} is already in the group")
        where = destination(runtime)
        for other in self._runtimes.values():
            if destination(other) == where:
                logger.warning(
                    "%s and %s are the same host (%s): keeping %s, dropping %s",
                    other.host,
                    runtime.host,
                    where,
                    other.host,
                    runtime.host,
                )
                if owned:
                    runtime.cleanup()
                return
        self._runtimes[runtime.host] = runtime

    def remove_runtime(self, host: str) -> None:
        if host not in self._runtimes:
            raise ValueError(f"host {host!r} is not in the group")
        del self._runtimes[host]

    def contains_runtime(self, host: str) -> bool:
        return host in self._runtimes

    def get_runtime(self, host: str | None = None) -> Runtime:
        """The runtime of ``host``, or the least busy one (fewest running tasks)."""
        if host is not None:
            if host not in self._runtimes:
                raise ValueError(f"host {host!r} is not in the group")
            return self._runtimes[host]
        if not self._runtimes:
            raise ValueError("the group is empty")
        return min(self._runtimes.values(), key=lambda rt: rt.alive_task_count)

    def get_runtimes(
        self,
        include_hosts: Iterable[str] | str | None = None,
        exclude_hosts: Iterable[str] | str | None = None,
    ) -> dict[str, Runtime]:
        include = _host_set(include_hosts)
        exclude = _host_set(exclude_hosts) or set()
        unknown = ((include or set()) | exclude) - set(self._runtimes)
        if unknown:
            raise ValueError(f"hosts not in the group: {', '.join(sorted(unknown))}")
        return {
            h: rt
            for h, rt in self._runtimes.items()
            if (include is None or h in include) and h not in exclude
        }

    # -- tasks' results and processes ----------------------------------------------------

    @property
    def function_returns(self) -> Iterator[Any]:
        """The return values of the function steps of every task started through the group
        (``execute_task``, ``execute_function``, ``send_file``, ``get_file``), in the order the
        tasks were started; each task is waited for first and a failed one raises its error.

        Tasks a runtime of the group ran directly are not included (ask that runtime)."""
        for task in list(self._group_tasks):
            yield from task.function_returns

    @property
    def task_processes(self) -> list[RuntimeProcess]:
        """The async task processes of every runtime of the group."""
        return [p for rt in self._runtimes.values() for p in rt.task_processes]

    # -- env ------------------------------------------------------------------------------

    def set_env_variables(self, env_variables: Mapping[str, Any]) -> None:
        for runtime in self._runtimes.values():
            runtime.env_variables = dict(env_variables)

    def add_env_variables(self, env_variables: Mapping[str, Any]) -> None:
        for runtime in self._runtimes.values():
            runtime.add_env_variables(env_variables)

    # -- tasks ----------------------------------------------------------------------------

    def execute_task(
        self,
        task: RuntimeTask,
        host: str | None = None,
        broadcast: bool = False,
        execute_async: bool = True,
        omit_on_join: bool = False,
        debug: bool = False,
    ) -> RuntimeTask | list[RuntimeTask]:
        """Run ``task`` on ``host``, on the least busy runtime, or (``broadcast``) on every
        runtime as independent copies, returning one task per host."""
        if broadcast and host is not None:
            raise ValueError("give either host or broadcast=True, not both")
        if not broadcast:
            runtime = self.get_runtime(host)
            started = runtime.execute_task(task, execute_async, omit_on_join, debug)
            self._group_tasks.append(started)
            return started
        tasks = {
            rt.host: rt.execute_task(task.copy(), True, omit_on_join, debug)
            for rt in self._runtimes.values()
        }
        self._group_tasks.extend(tasks.values())
        if not execute_async:
            _join_all(task.name, tasks)
        return list(tasks.values())

    def execute_function(
        self,
        function: Callable[..., Any],
        host: str | None = None,
        broadcast: bool = False,
        execute_async: bool = False,
        debug: bool = False,
        **func_kwargs: Any,
    ) -> RuntimeTask | list[RuntimeTask]:
        name = getattr(function, "__name__", "function")
        task = RuntimeTask(name).run_function(function, **func_kwargs)
        return self.execute_task(task, host, broadcast, execute_async, debug=debug)

    def send_file(
        self, local_path: str, remote_path: str | None = None, execute_async: bool = True
    ) -> list[RuntimeTask]:
        """Copy a local file or folder to every host."""
        task = RuntimeTask(f"send-{os.path.basename(local_path)}").send_file(
            local_path, remote_path
        )
        result = self.execute_task(task, broadcast=True, execute_async=execute_async)
        assert isinstance(result, list)
        return result

    def get_file(
        self, remote_path: str, local_path: str | None = None, execute_async: bool = False
    ) -> list[RuntimeTask]:
        """Fetch a file or folder from every host into ``<local_path>/<host>/<name>``."""
        base = local_path or os.getcwd()
        name = posixpath.basename(remote_path.rstrip("/")) or "root"
        tasks = {}
        for runtime in self._runtimes.values():
            target = os.path.join(base, runtime.host, name)
            task = RuntimeTask(f"get-{name}").get_file(remote_path, target)
            tasks[runtime.host] = runtime.execute_task(task, execute_async=True)
            self._group_tasks.append(tasks[runtime.host])
        if not execute_async:
            _join_all(f"get_file {remote_path}", tasks)
        return list(tasks.values())

    def join(self) -> None:
        """Wait for every runtime's tasks; failures are reported per host."""
        errors: dict[str, BaseException] = {}
        for host, runtime in self._runtimes.items():
            try:
                runtime.join()
            except Exception as exc:
                errors[host] = exc
        if errors:
            ok = {h: None for h in self._runtimes if h not in errors}
            raise GroupError("join", ok, errors)

    def clear_tasks(self) -> None:
        """Forget finished tasks, here and on every runtime (running ones are kept)."""
        self._group_tasks = [t for t in self._group_tasks if t.is_alive]
        for runtime in self._runtimes.values():
            runtime.clear_tasks()

    def print_log(self) -> None:
        for runtime in self._runtimes.values():
            runtime.print_log()

    # -- info -----------------------------------------------------------------------------

    def fill_runtime_info_buffers_async(self) -> None:
        """Probe every host's info in the background; ``Runtime.info`` then answers at once."""

        def fill() -> None:
            try:
                fan_out("host info", self.runtimes, lambda rt: rt.info)
            except GroupError as exc:
                logger.warning("%s", exc)

        self._info_thread = threading.Thread(target=fill, name="lct-info", daemon=True)
        self._info_thread.start()

    def print_hosts(self) -> None:
        for host in self._runtimes:
            print(host)

    def print_runtime_info(self) -> None:
        fan_out("host info", self.runtimes, lambda rt: rt.info)
        for runtime in self._runtimes.values():
            runtime.print_info()

    # -- ports and tunnels ----------------------------------------------------------------

    def used_ports(
        self, exclude_hosts: Iterable[str] | str | None = None, include_localhost: bool = False
    ) -> set[int]:
        """Ports taken on any of the hosts (one probe per host, concurrently)."""
        runtimes = self.get_runtimes(exclude_hosts=exclude_hosts).values()
        used: set[int] = set()
        for ports in fan_out("port probe", runtimes, lambda rt: rt.used_ports()).values():
            used |= ports
        if include_localhost:
            used |= portlib.local_used_ports()
        return used

    def has_free_port(self, port: int, exclude_hosts: Iterable[str] | str | None = None) -> bool:
        """True when ``port`` is free on every host of the group."""
        return portlib.check_port(port) not in self.used_ports(exclude_hosts)

    def get_free_port(self, ports: list[int], enforce_check_on_localhost: bool = False) -> int:
        """The first port of the list free on every host (and here, if asked)."""
        return self.get_free_ports(ports, 1, enforce_check_on_localhost)[0]

    def get_free_ports(
        self, ports: list[int], count: int, enforce_check_on_localhost: bool = False
    ) -> list[int]:
        """The first ``count`` ports of the list free on every host (and here, if asked)."""
        candidates = portlib.as_port_list(ports)
        used = self.used_ports(include_localhost=enforce_check_on_localhost)
        return portlib.free_ports(candidates, used, count, "on every host of the group")

    def expose_port_to_runtimes(
        self,
        local_port: int,
        runtime_port: int | list[int] | None = None,
        exclude_hosts: Iterable[str] | str | None = None,
    ) -> int:
        """Make our ``127.0.0.1:local_port`` reachable as ``127.0.0.1:runtime_port`` on every
        host but ``exclude_hosts``. ``runtime_port``: a port (default: ``local_port``), or a
        list to take the first port free on all those hosts from (NoPortsLeftError if none).
        Returns the runtime port."""
        runtimes = self.get_runtimes(exclude_hosts=exclude_hosts).values()
        if isinstance(runtime_port, list):
            used = self.used_ports(exclude_hosts=exclude_hosts)
            where = "on every host the port is exposed to"
            port = portlib.first_free(portlib.as_port_list(runtime_port), used, where)
        else:
            port = local_port if runtime_port is None else runtime_port
        fan_out(
            f"expose port {local_port}",
            runtimes,
            lambda rt: rt.expose_port_to_runtime(local_port, port),
        )
        return port

    def expose_port_from_runtime_to_group(
        self, host: str, runtime_port: int, group_port: int | list[int] | None = None
    ) -> int:
        """Make ``runtime_port`` of ``host`` reachable as ``127.0.0.1:group_port`` here and on
        every other host of the group (through this machine). Returns the group port.

        ``group_port`` may be a port, a list to choose the first free one from, or None
        (``runtime_port`` itself, else the first free port from 5800).
        """
        if host not in self._runtimes:
            raise ValueError(f"host {host!r} is not in the group")
        others = [h for h in self._runtimes if h != host]
        used = self.used_ports(exclude_hosts=[host], include_localhost=True) if others else set()
        if not others:
            used = portlib.local_used_ports()
        if isinstance(group_port, int):
            if group_port in used:
                raise PortInUseError(group_port, "localhost or another host of the group")
            port = group_port
        else:
            candidates = group_port or [runtime_port, *GROUP_PORT_RANGE]
            port = portlib.first_free(
                portlib.as_port_list(candidates), used, "here and on the group"
            )
        self._runtimes[host].expose_port_from_runtime(runtime_port, port)
        if others:
            self.expose_port_to_runtimes(port, port, exclude_hosts=[host])
        return port

    # -- lifecycle ------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Clean up every runtime concurrently; failures are reported per host."""
        if self._info_thread is not None:
            self._info_thread.join()
        fan_out("cleanup", self.runtimes, lambda rt: rt.cleanup())

    def __enter__(self) -> RuntimeGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _join_all(operation: str, tasks: dict[str, RuntimeTask]) -> None:
    """Join tasks that already run concurrently; GroupError carries the successful ones."""
    errors: dict[str, BaseException] = {}
    for host, task in tasks.items():
        try:
            task.join()
        except Exception as exc:
            errors[host] = exc
    if errors:
        ok = {h: t for h, t in tasks.items() if h not in errors}
        raise GroupError(operation, ok, errors)


def _host_set(hosts: Iterable[str] | str | None) -> set[str] | None:
    if hosts is None:
        return None
    return {hosts} if isinstance(hosts, str) else set(hosts)
