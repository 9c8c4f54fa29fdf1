"""Runtime: one host, reached over SSH (or run locally for ``localhost``)."""

from __future__ import annotations

import contextlib
import errno
import logging
import posixpath
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from lazycluster_tasks import commands, hostinfo
from lazycluster_tasks import ports as portlib
from lazycluster_tasks.commands import q
from lazycluster_tasks.connection import Connection, tail
from lazycluster_tasks.errors import (
    LazyclusterError,
    PathCreationError,
    PortInUseError,
    TunnelError,
)
from lazycluster_tasks.gates import LoginUserGate
from lazycluster_tasks.local import LocalConnection, is_local_host
from lazycluster_tasks.ssh import SSHConnection
from lazycluster_tasks.ssh_master import OpenSSHMaster, usable
from lazycluster_tasks.ssh_settings import resolve_settings
from lazycluster_tasks.task import WORKING_DIR_ENV_VAR_NAME, RuntimeTask
from lazycluster_tasks.tunnels import LocalForward, MasterForward, RemoteForward, Tunnel

logger = logging.getLogger(__name__)

#: How long cleanup waits for running tasks to end after killing their commands.
CLEANUP_TIMEOUT = 10.0
#: Seconds the OpenSSH master has to carry a round trip after our connection came back (a
#: healthy one takes milliseconds).
MASTER_CHECK_TIMEOUT = 3.0

#: Process keys (lazycluster's scheme): ``<host>::task::<task name>`` for an async task,
#: ``<host>::-L::<local port>::<runtime port>`` and ``<host>::-R::<runtime port>::<local port>``
#: for port exposures.
PROCESS_KEY_DELIMITER = "::"
TASK_PROCESS_KIND = "task"
PORT_FROM_RUNTIME = "-L"
PORT_TO_RUNTIME = "-R"


class RuntimeProcess:
    """Something running in the background for a Runtime: an async task's thread or a tunnel.

    Offers the verbs of lazycluster's ``multiprocessing.Process`` objects: ``is_alive()``,
    ``terminate()`` (kills the task's running command / closes the tunnel) and ``join()``.
    """

    def __init__(self, key: str, target: RuntimeTask | Tunnel) -> None:
        self.key = key
        self.target = target

    @property
    def kind(self) -> str:
        """``task``, ``-L`` (runtime port exposed here) or ``-R`` (local port exposed there)."""
        return self.key.split(PROCESS_KEY_DELIMITER)[1]

    def is_alive(self) -> bool:
        if isinstance(self.target, RuntimeTask):
            return self.target.is_alive
        return not self.target.closed

    def terminate(self) -> None:
        if isinstance(self.target, RuntimeTask):
            self.target.cleanup()
        else:
            self.target.close()

    def join(self, timeout: float | None = None) -> None:
        """Wait for a task's thread to end (a closed tunnel has nothing left to wait for)."""
        if isinstance(self.target, RuntimeTask) and self.target.process is not None:
            self.target.process.join(timeout)

    def __repr__(self) -> str:
        return f"RuntimeProcess({self.key!r}, alive={self.is_alive()})"


