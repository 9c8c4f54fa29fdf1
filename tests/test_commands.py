"""Command lines are pure strings: check them as strings and run them through a real /bin/sh."""

import contextlib
import io
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazycluster_tasks import commands, hostinfo, processes
from lazycluster_tasks.security import ClusterTLS, TLSPaths, cluster_tls
from lazycluster_tasks.testing.helpers import wait_until

NASTY = ["a b", "it's", 'say "hi"', "$(touch /tmp/pwned)", "`id`", "a;b", "x\ny", "*", "~", "-rf"]


def sh(line: str) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/sh", "-c", line], capture_output=True, text=True, timeout=10)


@pytest.mark.parametrize("value", NASTY)
def test_wrap_command_keeps_env_values_and_dirs_literal(tmp_path, value):
    folder = tmp_path / value.replace("/", "_").replace("\n", "_")
    folder.mkdir()
    line = commands.wrap_command('printf "%s|" "$V"; pwd', str(folder), {"V": value})
    result = sh(line)
    pid, rest = result.stdout.split("\n", 1)
    assert pid.isdigit()
    assert rest == f"{value}|{folder}\n"


def test_wrap_command_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        commands.wrap_command("   ")
    with pytest.raises(ValueError, match="invalid environment variable name: 'A B'"):
        commands.wrap_command("true", env={"A B": "x"})


def test_missing_working_dir_exits_with_its_own_code(tmp_path):
    result = sh(commands.wrap_command("echo never", str(tmp_path / "missing")))
    assert result.returncode == commands.EXIT_NO_WORKDIR
    assert "never" not in result.stdout


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")))
def test_echo_round_trips_any_text(text):
    result = subprocess.run(["/bin/sh", "-c", commands.echo(text)], capture_output=True, timeout=10)
    assert result.stdout.decode() == text + "\n"


def test_remove_tree_refuses_root():
    for path in ("", "/", "~"):
        with pytest.raises(ValueError):
            commands.remove_tree(path)


def test_kill_group_terminates_a_process_group():
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    result = sh(commands.kill_group([proc.pid], grace=1.0))
    assert result.returncode == 0
    assert proc.wait(timeout=5) != 0


def test_a_guard_that_outlasts_the_stops_wait_is_killed_and_none_is_not_waited_for():
    """The stop waits for the guard it asked for a revoke a bounded time, then KILLs it (its
    edit is safe at any moment; the stop then edits itself); with no guard it waits not at all
    (a wait of 60 s would outlast the shell's 10 s timeout)."""
    proc = subprocess.Popen(
        ["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"], start_new_session=True
    )
    time.sleep(0.2)  # let the shell install its trap
    result = sh(f"gp={proc.pid}; s=0; kill -TERM $gp; {commands.await_guard(0.3)}; echo s=$s")
    assert result.stdout.split() == ["s=0"], result
    assert proc.wait(timeout=5) == -9
    assert sh(f"gp=; s=0; {commands.await_guard(60)}; echo s=$s").stdout.split() == ["s=0"]


def test_a_stopped_group_acts_on_the_term_it_gets():
    """A group stopped (SIGSTOP, a job-control stop) gets CONT after its TERM: it runs its own
    shutdown rather than waiting out the grace for the KILL."""
    proc = subprocess.Popen(
        ["/bin/sh", "-c", "trap 'exit 3' TERM; while :; do sleep 0.05; done"],
        start_new_session=True,
    )
    time.sleep(0.2)  # let the shell install its trap
    os.killpg(proc.pid, signal.SIGSTOP)
    assert wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED, 5)
    result = sh(commands.kill_group([proc.pid], grace=5.0))
    assert result.returncode == 0 and result.stdout == ""
    assert proc.wait(timeout=5) == 3  # its trap ran: TERM, not the KILL after the grace


