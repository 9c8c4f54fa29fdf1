"""lazycluster 0.2.4's public API, name by name, and the behaviour of what was added for it.

``LAZYCLUSTER_API`` lists every public class member of lazycluster 0.2.4 with its parameters
(read from its source); a missing name, a renamed or reordered parameter, a changed default, or a
property that became a method fails here unless README's "lazycluster API coverage" names it.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import socket
import sys
import threading
import types
from pathlib import Path

import pytest

import lazycluster_tasks
from lazycluster_tasks import (
    Environment,
    ExecutionFileLogUtil,
    LazyclusterError,
    NoPortsLeftError,
    NoRuntimesDetectedError,
    PathCreationError,
    Runtime,
    RuntimeGroup,
    RuntimeProcess,
    RuntimeTask,
    TaskExecutionError,
    Timestamp,
)

REQ = object()  # a parameter without default
README = Path(__file__).resolve().parent.parent / "README.md"

#: member -> ("method" | "classmethod", [(parameter, default)]) or ("property",),
#: ("property_setter",) (a property with a setter), ("attr",).
LAZYCLUSTER_API: dict[str, dict[str, tuple]] = {
    "RuntimeTask": {
        "__init__": ("method", [("name", None)]),
        "cleanup": ("method", []),
        "execution_log": ("property",),
        "execution_log_file_path": ("property",),
        "function_returns": ("property",),
        "process": ("property",),
        "env_variables": ("property_setter",),
        "send_file": ("method", [("local_path", REQ), ("remote_path", None)]),
        "get_file": ("method", [("remote_path", REQ), ("local_path", None)]),
        "run_command": ("method", [("command", REQ)]),
        "run_function": ("method", [("function", REQ), ("**", None)]),
        "execute": ("method", [("connection", REQ), ("debug", False)]),
        "join": ("method", []),
        "print_log": ("method", []),
    },
    "Runtime": {
        "WORKING_DIR_ENV_VAR_NAME": ("attr",),
        "LOCALHOST": ("attr",),
        "__init__": ("method", [("host", REQ), ("working_dir", None), ("connection_kwargs", None)]),
        "working_dir": ("property_setter",),
        "task_processes": ("property",),
        "function_returns": ("property",),
        "host": ("property",),
        "info": ("property",),
        "os": ("property",),
        "cpu_cores": ("property",),
        "memory": ("property",),
        "memory_in_mb": ("property",),
        "python_version": ("property",),
        "gpus": ("property",),
        "gpu_count": ("property",),
        "class_name": ("property",),
        "alive_process_count": ("property",),
        "alive_task_process_count": ("property",),
        "env_variables": ("property_setter",),
        "add_env_variables": ("method", [("env_variables", REQ)]),
        "is_runtime_task_process": ("classmethod", [("process_key", REQ)]),
        "is_port_exposure_process": ("classmethod", [("process_key", REQ)]),
        "is_valid_runtime": ("method", []),
        "get_free_port": ("method", [("ports", REQ)]),
        "execute_task": (
            "method",
            [("task", REQ), ("execute_async", True), ("omit_on_join", False), ("debug", False)],
        ),
        "send_file": (
            "method",
            [("local_path", REQ), ("remote_path", None), ("execute_async", False)],
        ),
        "get_file": (
            "method",
            [("remote_path", REQ), ("local_path", None), ("execute_async", False)],
        ),
        "execute_function": (
            "method",
            [("function", REQ), ("execute_async", False), ("debug", False), ("**", None)],
        ),
        "print_log": ("method", []),
        "execution_log": ("method", [("task_name", REQ)]),
        "clear_tasks": ("method", []),
        "expose_port_to_runtime": ("method", [("local_port", REQ), ("runtime_port", None)]),
        "expose_port_from_runtime": ("method", [("runtime_port", REQ), ("local_port", None)]),
        "get_process": ("method", [("key", REQ)]),
        "get_processes": ("method", [("only_alive", False)]),
        "stop_process": ("method", [("key", REQ)]),
        "has_free_port": ("method", [("port", REQ)]),
        "print_info": ("method", []),
        "check_filter": (
            "method",
            [
                ("gpu_required", False),
                ("min_memory", None),
                ("min_cpu_cores", None),
                ("installed_executables", None),
                ("filter_commands", None),
            ],
        ),
        "create_tempdir": ("method", []),
        "create_dir": ("method", [("path", REQ)]),
        "delete_dir": ("method", [("path", REQ)]),
        "join": ("method", []),
        "cleanup": ("method", []),
        "echo": ("method", [("msg", REQ)]),
    },
    "RuntimeGroup": {
        "__init__": ("method", [("runtimes", None), ("hosts", None), ("working_dir", None)]),
        "hosts": ("property",),
        "runtimes": ("property",),
        "runtime_count": ("property",),
        "task_processes": ("property",),
        "function_returns": ("property",),
        "set_env_variables": ("method", [("env_variables", REQ)]),
        "add_env_variables": ("method", [("env_variables", REQ)]),
        "print_hosts": ("method", []),
        "print_runtime_info": ("method", []),
        "fill_runtime_info_buffers_async": ("method", []),
        "add_runtime": ("method", [("host", None), ("runtime", None)]),
        "remove_runtime": ("method", [("host", REQ)]),
        "expose_port_to_runtimes": (
            "method",
            [("local_port", REQ), ("runtime_port", None), ("exclude_hosts", None)],
        ),
        "expose_port_from_runtime_to_group": (
            "method",
            [("host", REQ), ("runtime_port", REQ), ("group_port", None)],
        ),
        "execute_task": (
            "method",
            [
                ("task", REQ),
                ("host", None),
                ("broadcast", False),
                ("execute_async", True),
                ("omit_on_join", False),
                ("debug", False),
            ],
        ),
        "send_file": (
            "method",
            [("local_path", REQ), ("remote_path", None), ("execute_async", True)],
        ),
        "join": ("method", []),
        "print_log": ("method", []),
        "get_free_port": ("method", [("ports", REQ), ("enforce_check_on_localhost", False)]),
        "has_free_port": ("method", [("port", REQ), ("exclude_hosts", None)]),
        "contains_runtime": ("method", [("host", REQ)]),
        "clear_tasks": ("method", []),
        "get_runtime": ("method", [("host", None)]),
        "get_runtimes": ("method", [("include_hosts", None), ("exclude_hosts", None)]),
        "cleanup": ("method", []),
    },
    "RuntimeManager": {
        "__init__": ("method", []),
        "create_group": (
            "method",
            [
                ("include_hosts", None),
                ("exclude_hosts", None),
                ("gpu_required", False),
                ("min_memory", None),
                ("min_cpu_cores", None),
                ("installed_executables", None),
                ("filter_commands", None),
                ("working_dir", None),
            ],
        ),
        "print_runtime_info": ("method", []),
        "print_hosts": ("method", []),
        "print_inactive_hosts": ("method", []),
    },
    "MasterLauncher": {
        "__init__": ("method", [("runtime_group", REQ)]),
        "port": ("property",),
        "process": ("property",),
        "start": ("method", [("ports", REQ), ("timeout", 3), ("debug", False)]),
        "cleanup": ("method", []),
    },
    "WorkerLauncher": {
        "__init__": ("method", [("runtime_group", REQ)]),
        "ports_per_host": ("property",),
        "start": (
            "method",
            [("worker_count", REQ), ("master_port", REQ), ("ports", REQ), ("debug", False)],
        ),
        "setup_worker_ssh_tunnels": ("method", []),
        "cleanup": ("method", []),
    },
    "RuntimeCluster": {},
    "MasterWorkerCluster": {
        "DEFAULT_MASTER_PORT": ("attr",),
        "DEFAULT_PORT_RANGE_START": ("attr",),
        "DEFAULT_PORT_RANGE_END": ("attr",),
        "__init__": (
            "method",
            [
                ("runtime_group", REQ),
                ("ports", None),
                ("master_launcher", None),
                ("worker_launcher", None),
            ],
        ),
        "master_port": ("property",),
        "runtime_group": ("property",),
        "start": ("method", [("worker_count", None), ("master_port", None), ("debug", False)]),
        "start_master": ("method", [("master_port", None), ("timeout", 3), ("debug", False)]),
        "start_workers": ("method", [("count", None), ("debug", False)]),
        "print_log": ("method", []),
        "cleanup": ("method", []),
    },
    "LocalMasterLauncher": {
        "__init__": ("method", [("runtime_group", REQ)]),
        "start": ("method", [("ports", REQ), ("timeout", 3), ("debug", False)]),
        "cleanup": ("method", []),
    },
    "RoundRobinLauncher": {
        "__init__": ("method", [("runtime_group", REQ)]),
        "start": (
            "method",
            [("worker_count", REQ), ("master_port", REQ), ("ports", REQ), ("debug", False)],
        ),
        "cleanup": ("method", []),
    },
    "DaskCluster": {
        "DEFAULT_MASTER_PORT": ("attr",),
        "PIP_INSTALL_COMMAND": ("attr",),
        "__init__": (
            "method",
            [
                ("runtime_group", REQ),
                ("ports", None),
                ("master_launcher", None),
                ("worker_launcher", None),
            ],
        ),
        "get_client": ("method", [("timeout", 2)]),
        "cleanup": ("method", []),
    },
    "Environment": {
        "main_directory": ("attr",),
        "third_party_log_level": ("attr",),
        "use_dev_version": ("attr",),
        "set_main_directory": ("classmethod", [("dir", REQ)]),
        "set_third_party_log_level": ("classmethod", [("log_level", REQ)]),
        "use_lazycluster_dev_version": ("classmethod", []),
    },
    "ExecutionFileLogUtil": {
        "__init__": ("method", [("runtime_host", REQ), ("taskname", REQ)]),
        "file_path": ("property",),
        "directory_path": ("property",),
        "get_write_mode": ("method", []),
    },
    "Timestamp": {
        "__init__": ("method", []),
        "get_unformatted": ("method", []),
        "get_formatted": ("method", []),
    },
    "LazyclusterError": {"__init__": ("method", [("msg", REQ), ("predecessor_excp", None)])},
    "TaskExecutionError": {
        "__init__": (
            "method",
            [
                ("task_step_index", REQ),
                ("task", REQ),
                ("host", REQ),
                ("execution_log_file_path", REQ),
                ("output", REQ),
                ("predecessor_excp", None),
            ],
        )
    },
    "InvalidRuntimeError": {"__init__": ("method", [("host", REQ)])},
    "NoRuntimesDetectedError": {"__init__": ("method", [("predecessor_excp", None)])},
    "PortInUseError": {"__init__": ("method", [("port", REQ), ("group", None), ("runtime", None)])},
    "NoPortsLeftError": {"__init__": ("method", [])},
    "PathCreationError": {"__init__": ("method", [("path", REQ), ("host", None)])},
    "MasterStartError": {"__init__": ("method", [("host", REQ), ("port", REQ), ("cause", REQ)])},
}

#: (class, member) -> the text README's "lazycluster API coverage" must contain for it.
LEFT_OUT = {
    ("DaskCluster", "PIP_INSTALL_COMMAND"): "DaskCluster.PIP_INSTALL_COMMAND",
    ("Environment", "use_lazycluster_dev_version"): "Environment.use_lazycluster_dev_version()",
    ("LazyclusterError", "__init__"): "LazyclusterError(msg, predecessor_excp)",
    ("TaskExecutionError", "__init__"): (
        "TaskExecutionError(task_step_index, task, host, execution_log_file_path, output)"
    ),
    ("InvalidRuntimeError", "__init__"): "InvalidRuntimeError(host)",
    ("NoRuntimesDetectedError", "__init__"): "NoRuntimesDetectedError(predecessor_excp)",
    ("PortInUseError", "__init__"): "PortInUseError(port, group, runtime)",
    ("MasterStartError", "__init__"): "MasterStartError(host, port, cause)",
}
#: lazycluster names with no counterpart at all (its Hyperopt cluster, its CLI).
LEFT_OUT_NAMES = ["HyperoptCluster", "MongoLauncher", "LocalMongoLauncher", "list-runtimes"]

EXCEPTIONS = [
    "LazyclusterError",
    "TaskExecutionError",
    "InvalidRuntimeError",
    "NoRuntimesDetectedError",
    "PortInUseError",
    "NoPortsLeftError",
    "PathCreationError",
    "MasterStartError",
]


def _coverage_section() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## lazycluster API coverage\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README lacks the section '## lazycluster API coverage'"
    return " ".join(match.group(1).split())


def _signature_problems(cls: type, name: str, expected: list[tuple[str, object]]) -> list[str]:
    member = inspect.getattr_static(cls, name)
    function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
    params = list(inspect.signature(function).parameters.values())[1:]  # without self/cls
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    wanted = [(n, d) for n, d in expected if n != "**"]
    problems = []
    for index, (pname, default) in enumerate(wanted):
        if index >= len(positional):
            problems.append(f"missing parameter {pname!r}")
            continue
        ours = positional[index]
        ours_default = REQ if ours.default is inspect.Parameter.empty else ours.default
        if ours.name != pname:
            problems.append(f"parameter {index} is {ours.name!r}, lazycluster has {pname!r}")
        elif ours_default != default and not (ours_default is REQ and default is REQ):
            problems.append(f"{pname} defaults to {ours_default!r}, lazycluster: {default!r}")
    for extra in positional[len(wanted) :]:
        if extra.default is inspect.Parameter.empty:
            problems.append(f"extra parameter {extra.name!r} without default")
    for extra in params:
        if extra.kind is extra.KEYWORD_ONLY and extra.default is inspect.Parameter.empty:
            problems.append(f"extra keyword {extra.name!r} without default")
    if any(n == "**" for n, _ in expected) and not any(p.kind is p.VAR_KEYWORD for p in params):
        problems.append("no **kwargs")
    return [f"{cls.__name__}.{name}: {p}" for p in problems]


def _member_problems(cls: type, name: str, spec: tuple) -> list[str]:
    kind = spec[0]
    try:
        member = inspect.getattr_static(cls, name)
    except AttributeError:
        return [f"{cls.__name__}.{name} is missing"]
    where = f"{cls.__name__}.{name}"
    if kind == "attr":
        ok = not callable(member) and not isinstance(member, property)
        return [] if ok else [f"{where} is not a plain attribute"]
    if kind in ("property", "property_setter"):
        if not isinstance(member, property):
            return [f"{where} is not a property"]
        if kind == "property_setter" and member.fset is None:
            return [f"{where} has no setter"]
        return []
    if kind == "classmethod" and not isinstance(member, classmethod):
        return [f"{where} is not a classmethod"]
    if kind == "method" and not isinstance(member, types.FunctionType):
        if name == "__init__" and member in (Exception.__init__, BaseException.__init__):
            # Exception's own (*args): fine where lazycluster took no parameters either
            return [] if not spec[1] else [f"{where} is Exception's (*args)"]
        return [f"{where} is not a method"]
    return _signature_problems(cls, name, spec[1])


def test_every_lazycluster_name_exists_with_its_signature():
    problems = []
    for class_name, members in LAZYCLUSTER_API.items():
        cls = getattr(lazycluster_tasks, class_name, None)
        if cls is None:
            problems.append(f"lazycluster_tasks.{class_name} is missing")
            continue
        for name, spec in members.items():
            if (class_name, name) in LEFT_OUT:
                continue
            problems += _member_problems(cls, name, spec)
    assert not problems, "\n".join(problems)


def test_every_left_out_name_is_explained_in_the_readme():
    section = _coverage_section()
    for (class_name, name), text in LEFT_OUT.items():
        assert name in LAZYCLUSTER_API[class_name], (class_name, name)
        assert " ".join(text.split()) in section, f"README does not explain {text}"
    for name in LEFT_OUT_NAMES:
        assert name in section, f"README does not explain {name}"


def test_left_out_names_really_differ():
    """A name on the left-out list that gained lazycluster's signature belongs in the API test."""
    for (class_name, name), _ in LEFT_OUT.items():
        cls = getattr(lazycluster_tasks, class_name)
        if name == "__init__":
            assert _member_problems(cls, name, LAZYCLUSTER_API[class_name][name])
        else:
            assert not hasattr(cls, name), f"{class_name}.{name} exists now: test it instead"


