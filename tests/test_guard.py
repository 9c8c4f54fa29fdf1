"""A host's guard (hostside.guard), run here on real processes and files: once a cluster has no
process left on the host, it ends what is left, removes the folder and revokes the keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lazycluster_tasks import commands, hostside, link_commands
from lazycluster_tasks.hostside import authorized_keys as ak
from lazycluster_tasks.hostside import guard as guard_module
from lazycluster_tasks.links import LinkKey
from lazycluster_tasks.testing.helpers import fill, small_disk, wait_until

MARKER = link_commands.peer_marker("guarded")
USER = b"ssh-ed25519 AAAAC3NzaUser1 alice@laptop\n"


def _process(folder: Path, name: str, names_folder: bool = True) -> subprocess.Popen:
    """A process in its own group with its pid file in ``folder``; its command line names the
    folder unless ``names_folder`` is false (a pid reused by a stranger since)."""
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    proc = subprocess.Popen(
        [*argv, f"{folder}/x"] if names_folder else argv, start_new_session=True
    )
    (folder / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home whose authorized_keys holds a user's key and two lines of the cluster's."""
    ssh = tmp_path / "home" / ".ssh"
    ssh.mkdir(parents=True)
    (ssh / "authorized_keys").write_bytes(USER)
    lines = [
        link_commands.authorized_line(
            LinkKey.generate().public, f"{MARKER}/{h}@host1", [], [1], [1]
        )
        for h in ("host2", "host3")
    ]
    ak.set_lines(MARKER, lines, 600, str(ssh / "authorized_keys"))
    return tmp_path / "home"


def guard(folder: Path, home: Path, *args: str, bundled: bool = False) -> subprocess.Popen:
    """The guard of ``folder``; ``bundled``: as a cluster runs it, from the zip application in
    the folder (which its clean-up moves and removes)."""
    if bundled:
        (folder / hostside.BUNDLE).write_bytes(hostside.bundle())
        argv = commands.guard_argv(sys.executable, str(folder), str(folder / hostside.BUNDLE))
    else:
        argv = [sys.executable, "-m", "lazycluster_tasks.hostside.guard", "--folder", str(folder)]
    argv += ["--key-marker", MARKER, "--pause", "0.2", "--quiet", "0.5", "--sweep", "0.3", *args]
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    return subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)


def _seen(folder: Path) -> None:
    """Once the guard runs (its pid file, written at its start: a loaded machine may take
    seconds to start it), it looks every 0.2 s: after 0.8 s it saw what runs in ``folder``."""
    assert wait_until(lambda: (folder / "guard.pid").exists(), 20)
    time.sleep(0.8)