def test_a_stopped_guard_asked_for_a_revoke_acts_on_it(tmp_path):
    """The stop's TERM reaches a stopped guard with a CONT: it answers (here: writes the answer
    file, as the guard does after its edit) and ends, and is not KILLed after the wait."""
    folder = tmp_path / "lazycluster-stopped"
    folder.mkdir()
    ask, answer = folder / "revoke.ask", folder / "revoke.answer"
    guard = subprocess.Popen(
        ["/bin/sh", "-c", f"trap 'cat {ask} >{answer}; exit 0' TERM; while :; do sleep 0.05; done",
         str(folder)],
        start_new_session=True,
    )  # fmt: skip
    (folder / commands.GUARD_PID).write_text(f"{guard.pid}\n")
    time.sleep(0.2)  # let the shell install its trap
    os.kill(guard.pid, signal.SIGSTOP)
    assert wait_until(lambda: psutil.Process(guard.pid).status() == psutil.STATUS_STOPPED, 5)
    line = commands.ask_guard(str(folder), str(ask), str(answer), "lazycluster-link-x")
    result = sh(f"s=0; {line}; {commands.await_guard(5)}; echo s=$s")
    assert result.stdout.split() == ["s=0"], result
    assert guard.wait(timeout=5) == 0  # it ended by itself
    assert answer.read_text() == "lazycluster-link-x\n"


def test_kill_group_escalates_to_sigkill():
    proc = subprocess.Popen(
        ["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.05; done"], start_new_session=True
    )
    time.sleep(0.2)  # let the shell install its trap
    result = sh(commands.kill_group([proc.pid], grace=0.3))
    assert result.returncode == 0 and result.stdout == ""  # nothing survived SIGKILL
    assert proc.wait(timeout=5) == -9


def test_kill_group_without_a_grace_kills_at_once():
    # a group that would exit on TERM: with a grace of 0 it gets KILL, not TERM
    proc = subprocess.Popen(
        ["/bin/sh", "-c", "trap 'exit 3' TERM; while :; do sleep 0.05; done"],
        start_new_session=True,
    )
    time.sleep(0.2)  # let the shell install its trap
    result = sh(commands.kill_group([proc.pid], grace=0))
    assert result.returncode == 0 and result.stdout == ""
    assert proc.wait(timeout=5) == -9