def test_exceptions_keep_lazyclusters_tree_and_readable_context():
    for name in EXCEPTIONS:
        cls = getattr(lazycluster_tasks, name)
        assert issubclass(cls, LazyclusterError) and issubclass(LazyclusterError, Exception)
    # the calls that match lazycluster's constructors work as they did
    assert str(NoPortsLeftError()) == "" and isinstance(NoRuntimesDetectedError(), Exception)
    assert LazyclusterError("plain message").msg == "plain message"
    error = PathCreationError("/some/path", "host-1")
    assert (error.path, error.host) == ("/some/path", "host-1") and "host-1" in error.msg
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise LazyclusterError("outer") from inner
    except LazyclusterError as outer:
        assert isinstance(outer.predecessor_excp, KeyError)
    assert LazyclusterError("no cause").predecessor_excp is None


# -- function_returns --------------------------------------------------------------------------


def test_group_function_returns_iterates_every_group_task_in_start_order(group):
    """lazycluster's preprocessing example: ``for data in group.function_returns: ...``."""
    assert isinstance(inspect.getattr_static(RuntimeGroup, "function_returns"), property)

    def shard(index):
        import socket
        import time

        time.sleep(1)  # still running when the next shard is placed
        return {"shard": index, "host": socket.gethostname()}

    for index in range(4):  # async, least-busy placement: one per host
        group.execute_task(RuntimeTask(f"shard-{index}").run_function(shard, index=index))
    two_steps = RuntimeTask("two").run_function(lambda: "a").run_command("true")
    two_steps.run_function(lambda: "b")
    group.execute_task(two_steps, host="host2", execute_async=False)
    broadcast = group.execute_function(lambda: 7, broadcast=True)
    # a task the runtime ran directly is not the group's
    group.get_runtime("host3").execute_function(lambda: "direct")

    returns = group.function_returns
    assert isinstance(returns, types.GeneratorType)
    data = list(returns)
    assert [d["shard"] for d in data[:4]] == [0, 1, 2, 3]
    assert sorted(d["host"] for d in data[:4]) == group.hosts  # spread over the hosts
    assert data[4:] == ["a", "b", *[7] * len(broadcast)]
    assert list(group.function_returns) == data  # reading again gives the same values


