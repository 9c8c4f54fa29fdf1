"""RuntimeGroup and RuntimeManager on the multi-host harness."""

from __future__ import annotations

import time

import pytest

from lazycluster_tasks import (
    GroupError,
    HostConnectionError,
    NoRuntimesDetectedError,
    RuntimeGroup,
    RuntimeManager,
    RuntimeTask,
    TaskExecutionError,
)


def test_broadcast_runs_an_independent_copy_per_host(group):
    task = RuntimeTask("whoami").run_command("hostname")
    tasks = group.execute_task(task, broadcast=True, execute_async=False)
    assert len(tasks) == group.runtime_count == 4
    assert len({id(t) for t in tasks}) == 4 and task.execution_log == []
    assert sorted(t.execution_log[0].strip() for t in tasks) == group.hosts


def test_broadcast_function_returns_one_value_per_host(group):
    import socket

    tasks = group.execute_function(socket.gethostname, broadcast=True)
    assert [next(t.function_returns) for t in tasks] == group.hosts


def test_fan_out_is_concurrent(group):
    group.execute_task(RuntimeTask("warm").run_command("true"), broadcast=True, execute_async=False)
    start = time.monotonic()
    group.execute_task(
        RuntimeTask("nap").run_command("sleep 1"), broadcast=True, execute_async=False
    )
    assert time.monotonic() - start < 2.0


def test_partial_failure_keeps_the_other_results(group):
    task = RuntimeTask("some-fail").run_command('[ "$(hostname)" != host2 ] || exit 4; hostname')
    with pytest.raises(GroupError) as info:
        group.execute_task(task, broadcast=True, execute_async=False)
    err = info.value
    assert set(err.errors) == {"host2"} and isinstance(err.errors["host2"], TaskExecutionError)
    assert err.errors["host2"].exit_code == 4
    assert sorted(err.results) == ["host1", "host3", "host4"]
    assert err.results["host3"].execution_log[0].strip() == "host3"
    assert "host2" in str(err)


def test_unreachable_host_is_reported_per_host(multi_hosts, no_leftovers):
    multi_hosts.stop_sshd("host4")
    try:
        g = RuntimeGroup(
            hosts=["host1", "host4"],
            ssh_config_path=str(multi_hosts.ssh_config_path),
            connection_kwargs={"connect_timeout": 2},
        )
        with pytest.raises(GroupError) as info:
            g.execute_task(
                RuntimeTask("t").run_command("true"), broadcast=True, execute_async=False
            )
        assert list(info.value.errors) == ["host4"]
        assert isinstance(info.value.errors["host4"], HostConnectionError)
        assert list(info.value.results) == ["host1"]
        g.get_runtime("host1").cleanup()
    finally:
        multi_hosts.start_sshd("host4")


def test_placement_and_membership(group):
    busy = group.execute_task(RuntimeTask("busy").run_command("sleep 5"), host="host1")
    assert isinstance(busy, RuntimeTask)
    assert group.get_runtime().host != "host1"  # least busy
    assert set(group.get_runtimes(exclude_hosts=["host1"])) == {"host2", "host3", "host4"}
    assert set(group.get_runtimes(include_hosts="host2")) == {"host2"}
    with pytest.raises(ValueError, match="not in the group: nope"):
        group.get_runtimes(include_hosts=["nope"])
    assert group.contains_runtime("host3") and not group.contains_runtime("host9")
    runtime = group.get_runtime("host4")
    group.remove_runtime("host4")
    assert group.hosts == ["host1", "host2", "host3"]
    group.add_runtime(runtime=runtime)
    with pytest.raises(ValueError, match="already in the group"):
        group.add_runtime(runtime=runtime)
    group.get_runtime("host1").cleanup()  # kills the sleeping task


def test_env_and_working_dir_apply_to_every_host(multi_hosts, no_leftovers, tmp_path):
    wd = str(tmp_path / "shared wd")
    g = RuntimeGroup(
        hosts=[h.name for h in multi_hosts.hosts],
        working_dir=wd,
        ssh_config_path=str(multi_hosts.ssh_config_path),
    )
    try:
        g.set_env_variables({"A": "1"})
        g.add_env_variables({"B": "it's"})
        tasks = g.execute_task(
            RuntimeTask("env").run_command('echo "$A|$B|$(pwd)"'),
            broadcast=True,
            execute_async=False,
        )
        assert {t.execution_log[0].strip() for t in tasks} == {f"1|it's|{wd}"}
    finally:
        g.cleanup()


def test_send_and_get_files_on_every_host(group, tmp_path):
    source = tmp_path / "data.txt"
    source.write_text("shared")
    group.send_file(str(source), execute_async=False)
    group.execute_task(
        RuntimeTask("tag").run_command('echo "$(cat data.txt)@$(hostname)" > data.txt'),
        broadcast=True,
        execute_async=False,
    )
    group.get_file("data.txt", str(tmp_path / "back"))
    for host in group.hosts:
        assert (tmp_path / "back" / host / "data.txt").read_text().strip() == f"shared@{host}"


def test_info_buffers_and_printing(group, capsys):
    group.fill_runtime_info_buffers_async()
    group.print_runtime_info()
    group.print_hosts()
    out = capsys.readouterr().out
    assert all(f"hostname: {h}" in out for h in group.hosts)


def test_async_errors_surface_on_group_join(group):
    group.execute_task(RuntimeTask("bad").run_command("exit 9"), host="host3")
    with pytest.raises(GroupError) as info:
        group.join()
    assert list(info.value.errors) == ["host3"]


def test_manager_discovers_hosts_and_filters(multi_hosts, no_leftovers):
    multi_hosts.stop_sshd("host4")
    try:
        manager = RuntimeManager(str(multi_hosts.ssh_config_path), connect_timeout=2)
    finally:
        multi_hosts.start_sshd("host4")
    try:
        assert manager.inactive_hosts == ["host4"]
        assert manager.hosts == ["host1", "host2", "host3"]
        group = manager.create_group(exclude_hosts=["host1"], min_cpu_cores=1, min_memory=64)
        assert group.hosts == ["host2", "host3"]
        assert manager.create_group(
            filter_commands=['[ "$(hostname)" = host3 ] && echo true']
        ).hosts == ["host3"]
        assert manager.create_group(installed_executables=["sh"]).runtime_count == 3
        with pytest.raises(NoRuntimesDetectedError, match="inactive: host4"):
            manager.create_group(gpu_required=True)
    finally:
        for host in manager.hosts:
            manager.create_group(include_hosts=[host]).cleanup()