def test_a_group_of_zombies_is_not_waited_for_in_the_grace():
    """A group whose processes ended but were not reaped yet (its parent is slow to, as this
    machine's init was) is gone: the stop does not wait its grace for it."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    os.setsid()\n"
            "    os._exit(0)\n"
            "print(pid, flush=True)\n"
            "time.sleep(60)\n",  # never reaps it
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        zombie = int(parent.stdout.readline())
        assert wait_until(lambda: psutil.Process(zombie).status() == psutil.STATUS_ZOMBIE, 5)
        started = time.monotonic()
        result = sh(commands.kill_group([zombie], grace=20))
        took = time.monotonic() - started
    finally:
        parent.kill()
        parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()
    assert result.returncode == 0 and result.stdout == ""
    assert took < 10, took  # the grace was 20 s


def _group_members(pgid: int) -> list[int]:
    """Processes of a group that are not zombies."""
    return [
        p.pid
        for p in psutil.process_iter(["status"])
        if p.info["status"] != psutil.STATUS_ZOMBIE and _pgid(p.pid) == pgid
    ]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_kill_group_finds_members_left_after_their_leader_ended():
    # the leader exits at once (a zombie: we do not reap it yet); its child ignores TERM
    proc = subprocess.Popen(
        ["/bin/sh", "-c", "(trap '' TERM; while :; do sleep 0.05; done) & exit 0"],
        start_new_session=True,
    )
    assert wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE)
    assert _group_members(proc.pid)
    result = sh(commands.kill_group([proc.pid], grace=0.3))
    assert result.returncode == 0 and result.stdout == ""
    assert wait_until(lambda: not _group_members(proc.pid))
    proc.wait(timeout=5)


def test_a_killed_group_whose_leader_stays_a_zombie_is_known_gone_at_the_first_poll(tmp_path):
    # some inits reap orphans a second or more late (this machine's PID 1: about 1.3 s), so a
    # stop's process listing, which tells such a zombie from a survivor, runs from the first
    # poll after the KILL on: at once when the leader is a zombie already, else after one short
    # pause; every pause is a ``sleep``, counted here by a wrapper that runs the real one
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)  # reaped only at the end
    shims, count = tmp_path / "bin", tmp_path / "pauses"
    shims.mkdir()
    wrapper = shims / "sleep"
    real = shutil.which("sleep")
    assert real is not None
    wrapper.write_text(f'#!/bin/sh\necho >>{shlex.quote(str(count))}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    line = f"PATH={shlex.quote(str(shims))}:$PATH; {commands.kill_group([proc.pid], grace=0)}"
    try:
        result = sh(line)
        assert result.returncode == 0 and result.stdout == ""
        assert psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE  # still unreaped
        pauses = count.read_text().splitlines() if count.exists() else []
        assert len(pauses) <= 1, pauses
    finally:
        proc.kill()
        proc.wait(timeout=5)


def test_groups_killed_first_get_no_term_and_no_grace(tmp_path):
    """A stop's ``kill_first`` groups (the workers of a cluster whose scheduler closes) are
    KILLed at once: no TERM, and when only they are in the folder no grace is waited (no
    ``sleep`` of the grace is started); the others still get their TERM and grace."""
    folder = tmp_path / "cluster"
    folder.mkdir()
    marker = f"{folder}/"
    shims, count = tmp_path / "bin", tmp_path / "pauses"
    shims.mkdir()
    real = shutil.which("sleep")
    assert real is not None
    shim = f'#!/bin/sh\necho "$@" >>{shlex.quote(str(count))}\nexec {real} "$@"\n'
    (shims / "sleep").write_text(shim)
    (shims / "sleep").chmod(0o755)

    def start(name: str) -> subprocess.Popen:
        said = tmp_path / f"{name}.term"
        trap = f"trap 'echo >{shlex.quote(str(said))}; exit 0' TERM"
        code = f"{trap}; while :; do sleep 1; done; : {marker}"
        proc = subprocess.Popen(["/bin/sh", "-c", code], start_new_session=True)
        started.append(proc)
        assert wait_until(lambda: _runs_with(proc.pid, marker))
        (folder / f"{name}.pid").write_text(f"{proc.pid}\n")
        return proc

    def stop(kill_first: list[int]) -> list[str]:
        count.unlink(missing_ok=True)
        line = commands.stop_folder(str(folder), grace=5.0, kill_first=kill_first)
        result = sh(f"PATH={shlex.quote(str(shims))}:$PATH; {line}")
        assert result.returncode == 0 and "left=" not in result.stdout, result
        return count.read_text().split() if count.exists() else []

    started: list[subprocess.Popen] = []
    first, other = start("first"), start("other")
    try:
        pauses = stop([first.pid])
        assert first.wait(timeout=5) == -signal.SIGKILL
        assert other.wait(timeout=5) == 0 and (tmp_path / "other.term").exists()  # its TERM
        assert "5" in pauses  # the grace, for the one that got a TERM
        alone = start("alone")
        pauses = stop([alone.pid])
        assert alone.wait(timeout=5) == -signal.SIGKILL
        assert "5" not in pauses and len(pauses) <= 1, pauses  # no grace at all
        assert not list(folder.glob("*.pid"))
    finally:
        for proc in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def _runs_with(pid: int, text: str) -> bool:
    """Process ``pid`` has exec'd a command line holding ``text`` (right after a fork it still
    runs the parent's)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return text.encode() in handle.read()
    except OSError:
        return False


def test_kill_marked_kills_only_groups_whose_leader_has_the_marker_and_does_not_wait(tmp_path):
    marker = f"{tmp_path}/cluster folder/"
    ours = subprocess.Popen(["/bin/sh", "-c", "sleep 30; : " + marker], start_new_session=True)
    reused = subprocess.Popen(["sleep", "30"], start_new_session=True)  # a pid reused since
    assert wait_until(lambda: _runs_with(ours.pid, marker))  # exec'd: its command line is ours
    try:
        with pytest.raises(ValueError, match="no pids"):
            commands.kill_marked([], marker)
        result = sh(commands.kill_marked([ours.pid, reused.pid], marker))
        assert result.returncode == 0 and result.stdout == ""
        assert ours.wait(timeout=5) == -signal.SIGKILL
        assert wait_until(lambda: not _group_members(ours.pid))  # its sleep too: the group
        assert reused.poll() is None
        assert "sleep" not in commands.kill_marked([ours.pid], marker)  # nothing waits
    finally:
        reused.kill()
        reused.wait()