def test_group_function_returns_waits_for_async_tasks_and_raises_their_errors(group):
    def slow(value):
        import time

        time.sleep(0.5)
        return value

    def broken():
        raise ValueError("bad shard")

    group.execute_task(RuntimeTask("slow").run_function(slow, value="late"), host="host1")
    assert next(group.function_returns) == "late"
    group.execute_task(RuntimeTask("broken").run_function(broken), host="host2")
    values = group.function_returns
    assert next(values) == "late"
    with pytest.raises(TaskExecutionError) as info:
        next(values)
    assert info.value.host == "host2" and isinstance(info.value.predecessor_excp, ValueError)
    assert info.value.task_step_index == info.value.step_index == 0
    group.clear_tasks()
    assert list(group.function_returns) == []


def test_runtime_function_returns_in_execution_order(any_runtime):
    assert isinstance(inspect.getattr_static(Runtime, "function_returns"), property)
    any_runtime.execute_function(lambda: 1)
    any_runtime.execute_task(RuntimeTask("cmd").run_command("true"), execute_async=False)
    any_runtime.execute_task(RuntimeTask("two").run_function(lambda: 2).run_function(lambda: 3))
    any_runtime.execute_function(lambda x: x * 2, execute_async=True, x=2)
    assert list(any_runtime.function_returns) == [1, 2, 3, 4]


