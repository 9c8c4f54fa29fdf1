"""Runtime and RuntimeTask on the local runtime and on real SSH test hosts."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import stat
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazycluster_tasks import (
    AuthenticationError,
    HostConnectionError,
    HostKeyError,
    InvalidRuntimeError,
    OperationTimeoutError,
    PathCreationError,
    RemoteEnvironmentError,
    Runtime,
    RuntimeTask,
    TaskExecutionError,
    ssh,
)
from lazycluster_tasks.testing.helpers import send_until_cut, ssh_runtime, wait_until

NASTY = [
    "with space",
    "it's",
    'dq"uote',
    "$(touch /tmp/lct-pwned)",
    "`touch /tmp/lct-pwned`",
    "a;b",
]


def test_echo_and_info(any_runtime):
    assert any_runtime.echo("hello $(world) `x`; y") == "hello $(world) `x`; y"
    assert any_runtime.cpu_cores >= 1
    assert any_runtime.memory_in_mb > 100
    assert any_runtime.python_version and any_runtime.python_version.count(".") == 2
    assert any_runtime.gpus == [] and any_runtime.gpu_count == 0
    assert any_runtime.os


def test_ssh_host_reports_its_own_hostname(host1, test_hosts):
    assert host1.hostname == "host1"
    assert host1.echo("$HOSTNAME") == "$HOSTNAME"
    assert host1.run("hostname").strip() == ("host1" if test_hosts.namespaced else os.uname()[1])


def test_temp_working_dir_is_created_and_removed(any_runtime):
    wd = any_runtime.working_dir
    assert any_runtime.run("pwd").strip() == wd
    assert any_runtime.run("echo $WORKING_DIR").strip() == wd
    any_runtime.cleanup()
    probe = Runtime("localhost")
    assert not probe.connection.run(f"test -e {wd}").ok


def test_given_working_dir_is_kept(any_runtime, tmp_path):
    given_dir = str(tmp_path / "a dir; with $(stuff)")
    runtime = Runtime(
        any_runtime.host,
        working_dir=given_dir,
        ssh_config_path=getattr(any_runtime.connection, "settings", None)
        and any_runtime.connection.settings.ssh_config_path,
    )
    try:
        assert runtime.run("pwd").strip() == given_dir
    finally:
        runtime.cleanup()
    assert os.path.isdir(given_dir)


def test_working_dir_that_cannot_be_created(any_runtime):
    runtime = Runtime("localhost", working_dir="/proc/lct/nope")
    with pytest.raises(PathCreationError, match="/proc/lct/nope"):
        _ = runtime.working_dir


@pytest.mark.parametrize("value", NASTY)
def test_env_values_stay_literal(any_runtime, value):
    any_runtime.add_env_variables({"LCT_VALUE": value})
    assert any_runtime.run('printf "%s" "$LCT_VALUE"') == value
    assert not os.path.exists("/tmp/lct-pwned")


def test_task_chain_log_and_returns(any_runtime, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("payload")
    task = (
        RuntimeTask("chain")
        .send_file(str(source), "in.txt")
        .run_command("cat in.txt; echo; echo to-stderr >&2")
        .run_function(lambda a, b: {"sum": a + b, "host": os.uname()[1]}, a=2, b=3)
        .get_file("in.txt", str(tmp_path / "back.txt"))
    )
    task.env_variables = {"TASK_ONLY": "1"}
    returned = any_runtime.execute_task(task, execute_async=False)
    assert returned is task
    assert len(task.execution_log) == 4
    assert "payload" in task.execution_log[1] and "to-stderr" in task.execution_log[1]
    (result,) = list(task.function_returns)
    assert result["sum"] == 5
    assert (tmp_path / "back.txt").read_text() == "payload"
    assert any_runtime.execution_log("chain") == task.execution_log
    assert os.path.exists(task.execution_log_file_path)


def test_failing_step_carries_host_step_command_exit_code_and_output(any_runtime):
    task = RuntimeTask("fails").run_command("true").run_command("echo before-fail; exit 7")
    any_runtime.execute_task(task)  # async: the error surfaces on join
    with pytest.raises(TaskExecutionError) as info:
        task.join()
    err = info.value
    assert (err.host, err.step_index, err.exit_code) == (any_runtime.host, 1, 7)
    assert err.command == "echo before-fail; exit 7" and "before-fail" in err.output
    with pytest.raises(TaskExecutionError):
        any_runtime.join()


def test_command_timeout_kills_the_remote_command(any_runtime):
    marker = f"lct-timeout-{time.time_ns()}"
    start = time.monotonic()
    with pytest.raises(OperationTimeoutError) as info:
        any_runtime.run(f"echo started; sleep 30 # {marker}", timeout=1)
    assert time.monotonic() - start < 5
    assert "started" in info.value.output
    check = Runtime("localhost")
    pattern = marker.replace("lct-", "lc[t]-")  # a pattern that does not match the pgrep line
    assert wait_until(lambda: not check.connection.run(f"pgrep -f {pattern}").ok, timeout=5)


def test_function_returning_and_raising(any_runtime):
    task = any_runtime.execute_function(lambda x: [x, x * 2], x=21)
    assert list(task.function_returns) == [[21, 42]]

    def broken():
        print("about to fail")
        raise KeyError("missing key")

    with pytest.raises(TaskExecutionError) as info:
        any_runtime.execute_function(broken)
    assert isinstance(info.value.__cause__, KeyError)
    assert "KeyError" in info.value.output and "about to fail" in info.value.output


def test_host_without_cloudpickle_gets_a_clear_error(any_runtime, tmp_path):
    import sys

    wrapper = tmp_path / "bare-python"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    any_runtime.python_executable = str(wrapper)
    with pytest.raises(RemoteEnvironmentError, match="cloudpickle is not importable"):
        any_runtime.execute_function(lambda: 1)
    any_runtime.python_executable = "/nonexistent/python"
    with pytest.raises(RemoteEnvironmentError, match="not found"):
        any_runtime.execute_function(lambda: 1)


def test_folder_round_trip_with_awkward_names(any_runtime, tmp_path):
    source = tmp_path / "src dir"
    (source / "sub $(x)").mkdir(parents=True)
    (source / "top.txt").write_text("top")
    (source / "sub $(x)" / "it's;deep.txt").write_text("deep")
    any_runtime.send_file(str(source), "copied folder")
    assert any_runtime.run("cat 'copied folder/sub $(x)/it'\\''s;deep.txt'") == "deep"
    target = tmp_path / "back"
    any_runtime.get_file("copied folder", str(target))
    assert (target / "top.txt").read_text() == "top"
    assert (target / "sub $(x)" / "it's;deep.txt").read_text() == "deep"


def test_dirs_and_tempdirs(any_runtime):
    temp = any_runtime.create_tempdir()
    nested = f"{temp}/a b/c"
    any_runtime.create_dir(nested)
    assert any_runtime.connection.run(f"test -d '{nested}'").ok
    assert any_runtime.delete_dir(temp)
    assert not any_runtime.connection.run(f"test -e '{temp}'").ok
    with pytest.raises(ValueError):
        any_runtime.delete_dir("/")


def test_check_filter(any_runtime):
    assert any_runtime.check_filter(installed_executables=["sh"], filter_commands=["echo true"])
    assert not any_runtime.check_filter(installed_executables="no-such-exe-lct")
    assert not any_runtime.check_filter(filter_commands=["echo false"])
    assert not any_runtime.check_filter(gpu_required=True)
    assert any_runtime.check_filter(min_memory=1, min_cpu_cores=1)
    assert not any_runtime.check_filter(min_memory=10**9)
    assert not any_runtime.check_filter(min_cpu_cores=10**4)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError):
        RuntimeTask().run_command("")
    with pytest.raises(ValueError):
        RuntimeTask().send_file("")
    with pytest.raises(ValueError):
        RuntimeTask().get_file("  ")
    with pytest.raises(ValueError):
        Runtime("")
    with pytest.raises(ValueError, match="invalid environment variable name"):
        Runtime("localhost").add_env_variables({"BAD NAME": "x"})


def test_context_manager_cleans_up(test_hosts, no_leftovers):
    with ssh_runtime(test_hosts) as runtime:
        wd = runtime.working_dir
        runtime.execute_task(RuntimeTask("bg").run_command("sleep 60"), omit_on_join=True)
        assert wait_until(lambda: runtime.connection.running_groups())
        runtime.join()  # omitted tasks are not waited for
    with ssh_runtime(test_hosts) as check:
        assert not check.connection.run(f"test -e {wd}").ok
    # no_leftovers proves the sleep was killed


# -- SSH specifics -----------------------------------------------------------------------


def test_connection_dropped_mid_session_reconnects(host1, test_hosts):
    assert host1.echo("one") == "one"
    assert host1.connection.connect_count == 1
    assert test_hosts.kill_sessions("host1") >= 1
    assert host1.echo("two") == "two"
    assert host1.connection.connect_count == 2


def test_input_sent_on_a_path_that_is_cut_fails_within_the_connections_limit(
    host1, test_hosts, monkeypatch
):
    """A cut while a command's input streams, once the socket's buffer fills before the
    host's window runs out (a small buffer here; load can leave one): the send ends within
    UNACKNOWLEDGED_LIMIT (3 s here), in words (where the window ran out first, as under the
    suite's load, the keep-alive asked after 1 s gets no answer within it); the next command
    connects anew, and the runtime's cleanup kills the command the drop left there. (Before,
    paramiko retried the send until the kernel gave up, about 15 minutes.)"""
    monkeypatch.setattr(ssh, "UNACKNOWLEDGED_LIMIT", 3)
    monkeypatch.setattr(ssh, "KEEPALIVE_SECONDS", 1)  # where the host's window ran out first
    host1.connection.run("true")
    sock = host1.connection.transport().sock
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2**15)
    try:
        took, failed = send_until_cut(
            host1.connection, lambda: test_hosts.cut_host("host1"), ssh.UNACKNOWLEDGED_LIMIT + 30
        )
    finally:
        test_hosts.restore_host("host1")
    assert took < ssh.KEEPALIVE_SECONDS + ssh.UNACKNOWLEDGED_LIMIT + 10, took
    assert isinstance(failed, HostConnectionError), failed
    assert "dropped while a command" in str(failed)
    assert host1.echo("again") == "again"
    assert host1.connection.connect_count == 2
    assert [pid for _, pid in host1.connection._lost]  # its `cat`: killed by the cleanup


def test_a_dropped_command_is_killed_only_while_its_pid_is_still_its_own(host1, test_hosts) -> None:
    """What a drop left is killed by its pid and the tag of its connection in the command
    line of the group's leader: a process group that took that pid since is left alone."""
    other = ssh_runtime(test_hosts)  # another connection: its commands carry another tag
    pid = int(other.connection.check("setsid sleep 60 >/dev/null 2>&1 </dev/null & echo $!"))
    try:
        host1.connection._lost.append((None, pid))  # as if the bystander had taken the pid
        host1.connection.kill_running()
        time.sleep(0.3)
        alive = other.connection.run(f"kill -0 {pid}")
        assert alive.ok, "a process that is not the command's was killed"
        assert not host1.connection._lost  # tried once
    finally:
        other.connection.run(f"kill {pid}")
        other.cleanup()