def test_the_guard_cleans_up_once_the_last_process_of_the_cluster_ended(
    tmp_path: Path, home: Path
) -> None:
    working = tmp_path / "lazycluster-tmpwd"  # made for the cluster: removed once empty
    folder = working / "lazycluster-guarded"
    (folder / "tls").mkdir(parents=True)
    (folder / "tls" / "worker.key").write_text("PRIVATE KEY")
    workers = [_process(folder, "host1-0"), _process(folder, "host1-1")]
    master = _process(folder, "link-host1-host2")  # a link's master: not a reason to stay
    stranger = _process(folder, "host1-2", names_folder=False)  # a pid reused since
    # the cluster's hold on an environment (hostside.envs), which the guard's clean-up ends
    lease = home / ".cache" / "lazycluster" / "envs" / "k1" / "leases" / folder.name
    lease.parent.mkdir(parents=True)
    lease.touch()
    watcher = guard(folder, home, "--remove", str(working), bundled=True)
    procs = [*workers, master, stranger, watcher]
    try:
        _seen(folder)
        assert watcher.poll() is None and master.poll() is None  # workers run: it waits
        workers[0].kill()
        workers[0].wait()
        time.sleep(1.0)
        assert watcher.poll() is None and folder.exists()  # one still runs
        workers[1].send_signal(signal.SIGKILL)
        workers[1].wait()
        started = time.monotonic()
        _, err = watcher.communicate(timeout=10)
        assert watcher.returncode == 0, err
        print(f"cleaned {time.monotonic() - started:.1f} s after the last worker ended")
        assert master.wait(timeout=5) == -signal.SIGTERM  # the link it dialled ended
        assert stranger.poll() is None  # not the cluster's: left alone
        assert not working.exists()  # the folder with its keys, and the working dir
        assert not lease.exists() and lease.parent.exists()
        assert (home / ".ssh" / "authorized_keys").read_bytes() == USER
        assert f"{MARKER} removed" in err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("asked", "answers"),
    [
        (MARKER, True),  # every line of the cluster (a home shared by several hosts)
        (f"{MARKER}@host1", True),  # the lines that let keys into its host
        ("lazycluster-link-another", False),  # another cluster's: left to the stop
        (None, False),  # nothing asked: a stop without links
    ],
)
def test_a_stops_term_has_the_waiting_guard_revoke_what_it_asked_and_answer(
    tmp_path: Path, home: Path, asked: str | None, answers: bool
) -> None:
    """The controller's stop asks for a revoke in the folder and TERMs the guard, which edits
    with the interpreter it has running and answers as the edit program would (no second
    interpreter per host); only the cluster's own lines, and no answer for anything else."""
    folder = tmp_path / "lazycluster-guarded"
    folder.mkdir()
    worker = _process(folder, "host1-0")
    watcher = guard(folder, home, "--key-marker", f"{MARKER}@host1")
    keys = home / ".ssh" / "authorized_keys"
    before = keys.read_bytes()
    try:
        _seen(folder)
        if asked is not None:
            (folder / "revoke.ask").write_text(f"{asked}\n")
        watcher.send_signal(signal.SIGTERM)
        _, err = watcher.communicate(timeout=10)
        assert watcher.returncode == 0, err
        answer = folder / "revoke.answer"
        if answers:
            result = json.loads(answer.read_text())
            assert result["changed"] and sorted(result["removed"]) == [
                f"{MARKER}/{h}@host1" for h in ("host2", "host3")
            ]
            assert keys.read_bytes() == USER
        else:
            assert not answer.exists() and keys.read_bytes() == before
        assert worker.poll() is None and folder.exists()  # the stop ends and removes them
    finally:
        for proc in (worker, watcher):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_the_guard_keeps_a_working_dir_that_holds_more(tmp_path: Path, home: Path) -> None:
    folder = tmp_path / "lazycluster-guarded"
    folder.mkdir()
    (tmp_path / "another-cluster").mkdir()
    worker = _process(folder, "host1-0")
    watcher = guard(folder, home, "--remove", str(tmp_path))
    _seen(folder)
    worker.kill()
    worker.wait()
    assert watcher.wait(timeout=10) == 0
    assert not folder.exists() and (tmp_path / "another-cluster").exists()


def test_the_guard_acts_when_no_process_came_or_the_folder_went(tmp_path: Path, home: Path) -> None:
    lonely = tmp_path / "lazycluster-lonely"
    lonely.mkdir()
    master = _process(lonely, "link-a-b")
    watcher = guard(lonely, home, "--grace", "1")
    try:
        assert watcher.wait(timeout=10) == 0  # nothing of the cluster came within its grace
        assert master.wait(timeout=5) == -signal.SIGTERM and not lonely.exists()
    finally:
        for proc in (master, watcher):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    ak.set_lines(
        MARKER, [f"restrict a b {MARKER}/h@host1"], 60, str(home / ".ssh" / "authorized_keys")
    )
    folder = tmp_path / "lazycluster-y"
    folder.mkdir()
    worker = _process(folder, "host1-0")
    watcher = guard(folder, home)
    try:
        time.sleep(0.5)
        subprocess.run(["rm", "-rf", str(folder)], check=True)  # a cleanup removed it
        assert watcher.wait(timeout=10) == 0
        assert (home / ".ssh" / "authorized_keys").read_bytes() == USER  # revoked all the same
    finally:
        for proc in (worker, watcher):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_a_revoke_that_may_pass_is_tried_again_and_one_that_cannot_is_not(
    tmp_path: Path, home: Path
) -> None:
    """A full disk may pass: the guard tries again until the lines can go. A read-only file
    will not: it says the lines stay until they expire, and ends."""
    keys = home / ".ssh" / "authorized_keys"
    text = keys.read_bytes()
    with small_disk(home / ".ssh"):
        keys.write_bytes(text)
        filler = fill(home / ".ssh")
        folder = tmp_path / "lazycluster-full"
        folder.mkdir()
        watcher = guard(folder, home, "--grace", "0.2")
        try:
            assert wait_until(lambda: not folder.exists(), 10)  # the secrets go first
            time.sleep(1.5)
            assert watcher.poll() is None and MARKER.encode() in keys.read_bytes()
            filler.unlink()
            _, err = watcher.communicate(timeout=10)
            assert watcher.returncode == 0 and "revoke failed, trying again" in err
            assert "No space left on device" in err and keys.read_bytes() == USER
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait()
    keys.write_bytes(text)
    keys.chmod(0o400)
    folder = tmp_path / "lazycluster-ro"
    folder.mkdir()
    watcher = guard(folder, home, "--grace", "0.2")
    _, err = watcher.communicate(timeout=10)
    assert watcher.returncode == 0 and "the lines stay until they expire" in err
    assert "read-only" in err and keys.read_bytes() == text