# -- processes ---------------------------------------------------------------------------------


def test_task_processes_get_and_stop_by_key(any_runtime):
    host = any_runtime.host
    key = f"{host}::task::sleeper"
    assert any_runtime.get_processes() == {} and any_runtime.alive_process_count == 0
    any_runtime.execute_task(RuntimeTask("quick").run_command("true"), execute_async=False)
    assert any_runtime.task_processes == []  # a synchronous task has no process
    sleeper = RuntimeTask("sleeper").run_command("sleep 30").run_command("echo never")
    any_runtime.execute_task(sleeper)
    assert list(any_runtime.get_processes()) == [key]
    process = any_runtime.get_process(key)
    assert isinstance(process, RuntimeProcess) and process.kind == "task"
    assert process.is_alive() and any_runtime.task_processes[0].key == key
    assert any_runtime.alive_task_process_count == any_runtime.alive_process_count == 1
    assert Runtime.is_runtime_task_process(key) and not Runtime.is_port_exposure_process(key)
    any_runtime.stop_process(key)
    process.join(10)
    assert not process.is_alive()
    assert any_runtime.get_processes(only_alive=True) == {}
    assert list(any_runtime.get_processes()) == [key]  # ended processes stay listed
    assert any_runtime.alive_task_process_count == any_runtime.alive_process_count == 0
    with pytest.raises(TaskExecutionError):
        sleeper.join(10)
    assert sleeper.execution_log[1:] == []  # the step after the killed one never ran
    with pytest.raises(ValueError, match="unknown process key"):
        any_runtime.get_process(f"{host}::task::nope")
    with pytest.raises(ValueError, match="unknown process key"):
        any_runtime.stop_process("nope")