class Runtime:
    """One host. Commands, files, functions, ports and tunnels all go through it.

    Parameters
    ----------
    host
        An alias or host name, resolved through the OpenSSH config; ``localhost`` and
        ``127.0.0.1`` run locally without SSH.
    working_dir
        The folder commands run in (made with its parents; ``~`` is the login user's home;
        default: a temporary folder, removed with the runtime).
    connection_kwargs
        paramiko's connect keywords (``key_filename``, ``port``, ``username``, ...), over the
        OpenSSH config's settings.
    ssh_config_path
        An OpenSSH config file (default: ``~/.ssh/config``).
    python_executable
        The interpreter that runs functions on the host (default: this process's path).
    """

    #: The env variable holding the working dir on the host (set for every command).
    WORKING_DIR_ENV_VAR_NAME = WORKING_DIR_ENV_VAR_NAME
    #: The host name that runs locally without SSH (``127.0.0.1`` does too).
    LOCALHOST = "localhost"

    def __init__(
        self,
        host: str,
        working_dir: str | None = None,
        connection_kwargs: Mapping[str, Any] | None = None,
        ssh_config_path: str | None = None,
        *,
        python_executable: str | None = None,
    ) -> None:
        if not isinstance(host, str) or not host.strip():
            raise ValueError(f"host must be a non-empty string, got {host!r}")
        if working_dir is not None:
            check_working_dir(working_dir)
        self._host = host
        self._connection_kwargs = dict(connection_kwargs or {})
        self._ssh_config_path = ssh_config_path
        self._connection: Connection
        if is_local_host(host) and not self._connection_kwargs:
            self._connection = LocalConnection(host)
        else:
            settings = resolve_settings(host, ssh_config_path, self._connection_kwargs)
            self._connection = SSHConnection(settings)
        self._init_state(working_dir, python_executable)

    def _init_state(self, working_dir: str | None, python_executable: str | None) -> None:
        self.python_executable = python_executable or sys.executable
        #: the interpreter was given (else it is this machine's path, or the one an
        #: environment made for the host sets)
        self.python_given = python_executable is not None
        self._requested_working_dir = working_dir
        self._working_dir: str | None = None
        self._working_dir_is_temp = False
        self._env: dict[str, str] = {}
        self._tasks: list[RuntimeTask] = []
        self._info: dict[str, Any] | None = None
        self._tunnels: list[Tunnel] = []
        self._lock = threading.RLock()
        #: the OpenSSH master that carries later forwards (see use_openssh); False: none
        #: could be started, paramiko carries them
        self._master: OpenSSHMaster | bool | None = None
        self._master_lock = threading.Lock()

    # -- identity -------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def connection(self) -> Connection:
        return self._connection

    @property
    def is_local(self) -> bool:
        return self._connection.is_local

    @property
    def connection_kwargs(self) -> dict[str, Any]:
        """The connection settings given (a copy; secrets included: never record it as is)."""
        return dict(self._connection_kwargs)

    @property
    def ssh_config_path(self) -> str | None:
        return self._ssh_config_path

    @property
    def class_name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"Runtime({self._host!r})"

    def __str__(self) -> str:
        return self._host

    # -- working dir and env --------------------------------------------------------------

    @property
    def working_dir(self) -> str:
        """Absolute working directory on the host; created on first use."""
        with self._lock:
            if self._working_dir is None:
                self._working_dir = self._make_working_dir()
            return self._working_dir

    @working_dir.setter
    def working_dir(self, working_dir: str) -> None:
        """Create ``working_dir`` on the host (with its parents) and work there from now on.

        A temporary working dir used so far is removed. Refused while tasks run.
        """
        check_working_dir(working_dir)
        with self._lock:
            running = [t.name for t in self._tasks if t.is_alive]
            if running:
                raise ValueError(f"cannot move the working dir of {self._host}: {running} run")
            previous, previous_is_temp = self._working_dir, self._working_dir_is_temp
            requested = self._requested_working_dir
            self._requested_working_dir = working_dir
            try:
                self._working_dir = self._make_working_dir()
            except BaseException:
                self._requested_working_dir = requested
                raise
            self._working_dir_is_temp = False
            if previous_is_temp and previous and previous != self._working_dir:
                result = self._connection.run(commands.remove_tree(previous))
                if not result.ok:
                    logger.warning("could not remove %s on %s", previous, self._host)

    @property
    def has_working_dir(self) -> bool:
        """Whether the working dir was made (reading ``working_dir`` makes it)."""
        return self._working_dir is not None

    @property
    def working_dir_is_temp(self) -> bool:
        """Whether the working dir is a temporary one of ours (removed with the runtime)."""
        return self._working_dir_is_temp

    def request_working_dir(self, working_dir: str) -> None:
        """Use ``working_dir`` once the working dir is made; refused if another one is in use."""
        check_working_dir(working_dir)
        with self._lock:
            if self._working_dir is not None and self._requested_working_dir != working_dir:
                raise ValueError(f"{self._host} already uses working dir {self._working_dir!r}")
            self._requested_working_dir = working_dir

    def _make_working_dir(self) -> str:
        path = self._requested_working_dir
        if path is None:
            command = commands.make_tempdir()
            self._working_dir_is_temp = True
        else:
            target = _home_relative(path)
            # folders we create are the user's alone (0700); existing ones are left as they are
            command = f"(umask 077 && mkdir -p -- {target}) && cd -- {target} && pwd"
        result = self._connection.run(command)
        created = result.stdout.strip().splitlines()[-1:] if result.ok else []
        if not created:
            raise PathCreationError(path or "(temporary dir)", self._host, tail(result.output, 500))
        return created[0]

    def forget_working_dir(self) -> None:
        """Forget a temporary working dir that was removed by someone else (a cluster's
        teardown folds the removal into its own round trip)."""
        with self._lock:
            self._working_dir = None

    def _remote_path(self, path: str) -> str:
        if path.startswith("~"):
            home = str(self.info.get("home") or "")
            return posixpath.join(home, path[1:].lstrip("/")) if home else path
        return posixpath.join(self.working_dir, path)

    @property
    def env_variables(self) -> dict[str, str]:
        """Environment variables applied to every command and function on this runtime."""
        return self._env

    @env_variables.setter
    def env_variables(self, env: Mapping[str, Any]) -> None:
        self._env = _checked_env(env)

    def add_env_variables(self, env_variables: Mapping[str, Any]) -> None:
        self._env.update(_checked_env(env_variables))

    # -- tasks ----------------------------------------------------------------------------

    @property
    def tasks(self) -> list[RuntimeTask]:
        return list(self._tasks)

    @property
    def alive_task_count(self) -> int:
        return sum(1 for t in self._tasks if t.is_alive)

    @property
    def alive_task_process_count(self) -> int:
        """Async tasks still running here (what the least-busy placement compares)."""
        return self.alive_task_count

    @property
    def alive_process_count(self) -> int:
        """Async tasks still running plus open tunnels."""
        return len(self.get_processes(only_alive=True))

    @property
    def task_processes(self) -> list[RuntimeProcess]:
        """The background processes of the async tasks executed here, running or ended."""
        return [p for p in self.get_processes().values() if p.kind == TASK_PROCESS_KIND]

    @property
    def function_returns(self) -> Iterator[Any]:
        """The return values of every function step of the tasks executed here, in order
        (each task is waited for first; a failed task raises its error)."""
        for task in list(self._tasks):
            yield from task.function_returns

    @classmethod
    def is_runtime_task_process(cls, process_key: str) -> bool:
        """True when ``process_key`` names an async task's process."""
        parts = str(process_key).split(PROCESS_KEY_DELIMITER)
        return len(parts) >= 3 and parts[1] == TASK_PROCESS_KIND

    @classmethod
    def is_port_exposure_process(cls, process_key: str) -> bool:
        """True when ``process_key`` names a tunnel (``-L`` or ``-R``)."""
        parts = str(process_key).split(PROCESS_KEY_DELIMITER)
        return len(parts) == 4 and parts[1] in (PORT_FROM_RUNTIME, PORT_TO_RUNTIME)

    def get_processes(self, only_alive: bool = False) -> dict[str, RuntimeProcess]:
        """Background processes by key: async tasks (``<host>::task::<name>``) and tunnels
        (``<host>::-L::<local>::<runtime>``, ``<host>::-R::<runtime>::<local>``)."""
        found: dict[str, RuntimeProcess] = {}
        d = PROCESS_KEY_DELIMITER
        with self._lock:
            tasks, tunnels = list(self._tasks), list(self._tunnels)
        for task in tasks:
            if task.process is not None:
                key = f"{self._host}{d}{TASK_PROCESS_KIND}{d}{task.name}"
                found[key] = RuntimeProcess(key, task)
        for tunnel in tunnels:
            if isinstance(tunnel, LocalForward):
                ends = f"{PORT_FROM_RUNTIME}{d}{tunnel.local_port}{d}{tunnel.remote_port}"
            else:
                ends = f"{PORT_TO_RUNTIME}{d}{tunnel.remote_port}{d}{tunnel.local_port}"
            key = f"{self._host}{d}{ends}"
            found[key] = RuntimeProcess(key, tunnel)
        if only_alive:
            return {k: p for k, p in found.items() if p.is_alive()}
        return found

    def get_process(self, key: str) -> RuntimeProcess:
        """The process of ``key`` (see ``get_processes``); ValueError for an unknown key."""
        processes = self.get_processes()
        if key not in processes:
            raise ValueError(f"unknown process key {key!r} on {self._host}")
        return processes[key]

    def stop_process(self, key: str) -> None:
        """Stop the process of ``key``: kill its task's running command (no further step
        starts), or close its tunnel. ValueError for an unknown key."""
        self.get_process(key).terminate()

    def execute_task(
        self,
        task: RuntimeTask,
        execute_async: bool = True,
        omit_on_join: bool = False,
        debug: bool = False,
    ) -> RuntimeTask:
        """Run ``task`` here, in a background thread unless ``execute_async=False``.

        Errors of an async task are raised by ``task.join()`` (and ``Runtime.join()``).
        """
        if not isinstance(task, RuntimeTask):
            raise ValueError(f"expected a RuntimeTask, got {task!r}")
        task.omit_on_join = omit_on_join
        with self._lock:
            self._tasks.append(task)
        task._start(self, execute_async, debug)
        return task

    def execute_function(
        self,
        function: Callable[..., Any],
        execute_async: bool = False,
        debug: bool = False,
        **func_kwargs: Any,
    ) -> RuntimeTask:
        """Call ``function(**func_kwargs)`` on the host; ``function_returns`` yields the value."""
        name = getattr(function, "__name__", "function")
        task = RuntimeTask(f"{name}-{len(self._tasks)}").run_function(function, **func_kwargs)
        return self.execute_task(task, execute_async=execute_async, debug=debug)

    def send_file(
        self, local_path: str, remote_path: str | None = None, execute_async: bool = False
    ) -> RuntimeTask:
        task = RuntimeTask(f"send-file-{len(self._tasks)}").send_file(local_path, remote_path)
        return self.execute_task(task, execute_async=execute_async)

    def get_file(
        self, remote_path: str, local_path: str | None = None, execute_async: bool = False
    ) -> RuntimeTask:
        task = RuntimeTask(f"get-file-{len(self._tasks)}").get_file(remote_path, local_path)
        return self.execute_task(task, execute_async=execute_async)

    def join(self) -> None:
        """Wait for every async task not started with ``omit_on_join``; raise the first error."""
        errors = []
        for task in list(self._tasks):
            if task.omit_on_join:
                continue
            try:
                task.join()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def clear_tasks(self) -> None:
        """Forget finished tasks (running ones are kept)."""
        with self._lock:
            self._tasks = [t for t in self._tasks if t.is_alive]

    def print_log(self) -> None:
        for task in self._tasks:
            print(f"--- {self._host} / {task.name}")
            task.print_log()

    def execution_log(self, task_name: str) -> list[str]:
        for task in self._tasks:
            if task.name == task_name:
                return list(task.execution_log)
        raise ValueError(f"no task named {task_name!r} on {self._host}")

    # -- simple commands ------------------------------------------------------------------

    def echo(self, msg: str) -> str:
        return self._connection.check(commands.echo(msg)).removesuffix("\n")

    def create_tempdir(self) -> str:
        return self._connection.check(commands.make_tempdir()).strip()

    def create_dir(self, path: str) -> None:
        if not path or not str(path).strip():
            raise ValueError("path must be non-empty")
        result = self._connection.run(f"mkdir -p -- {_home_relative(path)}")
        if not result.ok:
            raise PathCreationError(path, self._host, tail(result.output, 500))

    def delete_dir(self, path: str) -> bool:
        """Remove a folder and its content; True when it is gone."""
        target = _home_relative(path)
        if path.strip() in ("/", "~", "~/", ".", ""):
            raise ValueError(f"refusing to delete {path!r}")
        return self._connection.run(f"rm -rf -- {target} && [ ! -e {target} ]").ok

    def run(self, command: str, timeout: float | None = None) -> str:
        """Run one command in the working dir with the env vars; return its output or raise."""
        task = RuntimeTask(f"run-{len(self._tasks)}").run_command(command, timeout=timeout)
        self.execute_task(task, execute_async=False)
        return task.execution_log[-1]

    # -- host facts -----------------------------------------------------------------------

    @property
    def info(self) -> dict[str, Any]:
        """Host facts from one probe: os, hostname, cpu_cores, memory, python_version, gpus."""
        with self._lock:
            if self._info is None:
                output = self._connection.check(hostinfo.probe_script(self.python_executable))
                self._info = hostinfo.parse_probe(output)
            return self._info

    @property
    def os(self) -> str:
        return str(self.info["os"])

    @property
    def hostname(self) -> str:
        return str(self.info["hostname"])

    @property
    def cpu_cores(self) -> int:
        return int(self.info["cpu_cores"])

    @property
    def memory(self) -> int:
        """Memory in bytes (the cgroup limit when lower than the machine's)."""
        return int(self.info["memory"])

    @property
    def memory_in_mb(self) -> int:
        return self.memory // (1024 * 1024)

    @property
    def python_version(self) -> str | None:
        return self.info["python_version"]

    @property
    def gpus(self) -> list[str]:
        return list(self.info["gpus"])

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    def print_info(self) -> None:
        print(f"{self._host}:")
        for key, value in self.info.items():
            print(f"  {key}: {value}")

    def check_filter(
        self,
        gpu_required: bool = False,
        min_memory: int | None = None,
        min_cpu_cores: int | None = None,
        installed_executables: str | Iterable[str] | None = None,
        filter_commands: str | Iterable[str] | None = None,
    ) -> bool:
        """True when the host has a GPU (if required), ``min_memory`` MB, ``min_cpu_cores``,
        every executable, and every filter command prints ``true`` as its last line."""
        if gpu_required and self.gpu_count == 0:
            return False
        if min_memory is not None and self.memory_in_mb < min_memory:
            return False
        if min_cpu_cores is not None and self.cpu_cores < min_cpu_cores:
            return False
        executables = _as_list(installed_executables)
        checks = _as_list(filter_commands)
        if not executables and not checks:
            return True
        output = self._connection.check(hostinfo.filter_script(executables, checks))
        found = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
        if any(found.get(f"exe:{e}") != "1" for e in executables):
            return False
        return all(
            found.get(f"cmd:{i}", "").strip().lower() == hostinfo.FILTER_TRUE
            for i in range(len(checks))
        )

    def is_valid_runtime(self) -> bool:
        """True when the host answers and has the configured Python."""
        try:
            info = self.info
        except LazyclusterError as exc:
            logger.info("%s is not a valid runtime: %s", self._host, exc)
            return False
        if info.get("python_version") is None:
            logger.info("%s has no %s", self._host, self.python_executable)
            return False
        return True

    # -- ports and tunnels ---------------------------------------------------------------

    def used_ports(self) -> set[int]:
        """Ports with a listening TCP socket on the host (one probe)."""
        if self.is_local:
            return portlib.local_used_ports()
        return portlib.parse_proc_net_tcp(self._connection.check(portlib.PROBE_COMMAND))

    def has_free_port(self, port: int) -> bool:
        return portlib.check_port(port) not in self.used_ports()

    def get_free_port(self, ports: list[int]) -> int:
        """The first port of the list that is free on the host (NoPortsLeftError if none)."""
        candidates = portlib.as_port_list(ports)
        return portlib.first_free(candidates, self.used_ports(), f"on {self._host}")

    @property
    def tunnels(self) -> list[Tunnel]:
        """Open port forwards of this runtime."""
        return [t for t in self._tunnels if not t.closed]

    def expose_port_from_runtime(self, runtime_port: int, local_port: int | None = None) -> int:
        """Forward ``127.0.0.1:local_port`` here to the host's ``127.0.0.1:runtime_port``.

        ``local_port=None`` takes any free local port. Returns the local port.
        """
        portlib.check_port(runtime_port)
        if local_port is not None:
            portlib.check_port(local_port)
        if self.is_local:
            if local_port not in (None, runtime_port):
                raise ValueError("localhost needs no tunnel: local_port must equal runtime_port")
            return runtime_port
        if local_port is not None and local_port in portlib.local_used_ports():
            raise PortInUseError(local_port, "localhost")
        master = self._live_master()
        if master is not None:
            try:
                tunnel: Tunnel = MasterForward(
                    self._ssh(), master, "-L", local_port or 0, runtime_port
                )
            except TunnelError as exc:  # paramiko's forward says why, or carries it
                logger.info("%s; paramiko forwards it", exc)
            else:
                self._tunnels.append(tunnel)
                return tunnel.local_port
        try:
            tunnel = LocalForward(self._ssh(), runtime_port, local_port or 0)
        except TunnelError as exc:  # taken since the check (an outgoing connection's port)
            cause = exc.__cause__
            if local_port and isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
                raise PortInUseError(local_port, "localhost") from None
            raise
        self._tunnels.append(tunnel)
        return tunnel.local_port

    def expose_port_to_runtime(
        self,
        local_port: int,
        runtime_port: int | None = None,
        guarded: bool = False,
        on_accept: Callable[[], None] | None = None,
    ) -> int:
        """Forward the host's ``127.0.0.1:runtime_port`` to ``127.0.0.1:local_port`` here.

        ``runtime_port=None`` lets the host pick a free port. Returns the runtime port.
        ``guarded``: only connections that processes of the login user opened there reach the
        port here (every local user of the host reaches the forward; see gates).
        ``on_accept``: called as each connection arrives (it must not block).
        """
        portlib.check_port(local_port)
        if runtime_port is not None:
            portlib.check_port(runtime_port)
        if self.is_local:
            if runtime_port not in (None, local_port):
                raise ValueError("localhost needs no tunnel: runtime_port must equal local_port")
            return local_port
        master = self._live_master() if not guarded and on_accept is None else None
        if master is not None:
            try:
                tunnel: Tunnel = MasterForward(
                    self._ssh(), master, "-R", local_port, runtime_port or 0
                )
            except TunnelError as exc:  # paramiko's forward says why, or carries it
                logger.info("%s; paramiko forwards it", exc)
            else:
                self._tunnels.append(tunnel)
                return tunnel.remote_port
        try:
            gate = LoginUserGate(self._ask) if guarded else None
            tunnel = RemoteForward(self._ssh(), local_port, runtime_port or 0, gate, on_accept)
        except TunnelError:
            if runtime_port is not None and not self.has_free_port(runtime_port):
                raise PortInUseError(runtime_port, self._host) from None
            raise
        self._tunnels.append(tunnel)
        return tunnel.remote_port

    def expose_ports(
        self, from_runtime: Sequence[int] = (), to_runtime: Sequence[int] = ()
    ) -> None:
        """Each port to the same port: the host's ``from_runtime`` ports at 127.0.0.1 here
        (as :meth:`expose_port_from_runtime`) and this machine's ``to_runtime`` ports at the
        host's 127.0.0.1 (as :meth:`expose_port_to_runtime`). On the OpenSSH master in one
        request where one runs; else, or when the master refuses any, one by one."""
        for port in [*from_runtime, *to_runtime]:
            portlib.check_port(port)
        master = self._live_master()
        local = [(p, p) for p in from_runtime]
        remote = [(p, p) for p in to_runtime]
        if master is not None and len(local) + len(remote) > 1:
            taken = set(from_runtime) & portlib.local_used_ports()
            if taken:
                raise PortInUseError(min(taken), "localhost")
            try:
                master.forward(local, remote)
            except TunnelError as exc:  # which were added is not known: none stays
                logger.info("%s; forwarding them one by one", exc)
                for pair in local:
                    with contextlib.suppress(TunnelError):
                        master.cancel(local=[pair])
                for pair in remote:
                    with contextlib.suppress(TunnelError):
                        master.cancel(remote=[pair])
            else:
                connection = self._ssh()
                self._tunnels += [
                    MasterForward(connection, master, "-L", p, p, added=True) for p in from_runtime
                ] + [MasterForward(connection, master, "-R", p, p, added=True) for p in to_runtime]
                return
        for port in from_runtime:
            self.expose_port_from_runtime(port, port)
        for port in to_runtime:
            self.expose_port_to_runtime(port, port)

    def is_port_exposure_active(self, port: int) -> bool:
        """True when a tunnel of this runtime uses ``port`` (either end) and works."""
        return any(port in (t.local_port, t.remote_port) and t.is_active for t in self.tunnels)

    def close_tunnel(self, port: int, drain: bool = False) -> None:
        """Close the tunnels of this runtime that use ``port`` at either end; ``drain``: the
        connections open on them go on until they end (see Tunnel.close)."""
        self.close_tunnels([port], drain)

    def close_tunnels(self, ports: Iterable[int], drain: bool = False) -> None:
        """:meth:`close_tunnel` for many ports; those the OpenSSH master carries are cancelled
        in one request."""
        wanted = set(ports)
        mine = [t for t in self.tunnels if {t.local_port, t.remote_port} & wanted]
        on_master = [t for t in mine if isinstance(t, MasterForward) and t.is_active]
        master = self._live_master()
        if master is not None and len(on_master) > 1:
            local = [(t.local_port, t.remote_port) for t in on_master if t.kind == "-L"]
            remote = [(t.remote_port, t.local_port) for t in on_master if t.kind == "-R"]
            try:
                master.cancel(local, remote)
            except TunnelError as exc:  # each is cancelled on its own below
                logger.info("%s", exc)
            else:
                for forward in on_master:
                    forward.forget()
        for tunnel in mine:
            tunnel.close(drain)
        self._tunnels = self.tunnels

    def settle_tunnels(self, timeout: float) -> None:
        """Return once the host's sshd handled every forward cancelled before (it does not
        answer a cancel): a port freed there is free for another process."""
        self.connection.run("true", timeout=timeout)
        master = self._live_master()
        if master is not None:
            master.settle()

    # -- the OpenSSH master ---------------------------------------------------------------

    def use_openssh(self) -> bool:
        """Carry this runtime's later forwards on an OpenSSH master (the user's ``ssh``, the
        host key pinned to the one paramiko verified; see :mod:`ssh_master`): paramiko moves
        every byte through Python, a master at about three times the rate and a third of the
        CPU. Forwards with a gate or an accept hook stay on paramiko, which sees each
        connection. False (logged) when no master can be started: paramiko carries them."""
        if self.is_local:
            return False
        with self._master_lock:
            if self._master is not None:
                return self._live_master() is not None
            connection = self._ssh()
            why = usable(connection.settings)
            master = None
            if why is None:
                key = connection.transport().get_remote_server_key()
                master = OpenSSHMaster(connection.settings, key.get_name(), key.get_base64())
                try:
                    master.start()
                except TunnelError as exc:
                    why = str(exc)
                    master.close()
                    master = None
            if master is None:
                logger.info("forwards to %s stay on paramiko: %s", self, why)
                self._master = False
                return False
            logger.info("forwards to %s on an OpenSSH master", self)
            self._master = master
            connection.on_reconnect(self._check_master)
            return True

    def _check_master(self, transport: object) -> None:
        """After our connection to the host dropped and came back: the master went through the
        same outage and may carry nothing for many seconds more; one that does not answer a
        round trip within MASTER_CHECK_TIMEOUT is started anew (see OpenSSHMaster.restart)."""
        master = self._live_master()
        if master is not None:
            master.check(MASTER_CHECK_TIMEOUT)

    def _live_master(self) -> OpenSSHMaster | None:
        master = self._master
        return master if isinstance(master, OpenSSHMaster) and master.alive else None

    def _close_master(self) -> None:
        with self._master_lock:
            master, self._master = self._master, None
        if isinstance(master, OpenSSHMaster):
            self._ssh().remove_on_reconnect(self._check_master)
            for tunnel in self._tunnels:
                if isinstance(tunnel, MasterForward):
                    tunnel.forget()
            master.close()

    def _ask(self, command: str, timeout: float) -> str:
        """A command's output (the gates' question to the host)."""
        return self._ssh().run(command, timeout=timeout).stdout

    def _ssh(self) -> SSHConnection:
        assert isinstance(self._connection, SSHConnection)
        return self._connection

    # -- lifecycle ------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Stop running tasks, remove a temporary working dir, close the connection."""
        with self._lock:
            tasks = list(self._tasks)
        for task in tasks:
            task._cancelled.set()
        deadline = time.monotonic() + CLEANUP_TIMEOUT
        alive = [t for t in tasks if t.is_alive]
        while alive and time.monotonic() < deadline:
            self._connection.kill_running()
            for task in alive:
                task.process.join(0.1)  # type: ignore[union-attr]
            alive = [t for t in alive if t.is_alive]
        if alive:
            logger.warning("tasks still running on %s after cleanup: %s", self, alive)
        with self._lock:
            if self._working_dir_is_temp and self._working_dir:
                try:
                    self._connection.check(commands.remove_tree(self._working_dir))
                    self._working_dir = None
                except LazyclusterError as exc:  # kept: a later cleanup tries again
                    logger.warning("could not remove %s on %s: %s", self._working_dir, self, exc)
            self._close_master()  # its forwards and their connections end with it
            for tunnel in self._tunnels:
                tunnel.close()
            self._tunnels = []
            self._connection.close()

    def reopen(self) -> None:
        """Make a cleaned-up runtime usable again (its connection opens on the next use), e.g.
        to retry a cleanup that could not reach the host."""
        self._connection.reopen()
        with self._master_lock:
            self._master = None  # a later tunnelled cluster may start one again

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def check_path(value: object, what: str) -> None:
    """A path or name we put on a host: text without control characters (a newline would
    silently become another path in the remote shell)."""
    if isinstance(value, str) and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{what} contains a control character: {value!r}")


def check_working_dir(working_dir: object) -> None:
    """A working dir must be a non-empty path without control characters."""
    if not isinstance(working_dir, str) or not working_dir.strip():
        raise ValueError(f"working_dir must be a non-empty string, got {working_dir!r}")
    check_path(working_dir, "working_dir")


def _home_relative(path: str) -> str:
    """Quote a path for the shell, keeping a leading ``~`` as ``$HOME``."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + q(path[2:])
    return q(path)


def _checked_env(env: Mapping[str, Any]) -> dict[str, str]:
    if not isinstance(env, Mapping):
        raise ValueError(f"env variables must be a mapping, got {env!r}")
    return {commands.check_env_name(k): str(v) for k, v in env.items()}


def _as_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)