def test_a_marked_process_that_leads_no_group_yet_is_ended_alone(tmp_path: Path) -> None:
    """A start's process between its fork and its ``setsid`` has no group of its own: it is
    signalled alone (the old guard signalled only groups and reported it a survivor)."""
    folder = tmp_path / "lazycluster-y"
    folder.mkdir()
    argv = [sys.executable, "-c", "import time; time.sleep(60)", f"{folder}/x"]
    proc = subprocess.Popen(argv)  # in this process's group
    (folder / "x.pid").write_text(f"{proc.pid}\n")
    assert wait_until(lambda: guard_module.marked(proc.pid, f"{folder}/"), 10)
    assert guard_module.end_all(str(folder), f"{folder}/", grace=1.0, sweep=0.0) == []
    assert proc.wait(timeout=5) == -signal.SIGTERM


def test_the_guard_has_no_process_of_its_own_left_behind(tmp_path: Path, home: Path) -> None:
    folder = tmp_path / "lazycluster-z"
    folder.mkdir()
    watcher = guard(folder, home, "--grace", "0.3")
    assert watcher.wait(timeout=10) == 0
    assert not [c for c in psutil.Process().children(recursive=True) if c.pid == watcher.pid]


def test_two_guards_of_one_folder_leave_one_watching(tmp_path: Path, home: Path) -> None:
    """Two starts at once may each start a guard: the second sees the first's lock and ends,
    and the pid file names the one that watches (so a cleanup stops it)."""
    folder = tmp_path / "lazycluster-two"
    folder.mkdir()
    worker = _process(folder, "host1-0")
    first = guard(folder, home)
    try:
        assert wait_until(lambda: (folder / "guard.lock").exists())
        time.sleep(0.3)
        second = guard(folder, home)
        (folder / "guard.pid").write_text(f"{second.pid}\n")  # what the racing start wrote
        _, err = second.communicate(timeout=10)
        assert second.returncode == 0 and "another guard watches" in err
        assert wait_until(lambda: (folder / "guard.pid").read_text() == f"{first.pid}\n")
        assert first.poll() is None
    finally:
        for proc in (worker, first):
            proc.kill()
            proc.wait()


def test_a_start_racing_the_guard_is_ended_and_one_after_it_is_left_alone(
    tmp_path: Path, home: Path
) -> None:
    """A start that began in the folder just before the guard moved it aside (its pid file not
    written yet) is ended with the rest; a start after that made a new folder of the same name,
    and runs on (it has a guard of its own)."""
    folder = tmp_path / "lazycluster-race"
    folder.mkdir()
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", f"{folder}/x"]
    worker = _process(folder, "host1-0")
    raced = subprocess.Popen(sleeper, cwd=folder, start_new_session=True)  # no pid file yet
    watcher = guard(folder, home, "--sweep", "3")
    later = None
    try:
        assert wait_until(lambda: (folder / "guard.pid").exists(), 20)  # it runs
        time.sleep(0.8)  # it saw the worker
        worker.kill()
        worker.wait()
        assert wait_until(lambda: not folder.exists(), 30)  # moved aside (bounds for a loaded host)
        folder.mkdir()
        later = subprocess.Popen(sleeper, cwd=folder, start_new_session=True)
        assert watcher.wait(timeout=30) == 0
        assert raced.wait(timeout=5) in (-signal.SIGTERM, -signal.SIGKILL)
        assert later.poll() is None and folder.exists()
    finally:
        for proc in (raced, watcher, *([later] if later else [])):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_an_edit_of_authorized_keys_is_no_process_of_the_cluster(tmp_path: Path) -> None:
    """An edit under way leaves its pid in the folder (hostside.authorized_keys), its command
    line naming the folder: the guard does not count it as the cluster still running there,
    as it counts a worker."""
    folder = tmp_path / "lazycluster-c1"
    folder.mkdir()
    marker = f"{folder}/"
    edit = _process(folder, ak.EDIT_PID.format(pid=1)[: -len(".pid")])
    try:
        assert wait_until(lambda: guard_module.marked(edit.pid, marker))
        assert not guard_module.cluster_alive(str(folder), marker)
        worker = _process(folder, "host1-0")
        try:
            assert wait_until(lambda: guard_module.cluster_alive(str(folder), marker))
        finally:
            worker.kill()
            worker.wait()
    finally:
        edit.kill()
        edit.wait()