def test_tunnels_are_processes_with_lazyclusters_keys(host1):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        local = server.getsockname()[1]
        runtime_port = host1.expose_port_to_runtime(local)
        forwarded = host1.expose_port_from_runtime(runtime_port)  # back here: a round trip
        to_key = f"host1::-R::{runtime_port}::{local}"
        from_key = f"host1::-L::{forwarded}::{runtime_port}"
        assert set(host1.get_processes()) == {to_key, from_key}
        assert Runtime.is_port_exposure_process(to_key) and Runtime.is_port_exposure_process(
            from_key
        )
        assert not Runtime.is_runtime_task_process(from_key)
        assert host1.alive_process_count == 2 and host1.alive_task_process_count == 0
        assert host1.task_processes == []
        thread = _serve_once(server, b"round trip")
        with socket.create_connection(("127.0.0.1", forwarded), timeout=5) as client:
            assert client.recv(10) == b"round trip"
        thread.join(5)
        host1.stop_process(from_key)
        assert not host1.get_process(from_key).is_alive()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", forwarded), timeout=2).close()
        assert list(host1.get_processes(only_alive=True)) == [to_key]
        host1.stop_process(to_key)
        assert host1.alive_process_count == 0 and host1.tunnels == []


def test_group_task_processes_and_least_busy_placement(group):
    tasks = [
        group.execute_task(RuntimeTask(f"nap-{i}").run_command("sleep 30"))
        for i in range(group.runtime_count)
    ]
    assert sorted(t._runtime.host for t in tasks) == group.hosts  # type: ignore[union-attr]
    processes = group.task_processes
    assert sorted(p.key for p in processes) == sorted(
        f"{h}::task::nap-{i}" for i, h in enumerate(t._runtime.host for t in tasks)
    )
    assert all(p.is_alive() for p in processes)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(10)
    assert not any(p.is_alive() for p in group.task_processes)