def test_an_idle_connection_answers_its_keep_alives_and_is_kept(
    test_hosts, no_leftovers, no_local_leaks, monkeypatch, caplog
):
    """Silent for KEEPALIVE_SECONDS (0.5 s here), a connection is asked for an answer; sshd
    gives one at once, and the connection serves on."""
    monkeypatch.setattr(ssh, "KEEPALIVE_SECONDS", 0.5)
    caplog.set_level(logging.DEBUG, logger="paramiko.transport")
    with ssh_runtime(test_hosts) as runtime:
        assert runtime.echo("one") == "one"
        denied = "Global request denied"  # sshd's answer to a keep-alive

        def answers() -> int:
            return sum(denied in r.getMessage() for r in caplog.records)

        assert wait_until(lambda: answers() >= 3, 10), "no keep-alive answered"
        assert runtime.echo("two") == "two"
        assert runtime.connection.connect_count == 1
    assert not [r for r in caplog.records if "did not answer" in r.getMessage()]


def test_a_host_that_cannot_start_a_process_is_a_clear_transient_error(host1, test_hosts):
    assert host1.echo("one") == "one"
    with test_hosts.process_limit("host1"):
        with pytest.raises(HostConnectionError, match="host1 refused to run a command") as info:
            host1.echo("two")
        assert info.value.transient
    assert host1.echo("three") == "three"  # the same connection serves again
    assert host1.connection.connect_count == 1