def test_stop_pid_files_stops_only_groups_whose_leader_has_the_marker(tmp_path):
    marker = f"{tmp_path}/cluster-folder/"
    ours = subprocess.Popen(["/bin/sh", "-c", "sleep 30; : " + marker], start_new_session=True)
    reused = subprocess.Popen(["sleep", "30"], start_new_session=True)  # a pid reused since
    assert wait_until(lambda: _runs_with(ours.pid, marker))  # exec'd: its command line is ours
    files = []
    for name, proc in (("ours.pid", ours), ("reused.pid", reused)):
        (tmp_path / name).write_text(f"{proc.pid}\n")
        files.append(str(tmp_path / name))
    try:
        result = sh(commands.stop_pid_files(files, marker, grace=0.3))
        assert result.returncode == 0 and "left=" not in result.stdout
        assert ours.wait(timeout=5) != 0
        assert reused.poll() is None
        assert not any(Path(f).exists() for f in files)  # stale files go with the stop
    finally:
        reused.kill()
        reused.wait()


def test_start_detached_prints_the_pid_and_writes_the_pid_file(tmp_path):
    log, pidfile = tmp_path / "out log", tmp_path / "pid file"
    line = commands.start_detached(
        ["sh", "-c", "echo started; sleep 30"], str(tmp_path), str(log), str(pidfile)
    )
    result = sh(line)
    pid = int(result.stdout.strip())
    try:
        assert int(pidfile.read_text()) == pid
        assert sh(f"ps -o pgid= -p {pid}").stdout.strip() == str(pid)  # its own process group
    finally:
        sh(commands.kill_group([pid], grace=1))


def test_probe_parser_applies_cgroup_limits():
    output = "\n".join(
        [
            "hostname=h1",
            "kernel=Linux 6.1",
            "os_release=Debian GNU/Linux 12 (bookworm)",
            "cpu_online=8",
            "cpu_max=150000 100000",
            "mem_total_kb=1024",
            "mem_limit=524288",
            "python=Python 3.11.7",
            "python_path=/usr/bin/python3",
            "gpu=NVIDIA A100",
            "gpu=NVIDIA A100",
        ]
    )
    info = hostinfo.parse_probe(output)
    assert info["cpu_cores"] == 2
    assert info["memory"] == 524288
    assert info["python_version"] == "3.11.7"
    assert info["gpus"] == ["NVIDIA A100", "NVIDIA A100"]
    assert info["os"].startswith("Debian")


def test_probe_parser_without_limits_or_python():
    info = hostinfo.parse_probe(
        "cpu_online=4\ncpu_max=max 100000\nmem_total_kb=2048\nmem_limit=max\n"
    )
    assert info["cpu_cores"] == 4 and info["memory"] == 2048 * 1024
    assert info["python_version"] is None and info["gpus"] == []


def test_probe_script_runs_on_this_machine():
    result = sh(hostinfo.probe_script("/bin/does-not-exist"))
    info = hostinfo.parse_probe(result.stdout)
    assert info["cpu_cores"] >= 1 and info["memory"] > 0 and info["python_version"] is None