# -- working dir, constants, execute -------------------------------------------------------------


def test_working_dir_setter_moves_the_runtime(any_runtime, tmp_path):
    assert Runtime.WORKING_DIR_ENV_VAR_NAME == "WORKING_DIR" and Runtime.LOCALHOST == "localhost"
    assert any_runtime.class_name == "Runtime"
    temp = any_runtime.working_dir
    tmp_path.chmod(0o755)
    target = str(tmp_path / "new wd; $(x)" / "deeper")
    any_runtime.working_dir = target
    assert any_runtime.working_dir == target and os.path.isdir(target)
    created = [target, os.path.dirname(target)]  # made by us: the user's alone
    assert {os.stat(p).st_mode & 0o777 for p in created} == {0o700}
    assert os.stat(tmp_path).st_mode & 0o777 == 0o755  # an existing parent: left as it was
    assert any_runtime.run("pwd; echo $WORKING_DIR").split("\n")[:2] == [target, target]
    probe = Runtime("localhost")
    assert not probe.connection.run(f"test -e {temp}").ok  # the temporary dir is gone
    with pytest.raises(ValueError):
        any_runtime.working_dir = " "
    with pytest.raises(PathCreationError):
        any_runtime.working_dir = "/proc/lct/nope"
    assert any_runtime.working_dir == target  # unchanged by the failed move
    any_runtime.cleanup()
    assert os.path.isdir(target)  # a given working dir is kept


def test_working_dir_setter_refuses_while_tasks_run(any_runtime, tmp_path):
    task = any_runtime.execute_task(RuntimeTask("busy").run_command("sleep 30"))
    try:
        with pytest.raises(ValueError, match="busy"):
            any_runtime.working_dir = str(tmp_path)
    finally:
        task.cleanup()
        with pytest.raises(TaskExecutionError):
            task.join(10)