def test_more_commands_at_once_than_sshd_allows_sessions_take_turns(host1, test_hosts, caplog):
    limit = int(test_hosts.sshd_option("host1", "MaxSessions"))  # per connection: 10 by default
    assert limit < 14  # more commands than sessions
    caplog.set_level(logging.DEBUG, logger="paramiko.transport")
    with concurrent.futures.ThreadPoolExecutor(14) as pool:
        runs = [
            pool.submit(host1.connection.run, f"sleep 0.5; echo {i}", timeout=30) for i in range(14)
        ]
        assert [r.result().stdout for r in runs] == [f"{i}\n" for i in range(14)]
    assert host1.connection.connect_count == 1
    refusals = [r for r in caplog.records if "open FAILED" in r.getMessage()]
    assert refusals and all(r.levelno == logging.DEBUG for r in refusals)  # handled: no ERROR
    # learnt as sshd's own, not lowered by refusals of sessions it had not finished closing
    assert host1.connection._session_limit == limit
    # a command whose turn does not come within its timeout says why
    with concurrent.futures.ThreadPoolExecutor(limit + 1) as pool:
        slow = [pool.submit(host1.connection.run, "sleep 3", timeout=30) for _ in range(limit)]
        time.sleep(0.5)
        with pytest.raises(OperationTimeoutError, match="allows no more sessions"):
            host1.connection.run("echo late", timeout=1)
        assert all(s.result().ok for s in slow)