@given(st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True), st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=20), max_size=3))  # fmt: skip
@settings(max_examples=10, deadline=None)
def test_files_and_env_reach_a_detached_process_through_stdin_only(tmp_path_factory, env):
    folder = str(tmp_path_factory.mktemp("start") / "lazycluster-x")
    files = {
        "tls/key.pem": "-----BEGIN PRIVATE KEY-----\nsecret\n",
        "p.env": commands.env_file(env),
    }
    start = commands.start_detached(
        ["/bin/sh", "-c", "env > seen.txt"], folder, f"{folder}/p.log", f"{folder}/p.pid", "p.env"
    )
    line = " && ".join([commands.private_folder(folder), commands.unpack_stdin(folder), start])
    # a value may be part of the line's own text (e.g. "null" of /dev/null): not a leak
    assert "secret" not in line and (not env or commands.env_file(env) not in line)
    done = subprocess.run(["/bin/sh", "-c", line], input=processes._archive(files), timeout=10)
    assert done.returncode == 0
    seen = Path(folder, "seen.txt")
    deadline = time.monotonic() + 5
    while not (seen.exists() and seen.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.02)
    text = seen.read_bytes().decode()  # as written: read_text() would turn "\r\n" into "\n"
    for key, value in env.items():
        assert f"{key}={value}" in text
    assert Path(folder, "tls/key.pem").read_text() == files["tls/key.pem"]
    modes = {p: stat.S_IMODE(os.stat(Path(folder, p)).st_mode) for p in ("", "tls", "tls/key.pem")}
    assert modes == {"": 0o700, "tls": 0o700, "tls/key.pem": 0o600}


def test_an_archive_cannot_write_outside_the_folder():
    with pytest.raises(ValueError, match="outside"):
        processes._archive({"../x": "y"})
    with pytest.raises(ValueError, match="outside"):
        processes._archive({"/etc/x": "y"})


def test_a_users_own_security_is_delivered_or_referenced():
    from distributed import Security

    made = Security.temporary()  # PEM contents: delivered like ours
    tls = ClusterTLS.from_security(made)
    assert set(tls.files("worker")) == {"tls/ca.pem", "tls/worker-cert.pem", "tls/worker-key.pem"}
    assert tls.paths("/w", "master").key == "/w/tls/master-key.pem"
    assert "PRIVATE" not in repr(tls)
    files = {"tls_worker_cert": "/etc/c.pem", "tls_worker_key": "/etc/k.pem"}
    on_disk = Security(tls_ca_file="/etc/ca.pem", **files)
    tls = ClusterTLS.from_security(on_disk)  # paths: already on every host, used as they are
    assert tls.files("worker") == {}
    assert tls.paths("/w", "worker") == TLSPaths("/etc/ca.pem", "/etc/c.pem", "/etc/k.pem")
    with pytest.raises(ValueError, match="tls_ca_file"):
        ClusterTLS.from_security(Security(**files))
    with pytest.raises(ValueError, match="security must be"):
        cluster_tls("yes")
    assert cluster_tls(False) is None


def test_workers_get_the_controllers_prefect_credentials():
    from prefect.settings import PREFECT_API_KEY, temporary_settings

    from lazycluster_tasks.prefect.tasks import _credentials

    with temporary_settings(updates={PREFECT_API_KEY: "pnu_test"}):
        assert _credentials() == {"PREFECT_API_KEY": "pnu_test"}


def test_leader_states_tell_running_from_ended_and_zombie():
    running = subprocess.Popen(["sleep", "30"])
    zombie = subprocess.Popen(["true"])
    assert wait_until(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE)
    try:
        done = sh(commands.leader_states({"r": running.pid, "z": zombie.pid, "gone": 2**22 + 7}))
        assert done.stdout.split() == ["r=1", "z=0", "gone=0"]
    finally:
        running.kill()
        running.wait()
        zombie.wait()