def test_execute_on_a_runtime_and_on_a_bare_connection(any_runtime, capsys):
    task = RuntimeTask("direct").run_command("echo on-$WORKING_DIR").run_function(lambda: 5)
    task.execute(any_runtime, debug=True)
    assert task.execution_log[0].strip() == f"on-{any_runtime.working_dir}"
    assert f"on-{any_runtime.working_dir}" in capsys.readouterr().out
    assert list(task.function_returns) == [5] and any_runtime.tasks == []
    assert os.path.exists(task.execution_log_file_path)

    bare = RuntimeTask("bare").run_command("pwd")
    bare.execute(any_runtime.connection)
    home = any_runtime.connection.check("pwd").strip()
    assert bare.execution_log[0].strip() == home
    failing = RuntimeTask("fails").run_command("true").run_command("exit 3")
    with pytest.raises(TaskExecutionError) as info:
        failing.execute(any_runtime.connection)
    assert info.value.exit_code == 3 and info.value.task_step_index == 1
    with pytest.raises(ValueError):
        RuntimeTask("x").execute("localhost")  # type: ignore[arg-type]


def test_task_logs_and_env_are_lazyclusters_properties(tmp_path):
    task = RuntimeTask("props")
    for name in ("execution_log", "execution_log_file_path"):
        with pytest.raises(AttributeError):
            setattr(task, name, None)
    task.env_variables = {"LCT_A": "it's", "LCT_B": 2}
    assert task.env_variables == {"LCT_A": "it's", "LCT_B": "2"}
    with pytest.raises(ValueError):
        task.env_variables = {"BAD NAME": "x"}
    runtime = Runtime("localhost", working_dir=str(tmp_path))
    try:
        runtime.execute_task(task.run_command('printf "%s" "$LCT_A$LCT_B"'), execute_async=False)
    finally:
        runtime.cleanup()
    assert task.execution_log == ["it's2"]


# -- group ports -------------------------------------------------------------------------------


def _serve_once(server: socket.socket, payload: bytes) -> threading.Thread:
    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(payload)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_expose_port_to_runtimes_picks_the_first_free_port_of_a_list(group):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        local = server.getsockname()[1]
        with pytest.raises(NoPortsLeftError):
            group.expose_port_to_runtimes(local, [22])  # sshd listens on every host
        port = group.expose_port_to_runtimes(local, [22, 7381, 7382], exclude_hosts=["host4"])
        assert port == 7381
        code = f"import socket; print(socket.create_connection(('127.0.0.1', {port})).recv(9))"
        for host in ("host1", "host3"):
            thread = _serve_once(server, host.encode())
            out = group.get_runtime(host).run(f"{sys.executable} -c {code!r}")
            thread.join(5)
            assert out.strip() == repr(host.encode())
        assert [t.kind for t in group.get_runtime("host2").tunnels] == ["-R"]
        assert group.get_runtime("host4").tunnels == []
        assert "host2::-R::7381::" in " ".join(group.get_runtime("host2").get_processes())


# -- utils -------------------------------------------------------------------------------------


def test_environment_and_log_file_helpers(tmp_path):
    previous_dir = Environment.main_directory
    paramiko_level = logging.getLogger("paramiko").level
    try:
        Environment.set_main_directory(dir=str(tmp_path / "main"))
        assert Environment.main_directory == str(tmp_path / "main")
        Environment.set_third_party_log_level(log_level=logging.ERROR)
        assert Environment.third_party_log_level == logging.ERROR
        assert logging.getLogger("paramiko").level == logging.ERROR
        assert Environment.use_dev_version is False

        stamp = Timestamp()
        assert re.fullmatch(r"\d{14}", stamp.get_unformatted())
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", stamp.get_formatted())
        assert stamp.get_formatted().replace("-", "").replace(" ", "").replace(":", "") == (
            stamp.get_unformatted()
        )

        util = ExecutionFileLogUtil("host-1", "my task/1")
        assert util.directory_path == str(tmp_path / "main" / "execution_log" / "host-1")
        assert os.path.isdir(util.directory_path)
        assert os.path.dirname(util.file_path) == util.directory_path
        assert re.fullmatch(r"my_task_1_\d{14}\.log", os.path.basename(util.file_path))
        assert util.get_write_mode() == "w+"
        Path(util.file_path).write_text("x")
        assert util.get_write_mode() == "a"

        runtime = Runtime("localhost", working_dir=str(tmp_path))
        try:
            task = runtime.execute_task(RuntimeTask("logged").run_command("true"), False)
        finally:
            runtime.cleanup()
        assert task.execution_log_file_path.startswith(
            str(tmp_path / "main" / "execution_log" / "localhost")
        )
        with pytest.raises(ValueError):
            Environment.set_main_directory(dir="")
    finally:
        Environment.set_main_directory(previous_dir)
        logging.getLogger("paramiko").setLevel(paramiko_level)