def test_a_request_to_run_a_command_that_gets_no_answer_is_bounded(host1, test_hosts):
    connection = host1.connection
    assert host1.echo("one") == "one"
    session = next(p for p in test_hosts._listener("host1").children())
    channel = connection.open_session()
    session.suspend()  # the channel is open; its sshd will not answer the request
    try:
        start = time.monotonic()
        with pytest.raises(HostConnectionError, match="did not answer a request to run"):
            connection._exec(channel, "true")
        assert time.monotonic() - start < connection.settings.connect_timeout + 2
    finally:
        session.resume()
    assert host1.echo("two") == "two"  # on a new connection: the hung one was dropped
    assert connection.connect_count == 2


def test_unknown_host_key_is_refused(test_hosts, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    runtime = ssh_runtime(test_hosts, connection_kwargs={"known_hosts": str(empty)})
    with pytest.raises(HostKeyError, match="unknown") as info:
        runtime.echo("x")
    assert isinstance(info.value, InvalidRuntimeError) and info.value.host == "host1"
    trusting = ssh_runtime(
        test_hosts, connection_kwargs={"known_hosts": str(empty), "host_key_policy": "auto-add"}
    )
    assert trusting.echo("ok") == "ok"
    trusting.cleanup()


def test_changed_host_key_is_refused(multi_hosts, tmp_path):
    h1, h2 = multi_hosts.host("host1"), multi_hosts.host("host2")
    lines = multi_hosts.known_hosts_path.read_text().splitlines()
    h2_key = next(line.split(None, 1)[1] for line in lines if line.split()[0] == h2.address)
    forged = tmp_path / "known_hosts"
    forged.write_text(f"{h1.address} {h2_key}\n")
    runtime = ssh_runtime(
        multi_hosts, connection_kwargs={"known_hosts": str(forged), "host_key_policy": "auto-add"}
    )
    with pytest.raises(HostKeyError, match="CHANGED"):
        runtime.echo("x")


def test_wrong_key_is_an_authentication_error(test_hosts, tmp_path):
    import subprocess

    key = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    runtime = ssh_runtime(test_hosts, connection_kwargs={"key_filename": str(key)})
    with pytest.raises(AuthenticationError, match="authentication to host1"):
        runtime.echo("x")


def test_jump_host(multi_hosts, no_leftovers):
    multi_hosts.restrict_ssh("host2", ["host1"])
    try:
        direct = ssh_runtime(multi_hosts, "host2", connection_kwargs={"connect_timeout": 2})
        with pytest.raises(HostConnectionError):
            direct.echo("x")
        jumped = ssh_runtime(multi_hosts, "host2", connection_kwargs={"proxy_jump": "host1"})
        try:
            assert jumped.hostname == "host2"
            assert jumped.run("hostname").strip() == "host2"
        finally:
            jumped.cleanup()
    finally:
        multi_hosts.restrict_ssh("host2", None)


def test_refused_and_hung_hosts_fail_fast(multi_hosts):
    multi_hosts.stop_sshd("host3")
    try:
        runtime = ssh_runtime(multi_hosts, "host3", connection_kwargs={"connect_timeout": 2})
        with pytest.raises(HostConnectionError) as info:
            runtime.echo("x")
        assert info.value.transient
        assert not runtime.is_valid_runtime()
    finally:
        multi_hosts.start_sshd("host3")
    multi_hosts.pause_sshd("host3")
    try:
        runtime = ssh_runtime(multi_hosts, "host3", connection_kwargs={"connect_timeout": 2})
        start = time.monotonic()
        with pytest.raises(HostConnectionError):
            runtime.echo("x")
        assert time.monotonic() - start < 6
    finally:
        multi_hosts.resume_sshd("host3")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.text(
        alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\x00"),
        min_size=1,
        max_size=30,
    ).filter(lambda s: s not in (".", "..")),
    value=st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
    ),
)
def test_generated_paths_and_env_values_stay_literal_over_ssh(test_hosts, name, value):
    runtime = _shared_runtime(test_hosts)
    runtime.env_variables = {"V": value}
    out = runtime.run('printf "%s" "$V" > "$WORKING_DIR/value"; printf "%s" "$V"')
    assert out == value
    runtime.create_dir(f"{runtime.working_dir}/{name}")
    listing = runtime.connection.run(f"ls -A {runtime.working_dir!r}").stdout.splitlines()
    assert name in listing
    runtime.delete_dir(f"{runtime.working_dir}/{name}")


_RUNTIMES: dict[int, Runtime] = {}


def _shared_runtime(test_hosts) -> Runtime:
    # one connection for all hypothesis examples; cleaned up by the next test's fixture below
    key = id(test_hosts)
    if key not in _RUNTIMES:
        _RUNTIMES[key] = ssh_runtime(test_hosts)
    return _RUNTIMES[key]


def test_zz_cleanup_shared_runtime(test_hosts, no_leftovers):
    runtime = _RUNTIMES.pop(id(test_hosts), None)
    if runtime is not None:
        runtime.cleanup()