def test_a_tree_removal_that_fails_for_a_moment_is_tried_again(tmp_path):
    """A folder that cannot be removed at once (here a mount inside it, gone 50 ms later; on
    hosts sharing a temp dir, another host's last writes) is removed by the second try."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("the passing failure is a mount: needs root")
    tree = tmp_path / "lazycluster-x"
    busy = tree / "busy"
    busy.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(busy)], check=True)
    (busy / "file").write_text("x")
    umount = subprocess.Popen(["sh", "-c", f"sleep 0.05; umount {shlex.quote(str(busy))}"])
    try:
        ran = subprocess.run(["sh", "-c", commands.remove_tree(str(tree))], timeout=10)
    finally:
        umount.wait(timeout=10)
        subprocess.run(["umount", str(busy)], stderr=subprocess.DEVNULL, check=False)
    assert ran.returncode == 0 and not tree.exists()


def test_the_bundle_runs_compiled_on_this_python_and_from_its_sources_on_another(tmp_path):
    """The zip application carries each module compiled by this interpreter beside its source:
    a Python of this minor version runs the compiled code (even with the sources broken), one
    whose magic number differs compiles the sources."""
    from lazycluster_tasks import hostside

    with zipfile.ZipFile(io.BytesIO(hostside.bundle())) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    ours = [n for n in entries if n.startswith("lazycluster_tasks/hostside/")]
    assert sorted(n for n in ours if n.endswith(".pyc")) == sorted(
        f"lazycluster_tasks/hostside/{m}.pyc" for m in hostside.MODULES
    )
    broken = {n: b"raise SystemExit('ran from source')\n" for n in ours if n.endswith(".py")}
    other_python = {n: b"\0\0\r\n" + entries[n][4:] for n in ours if n.endswith(".pyc")}

    def guard_help(changes: dict[str, bytes]) -> subprocess.CompletedProcess[str]:
        path = tmp_path / hostside.BUNDLE
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in {**entries, **changes}.items():
                archive.writestr(name, data)
        argv = [*commands.guard_argv(sys.executable, str(tmp_path), str(path))[:5], "--help"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    for changes in ({}, broken, other_python):
        ran = guard_help(changes)
        assert ran.returncode == 0 and ran.stdout.startswith("usage:"), ran.stderr
    assert guard_help({**broken, **other_python}).stderr.strip() == "ran from source"


def test_a_guard_starts_without_site_or_the_environments_builder(tmp_path):
    """A guard starts on every host at every start, beside the booting workers: it loads no
    site-packages (``-I -S``) and not the environments' builder (``envs``, which it needs only
    once it cleans up by itself), so its interpreter costs about a third less CPU."""
    from lazycluster_tasks import hostside

    path = tmp_path / hostside.BUNDLE
    path.write_bytes(hostside.bundle())
    python, *flags, bundle, program = commands.guard_argv(sys.executable, str(tmp_path), str(path))[
        :5
    ]
    argv = [python, *flags, "-X", "importtime", bundle, program, "--help"]
    ran = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and ran.stdout.startswith("usage:"), ran.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in ran.stderr.splitlines()}
    assert "lazycluster_tasks.hostside.authorized_keys" in imported  # loaded for its revoke
    assert not imported & {"site", "lazycluster_tasks.hostside.envs", "subprocess"}


def test_a_folder_gets_one_guard_however_often_processes_start_there(tmp_path):
    """Each start starts the folder's guard unless its pid file names a live process whose
    command line names the folder (a stranger on a reused pid does not count); a guard started
    in a race with another ends at once (the folder's guard lock), and the pid file names the
    one that watches."""
    from lazycluster_tasks import hostside

    folder = tmp_path / "lazycluster-g"
    folder.mkdir()
    (folder / hostside.BUNDLE).write_bytes(hostside.bundle())
    worker = subprocess.Popen(["sleep", "30", f"{folder}/"])  # the cluster's process
    (folder / "host1-0.pid").write_text(f"{worker.pid}\n")
    guard = processes.Guard(sys.executable)
    line = commands.ensure_guard(guard.argv(str(folder)), str(folder))
    stranger = subprocess.Popen(["sleep", "30"])
    (folder / commands.GUARD_PID).write_text(f"{stranger.pid}\n")  # a reused pid

    def guards() -> list[psutil.Process]:
        return [
            p
            for p in psutil.process_iter(["cmdline"])
            if f"{folder}/{hostside.BUNDLE}" in " ".join(p.info["cmdline"] or [])
            and p.status() != psutil.STATUS_ZOMBIE
        ]

    try:
        for _ in range(3):
            done = sh(line)
            assert done.returncode == 0 and done.stdout == "", done.stderr
        assert wait_until(lambda: len(guards()) == 1)
        (watching,) = guards()
        named = lambda: (folder / commands.GUARD_PID).read_text().strip()  # noqa: E731
        assert wait_until(lambda: named() == str(watching.pid))
        assert watching.pid != stranger.pid
    finally:
        for proc in guards():
            proc.kill()
        for proc in (worker, stranger):
            proc.kill()
            proc.wait()


def test_a_program_gets_input_longer_than_a_command_line_allows():
    """The links' authorized_keys lines outgrew a command line at 32 hosts ("Argument list too
    long"): they go on stdin after the program, whatever their length."""
    program = (
        "import sys, hashlib\n"
        "data = sys.stdin.read()\n"
        "print(sys.argv[1:], len(data.splitlines()), hashlib.sha256(data.encode()).hexdigest())\n"
    )
    lines = [f'restrict,permitopen="127.0.0.1:{60000 + i}" key{i}' for i in range(20000)]
    data = "".join(f"{line}\n" for line in lines)
    assert len(data) > 4 * 128 * 1024  # more than one argument (or the whole command) may hold
    line = commands.python_program_with_input(sys.executable, ["--marker", "m x"])
    done = subprocess.run(
        ["/bin/sh", "-c", line],
        input=program.encode() + b"\0" + data.encode(),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    import hashlib

    expected = f"['--marker', 'm x'] 20000 {hashlib.sha256(data.encode()).hexdigest()}"
    assert done.stdout.decode().strip() == expected


def test_the_open_files_limit_is_raised_for_a_large_cluster():
    """A soft limit of 256 (hard 4096) is raised to what 100 hosts need, not past the hard
    limit; a need above the hard limit stops at it."""
    probe = (
        "import resource\n"
        "from lazycluster_tasks import limits\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))\n"
        "print(limits.ensure_open_files(limits.open_files_for(100)),\n"
        "      resource.getrlimit(resource.RLIMIT_NOFILE)[0],\n"
        "      limits.ensure_open_files(100000), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    from lazycluster_tasks import limits

    needed = limits.open_files_for(100)
    assert done.stdout.split() == [str(needed), str(needed), "4096", "4096"]


def test_any_python_runs_the_first_python3_on_the_path(tmp_path: Path) -> None:
    """A host with python3.9 only (no python3 link) still runs the program; none: exit 127."""
    fake = tmp_path / "python3.9"
    fake.write_text('#!/bin/sh\necho "ran $0 $*"\n')
    fake.chmod(0o755)
    line = commands.any_python("-c 'print(1)' x")
    ran = subprocess.run(
        ["/bin/sh", "-c", line], env={"PATH": str(tmp_path)}, capture_output=True, text=True
    )
    assert ran.returncode == 0 and ran.stdout == f"ran {fake} -c print(1) x\n", ran
    (tmp_path / "python3.8").symlink_to(fake)
    first = commands.any_python("-V", first=["python3.8"])
    ran = subprocess.run(
        ["/bin/sh", "-c", first], env={"PATH": str(tmp_path)}, capture_output=True, text=True
    )
    assert ran.stdout.startswith(f"ran {tmp_path / 'python3.8'}"), ran  # first= goes first
    empty = tmp_path / "empty"
    empty.mkdir()
    none = subprocess.run(
        ["/bin/sh", "-c", line], env={"PATH": str(empty)}, capture_output=True, text=True
    )
    assert none.returncode == 127 and "no python3 on the PATH" in none.stderr


def test_stop_edits_in_a_folder_already_gone_is_no_error(tmp_path):
    """A cleanup tried again finds the folder removed: writing its flag fails quietly (a failed
    redirection of ``:`` would end the whole line in a POSIX shell) and nothing is killed."""
    shells = [s for s in ("/bin/sh", "dash", "bash") if shutil.which(s)]  # those this has
    for shell in shells:
        line = commands.stop_edits(f"{tmp_path}/gone/", "stopping", "edit-*.pid")
        done = subprocess.run(
            [shell, "-c", f"{line}; echo after=$?"], capture_output=True, text=True
        )
        assert done.returncode == 0 and done.stdout == "after=0\n" and not done.stderr, done
    assert not (tmp_path / "gone").exists()
