"""The one edit of a user's authorized_keys (hostside.authorized_keys), on real files: whatever
the file holds and whatever goes wrong, a line of the user's never changes, and a failure leaves
the file byte for byte as it was."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazycluster_tasks import commands, link_commands
from lazycluster_tasks.hostside import authorized_keys as ak
from lazycluster_tasks.links import LinkKey
from lazycluster_tasks.testing.helpers import fill, small_disk, wait_until

MARKER = link_commands.peer_marker("c0ffee")
USER = (
    b'no-pty,command="echo a b" ssh-ed25519 AAAAC3NzaUser1 alice@laptop\n'
    b"ssh-rsa AAAAB3NzaUser2 j\xfcrgen@laptop\r\n"  # a Latin-1 comment and a CRLF ending
    b"\n# a comment line\n"
    b"ssh-ed25519 AAAAC3NzaUser3 with\x00nul\n"
    b"ssh-ed25519 AAAAC3NzaUser4 no-final-newline"
)


def line(dialler: str = "host1", marker: str = MARKER, ports: tuple[int, ...] = (60001,)) -> str:
    key = LinkKey.generate()
    return link_commands.authorized_line(
        key.public, link_commands.key_comment(marker, dialler, "host2"), ["10.0.0.5"], ports, ports
    )


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / ".ssh"
    folder.mkdir(mode=0o700)
    path = folder / "authorized_keys"
    path.write_bytes(USER)
    path.chmod(0o600)
    return path


def temps(path: Path) -> list[str]:
    return [p.name for p in path.parent.iterdir() if ak.TEMP_TAG in p.name]


def test_lines_are_set_first_and_revoked_leaving_every_user_byte(keys: Path) -> None:
    ours = [line("host1"), line("host3")]
    done = ak.set_lines(MARKER, ours, 600, str(keys))
    assert done.changed and done.lines == 2 and done.path == str(keys)
    text = keys.read_bytes()
    written = ak.split_lines(text)
    assert [w.split(b",", 1)[1].decode() for w in written[:2]] == [f"{x}\n" for x in ours]
    assert b"".join(written[2:]) == USER  # the user's lines after ours, as they were
    expiry = time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() + 600))
    assert abs(int(done.expiry) - int(expiry)) <= 2 and text.startswith(b'expiry-time="')
    again = ak.set_lines(MARKER, ours[:1], 600, str(keys))  # a host stopped dialling
    assert again.lines == 1 and keys.read_bytes().count(MARKER.encode()) == 1
    gone = ak.set_lines(MARKER, [], 0, str(keys))
    assert gone.changed and keys.read_bytes() == USER
    assert not ak.set_lines(MARKER, [], 0, str(keys)).changed  # nothing to do: not written
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600 and not temps(keys)


def test_a_file_we_made_goes_with_our_last_line_unless_the_user_wrote_in_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / ".ssh" / "authorized_keys"
    assert not ak.set_lines(MARKER, [], 0, str(path)).changed
    assert not path.parent.exists()  # a revoke makes nothing
    assert ak.set_lines(MARKER, [line()], 60, str(path)).changed
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(ak.MADE_WITH_FOLDER)
    other = link_commands.peer_marker("other")
    ak.set_lines(other, [line(marker=other)], 60, str(path))  # another cluster's too
    ak.set_lines(MARKER, [], 0, str(path))
    assert path.read_bytes().startswith(ak.MADE_WITH_FOLDER)  # the other's line is left
    ak.set_lines(other, [], 0, str(path))
    assert not path.exists() and not path.parent.exists()  # as it was: nothing
    path.parent.mkdir()
    ak.set_lines(MARKER, [line()], 60, str(path))
    assert path.read_bytes().startswith(ak.MADE)
    with open(path, "ab") as keys:
        keys.write(USER)  # the user adds keys of theirs
    ak.set_lines(MARKER, [], 0, str(path))
    assert path.read_bytes() == USER and path.parent.exists()  # theirs now, as they wrote it


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=600) | st.lists(st.sampled_from(ak.split_lines(USER))).map(b"".join))
def test_any_bytes_at_all_come_back_unchanged(tmp_path: Path, original: bytes) -> None:
    path = tmp_path / f"keys-{os.urandom(4).hex()}"
    path.write_bytes(original)
    ak.set_lines(MARKER, [line()], 60, str(path))
    kept = [x for x in ak.split_lines(original) if not ak.is_ours(x, MARKER)]
    assert ak.split_lines(path.read_bytes())[1:] == kept
    ak.set_lines(MARKER, [], 0, str(path))
    assert path.read_bytes() == b"".join(kept)
    path.unlink()


def test_other_clusters_lines_stay_until_they_expire(keys: Path) -> None:
    other = link_commands.peer_marker("other")
    alive = f'expiry-time="20991231000000Z",{line(marker=other)}\n'.encode()
    dead = f'expiry-time="20200101000000Z",{line("h2", marker=other)}\n'.encode()
    keys.write_bytes(alive + dead + USER)
    ak.set_lines(MARKER, [line()], 60, str(keys))
    ak.set_lines(MARKER, [], 0, str(keys))
    assert keys.read_bytes() == alive + USER  # the expired line was swept, nothing else


def test_mode_owner_symlink_and_attributes_are_kept(tmp_path: Path) -> None:
    real = tmp_path / "managed" / "keys"
    real.parent.mkdir()
    real.write_bytes(USER)
    real.chmod(0o644)
    folder = tmp_path / ".ssh"
    folder.mkdir()
    link = folder / "authorized_keys"
    link.symlink_to("../managed/keys")
    if os.geteuid() == 0:
        os.chown(real, 4321, 4322)
    try:
        os.setxattr(real, "user.origin", b"config-management")
        xattrs = True
    except OSError:
        xattrs = False
    done = ak.set_lines(MARKER, [line()], 60, str(link))
    assert done.path == str(real) and link.is_symlink() and os.readlink(link) == "../managed/keys"
    status = real.stat()
    assert stat.S_IMODE(status.st_mode) == 0o644
    if os.geteuid() == 0:
        assert (status.st_uid, status.st_gid) == (4321, 4322)
    if xattrs:
        assert os.getxattr(real, "user.origin") == b"config-management"
    ak.set_lines(MARKER, [], 0, str(link))
    assert real.read_bytes() == USER and link.is_symlink()


@pytest.mark.parametrize("case", ["read-only", "hard links", "dangling link", "directory"])
def test_files_that_are_not_ours_to_replace_are_left_alone(tmp_path: Path, case: str) -> None:
    path = tmp_path / "authorized_keys"
    if case == "read-only":
        path.write_bytes(USER)
        path.chmod(0o400)
    elif case == "hard links":
        path.write_bytes(USER)
        os.link(path, tmp_path / "copy")
    elif case == "dangling link":
        path.symlink_to(tmp_path / "nowhere")
    else:
        path.mkdir()
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ak.EditError, match=f"^{path}|^{tmp_path}") as raised:
        ak.set_lines(MARKER, [line()], 60, str(path))
    assert "not edited" in str(raised.value)
    assert sorted(os.listdir(tmp_path)) == before
    if case in ("read-only", "hard links"):
        assert path.read_bytes() == USER


def test_a_read_error_leaves_the_file_alone(tmp_path: Path) -> None:
    """A file whose read fails (EIO): /proc/self/mem reads its first page as an I/O error."""
    path = tmp_path / "authorized_keys"
    path.symlink_to("/proc/self/mem")
    with pytest.raises(ak.EditError, match="not edited"):
        ak.set_lines(MARKER, [line()], 60, str(path))
    assert os.readlink(path) == "/proc/self/mem" and not temps(path)


def test_a_full_disk_at_authorize_and_at_revoke_loses_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with small_disk(home):
        keys = home / "authorized_keys"
        keys.write_bytes(USER)
        filler = fill(home)
        with pytest.raises(ak.EditError, match="No space left on device"):
            ak.set_lines(MARKER, [line()], 60, str(keys))
        assert keys.read_bytes() == USER and not temps(keys)
        filler.unlink()
        ak.set_lines(MARKER, [line()], 60, str(keys))
        authorized = keys.read_bytes()
        filler = fill(home)
        with pytest.raises(ak.EditError, match="No space left on device"):
            ak.set_lines(MARKER, [], 0, str(keys))
        assert keys.read_bytes() == authorized and not temps(keys)
        filler.unlink()  # space again: the next revoke (the guard's, a retry) succeeds
        ak.set_lines(MARKER, [], 0, str(keys))
        assert keys.read_bytes() == USER


def test_no_edit_while_another_editor_holds_the_lock(keys: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(keys)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        started = time.monotonic()
        with pytest.raises(ak.EditError, match="locked by another editor"):
            ak.set_lines(MARKER, [line()], 60, str(keys), lock_timeout=0.3)
        assert time.monotonic() - started < 2
    finally:
        holder.communicate(b"", timeout=10)  # it lets go
    assert keys.read_bytes() == USER
    assert ak.set_lines(MARKER, [line()], 60, str(keys), lock_timeout=0.3).changed


#: Holds a POSIX lock on the file in argv[1] until its stdin closes (a lock of this process
#: would not exclude this process).
HOLD = (
    "import fcntl, sys\n"
    "f = open(sys.argv[1], 'r+b'); fcntl.lockf(f, fcntl.LOCK_EX)\n"
    "print('locked', flush=True); sys.stdin.read()\n"
)


def test_no_edit_where_locks_exclude_nothing_across_hosts() -> None:
    nfs = (
        "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
        "40 22 0:40 / /home rw,relatime shared:20 - nfs4 srv:/home rw,vers=4.2,"
        "local_lock={lock},addr=10.0.0.2\n"
        "41 22 0:41 / /nfs3 rw,relatime - nfs srv:/x rw,vers=3,nolock,local_lock=all\n"
    )
    for path in ("/home/u/.ssh/authorized_keys", "/nfs3/u/.ssh/authorized_keys"):
        why = ak.lock_works(path, nfs.format(lock="all"))
        assert why is not None and "nolock" in why
    assert ak.lock_works("/home/u/.ssh/authorized_keys", nfs.format(lock="none")) is None
    assert ak.lock_works("/root/.ssh/authorized_keys", nfs.format(lock="all")) is None
    assert ak.lock_works("/home2/x", nfs.format(lock="all")) is None  # /home is not its mount


EDITOR = [sys.executable, "-m", "lazycluster_tasks.hostside.authorized_keys"]


@pytest.mark.skipif(os.geteuid() != 0, reason="a private mount namespace needs root")
def test_a_home_whose_locks_stay_on_one_host_is_never_edited(keys: Path, tmp_path: Path) -> None:
    """The program as the hosts run it, where the kernel says the home is NFS with locks local
    to the host (its mountinfo swapped in a private mount namespace): authorize and revoke are
    both refused, naming why, and the file stays byte for byte as it was."""
    ours = line()
    ak.set_lines(MARKER, [ours], 60, str(keys))
    with_ours = keys.read_bytes()
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / / rw,relatime - ext4 /dev/vda1 rw\n"
        f"40 22 0:40 / {keys.parent} rw,relatime - nfs4 srv:/home rw,vers=4.2,local_lock=all\n"
    )
    for wanted in (["--line", ours], []):  # authorize again, then revoke
        argv = [*EDITOR, "--marker", MARKER, "--lifetime", "60", "--file", str(keys), *wanted]
        swapped = (
            f"mount --make-rprivate / && mount --bind {shlex.quote(str(mountinfo))} "
            f"/proc/$$/mountinfo && exec {shlex.join(argv)}"
        )
        done = subprocess.run(
            ["unshare", "-m", "/bin/sh", "-c", swapped], capture_output=True, text=True
        )
        assert done.returncode == 1 and "nolock" in done.stderr, done.stderr
        assert "not edited" in done.stderr and keys.read_bytes() == with_ours
        assert temps(keys) == []
    ak.set_lines(MARKER, [], 0, str(keys))
    assert keys.read_bytes() == USER


def test_editors_at_once_lose_no_line(keys: Path) -> None:
    """200 rounds in 8 processes, each a cluster of its own (authorize, update, revoke)."""
    markers = [link_commands.peer_marker(f"p{i}") for i in range(8)]
    parts = [json.dumps([marker, line(marker=marker)]) for marker in markers]
    script = (
        "import json, sys\n"
        "from lazycluster_tasks.hostside import authorized_keys as ak\n"
        "marker, line = json.loads(sys.argv[1]); path = sys.argv[2]\n"
        "for _ in range(25):\n"
        "    ak.set_lines(marker, [line], 60, path)\n"
        "    ak.set_lines(marker, [line, line.replace('/host1@', '/host3@')], 60, path)\n"
        "    ak.set_lines(marker, [], 0, path)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, part, str(keys)], stderr=subprocess.PIPE)
        for part in parts
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, errors
    assert keys.read_bytes() == USER and not temps(keys)


@pytest.mark.parametrize("alive", [False, True], ids=["bare", "alive"])
def test_an_editor_killed_at_any_moment_leaves_the_old_or_the_new_file(
    keys: Path, tmp_path: Path, alive: bool
) -> None:
    ours = line()
    args = ["--marker", MARKER, "--lifetime", "60", "--file", str(keys), "--line", ours]
    folder = tmp_path / "cluster"
    if alive:  # as the links run it: its pid in the cluster's folder first
        folder.mkdir()
        args += ["--alive", f"{folder}/"]
    for _ in range(40):
        before = keys.read_bytes()
        proc = subprocess.Popen([*EDITOR, *args], stdout=subprocess.DEVNULL)
        time.sleep(random.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        after = keys.read_bytes()
        rest = [x for x in ak.split_lines(after) if not ak.is_ours(x, MARKER)]
        assert after == before or (b"".join(rest) == USER and ours.encode() in after)
    ak.set_lines(MARKER, [], 0, str(keys))  # also removes what killed editors left
    assert keys.read_bytes() == USER and not temps(keys)
    for pid_file in _edit_pids(folder) if alive else []:  # a stop's to end: none runs
        assert not psutil.pid_exists(int((folder / pid_file).read_text()))


def test_a_full_disk_where_an_edit_leaves_its_pid_edits_nothing(keys: Path, tmp_path: Path) -> None:
    """The cluster's folder is on a full disk: the edit cannot leave its pid there (a stop
    would not see it), so it edits nothing and the file stays byte-identical."""
    folder = tmp_path / "cluster"
    with small_disk(folder):
        filler = fill(folder)
        with pytest.raises(ak.EditError, match=r"cannot hold this edit's pid.*No space left"):
            ak.set_lines(MARKER, [line()], 60, str(keys), alive=f"{folder}/")
        assert keys.read_bytes() == USER and not temps(keys) and not _edit_pids(folder)
        filler.unlink()
        assert ak.set_lines(MARKER, [line()], 60, str(keys), alive=f"{folder}/").lines == 1
    ak.set_lines(MARKER, [], 0, str(keys))
    assert keys.read_bytes() == USER


def test_the_program_says_what_it_did_and_why_not(keys: Path) -> None:
    ours = line()
    args = ["--marker", MARKER, "--lifetime", "60", "--file", str(keys)]
    done = subprocess.run([*EDITOR, *args, "--line", ours], capture_output=True, text=True)
    assert done.returncode == 0 and json.loads(done.stdout)["lines"] == 1
    keys.chmod(0o400)
    refused = subprocess.run([*EDITOR, *args], capture_output=True, text=True)
    assert (
        refused.returncode == 1 and "read-only" in refused.stderr and "not edited" in refused.stderr
    )
    keys.chmod(0o600)
    bad = subprocess.run(
        [*EDITOR, *args, "--line", "ssh-ed25519 AAAA x"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "not an options + key" in bad.stderr
    foreign = subprocess.run(
        [*EDITOR, "--marker", "someone-else", "--file", str(keys)], capture_output=True, text=True
    )
    assert foreign.returncode == 2 and "not a marker of ours" in foreign.stderr
    ak.set_lines(MARKER, [], 0, str(keys))
    assert keys.read_bytes() == USER


def test_lines_on_stdin_cut_short_edit_nothing(keys: Path) -> None:
    """The links send their lines after the program on stdin (a command line holds 128 KiB):
    an input that lost its end — a line short, or the last one cut — leaves the file
    byte-identical; the whole input sets the lines."""
    ours = [line("host1"), line("host2")]
    program = Path(ak.__file__).read_bytes()
    command = commands.python_program_with_input(
        sys.executable,
        ["--marker", MARKER, "--lifetime", "60", "--file", str(keys), "--lines-on-stdin", "2"],
    )
    whole = "".join(f"{text}\n" for text in ours).encode()
    for cut in (whole[: len(whole) // 2], whole[:-1], whole.split(b"\n")[0] + b"\n"):
        done = subprocess.run(
            ["/bin/sh", "-c", command], input=program + b"\0" + cut, capture_output=True
        )
        assert done.returncode == 2 and b"not edited" in done.stderr, done.stderr
        assert keys.read_bytes() == USER
    done = subprocess.run(
        ["/bin/sh", "-c", command], input=program + b"\0" + whole, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["lines"] == 2
    ak.set_lines(MARKER, [], 0, str(keys))
    assert keys.read_bytes() == USER


def test_hosts_sharing_a_home_each_set_and_revoke_their_own_lines(keys: Path) -> None:
    """host1 and host2 share one home: each sets the lines that let keys into it (scope
    ``<marker>@<host>``) without touching the other's; the cluster's revoke removes all."""
    into = {
        target: [
            link_commands.authorized_line(
                LinkKey.generate().public, link_commands.key_comment(MARKER, "host3", target)
            )
        ]
        for target in ("host1", "host2")
    }
    for target, lines in into.items():
        ak.set_lines(link_commands.key_scope(MARKER, target), lines, 60, str(keys))
    text = keys.read_bytes()
    assert all(line.encode() in text for lines in into.values() for line in lines)
    ak.set_lines(link_commands.key_scope(MARKER, "host1"), [], 0, str(keys))  # host1 cleaned up
    text = keys.read_bytes()
    assert into["host2"][0].encode() in text and into["host1"][0].encode() not in text
    with pytest.raises(ValueError, match="not an options"):  # a line for another host
        ak.set_lines(link_commands.key_scope(MARKER, "host1"), into["host2"], 60, str(keys))
    ak.set_lines(MARKER, [], 0, str(keys))
    assert keys.read_bytes() == USER


def test_a_new_text_that_would_change_a_user_line_is_refused(keys: Path) -> None:
    """verify(): the new text must hold exactly our lines, then every user line byte for byte
    and in order; and an edit whose new text fails it leaves the file as it was."""
    original = keys.read_bytes()
    ours = [ak.with_expiry(line(), "20991231000000Z")]
    now = time.time()
    good = ak.new_text(original, MARKER, ours, now)
    ak.verify(original, good, MARKER, ours, now)
    user = ak.split_lines(original)
    wrong = {
        "a user line gone": b"".join(ours + user[1:]),
        "a byte changed": b"".join(ours + user).replace(b"j\xfcrgen", b"j?rgen"),
        "reordered": b"".join(ours + user[1:2] + user[:1] + user[2:]),
        "a final newline added": b"".join(ours + user) + b"\n",
        "our line missing": b"".join(user),
        "ours after the user's": b"".join(user + ours),
        "a line of another's": b"".join(ours + user[:1] + [b"ssh-rsa AAAAX x\n"] + user[1:]),
    }
    for why, text in wrong.items():
        with pytest.raises(ak.EditError, match="failed its check"):
            ak.verify(original, text, MARKER, ours, now)
            pytest.fail(f"{why}: accepted")


def test_an_edit_checks_its_new_text_before_replacing_the_file(
    keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new text that drops a user line (a fault in new_text) never replaces the file."""
    made = ak.new_text
    monkeypatch.setattr(ak, "new_text", lambda *args: made(*args).replace(b"alice@laptop\n", b""))
    with pytest.raises(ak.EditError, match="failed its check"):
        ak.set_lines(MARKER, [line()], 60, str(keys))
    assert keys.read_bytes() == USER and not temps(keys)


OTHER = b"\nssh-ed25519 AAAAC3NzaOther added-by@ssh-copy-id\n"


def _another_editor_writes(monkeypatch: pytest.MonkeyPatch, path: Path, times: int) -> list[int]:
    """Another editor, one that takes no lock, appends OTHER to ``path`` right after each of
    the edit's first ``times`` reads (between its read and its rename)."""
    done = [0]
    after_read = ak._remove_stale_temps

    def write(real: str, now: float) -> None:
        if done[0] < times:
            done[0] += 1
            with open(path, "ab") as handle:
                handle.write(OTHER)
        after_read(real, now)

    monkeypatch.setattr(ak, "_remove_stale_temps", write)
    return done


def test_a_file_changed_between_read_and_rename_keeps_the_other_editors_bytes(
    keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """_unchanged(): a change by an editor that takes no lock is never overwritten; the edit
    reads again (up to ATTEMPTS times, then it gives up, editing nothing)."""
    done = _another_editor_writes(monkeypatch, keys, 1)
    ours = line()
    assert ak.set_lines(MARKER, [ours], 60, str(keys)).changed and done == [1]
    written = ak.split_lines(keys.read_bytes())
    assert ours.encode() in written[0] and b"".join(written[1:]) == USER + OTHER
    ak.set_lines(MARKER, [], 0, str(keys))
    assert keys.read_bytes() == USER + OTHER
    done = _another_editor_writes(monkeypatch, keys, ak.ATTEMPTS)
    with pytest.raises(ak.EditError, match=f"changed by another editor {ak.ATTEMPTS} times"):
        ak.set_lines(MARKER, [ours], 60, str(keys))
    assert keys.read_bytes() == USER + OTHER * (1 + ak.ATTEMPTS) and not temps(keys)


def test_a_file_we_made_is_not_removed_once_another_editor_wrote_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file we made goes with our last line, unless a key of the user's came meanwhile."""
    path = tmp_path / ".ssh" / "authorized_keys"
    ak.set_lines(MARKER, [line()], 60, str(path))
    assert path.read_bytes().startswith(ak.MADE_WITH_FOLDER)
    done = _another_editor_writes(monkeypatch, path, 1)
    assert ak.set_lines(MARKER, [], 0, str(path)).changed and done == [1]
    assert path.read_bytes() == OTHER and not temps(path)


def _edit_pids(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("edit-*.pid"))


def test_lines_are_let_in_only_while_the_cluster_runs_on_the_host(
    keys: Path, tmp_path: Path
) -> None:
    """``alive``: no folder, or its ``stopping`` file, and an edit that adds lines refuses,
    leaving the file byte-identical; a revoke is never refused; no pid file stays."""
    folder = tmp_path / "cluster"
    alive = f"{folder}/"
    with pytest.raises(ak.EditError, match="stopping on this host; not edited"):
        ak.set_lines(MARKER, [line()], 60, str(keys), alive=alive)
    assert keys.read_bytes() == USER
    folder.mkdir()
    assert ak.set_lines(MARKER, [line()], 60, str(keys), alive=alive).lines == 1
    assert MARKER.encode() in keys.read_bytes() and not _edit_pids(folder)
    (folder / ak.STOPPING).write_bytes(b"")
    with pytest.raises(ak.EditError, match="stopping on this host; not edited"):
        ak.set_lines(MARKER, [line("host3")], 60, str(keys), alive=alive)
    assert ak.set_lines(MARKER, [], 0, str(keys), alive=alive).changed  # the revoke
    assert keys.read_bytes() == USER and not _edit_pids(folder) and not temps(keys)
    args = ["--marker", MARKER, "--lifetime", "60", "--file", str(keys), "--alive", alive]
    refused = subprocess.run([*EDITOR, *args, "--line", line()], capture_output=True, text=True)
    assert refused.returncode == 1 and "stopping" in refused.stderr, refused.stderr
    assert keys.read_bytes() == USER


def test_an_edit_a_stop_began_during_takes_its_lines_out_again(
    keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop wrote ``stopping`` and revoked while the edit ran (its revoke found no line
    yet): once its lines are in, the edit sees the stop and takes them out itself."""
    folder = tmp_path / "cluster"
    folder.mkdir()
    edit = ak._set_lines
    seen: list[list[str]] = []

    def stop_meanwhile(marker: str, lines: list[str], *args: object) -> ak.Result:
        done = edit(marker, lines, *args)  # type: ignore[arg-type]
        if lines:  # the edit's own pid is in the folder while it runs
            seen.append(_edit_pids(folder))
            (folder / ak.STOPPING).write_bytes(b"")
        return done

    monkeypatch.setattr(ak, "_set_lines", stop_meanwhile)
    with pytest.raises(ak.EditError, match="taken out again"):
        ak.set_lines(MARKER, [line()], 60, str(keys), alive=f"{folder}/")
    assert seen == [[f"edit-{os.getpid()}.pid"]]
    assert keys.read_bytes() == USER and not _edit_pids(folder) and not temps(keys)
    # the take-back fails too (the file went read-only meanwhile): said, as lines left
    (folder / ak.STOPPING).unlink()

    def stop_and_lock(marker: str, lines: list[str], *args: object) -> ak.Result:
        done = stop_meanwhile(marker, lines, *args)
        if lines:
            keys.chmod(0o400)
        return done

    monkeypatch.setattr(ak, "_set_lines", stop_and_lock)
    with pytest.raises(ak.LinesLeft, match="could not be taken out again"):
        ak.set_lines(MARKER, [line()], 60, str(keys), alive=f"{folder}/")
    keys.chmod(0o600)
    assert MARKER.encode() in keys.read_bytes() and not _edit_pids(folder)
    edit(MARKER, [], 0, str(keys), ak.LOCK_TIMEOUT)
    assert keys.read_bytes() == USER


def test_a_stop_ends_the_edits_under_way_before_its_revoke(keys: Path, tmp_path: Path) -> None:
    """An edit waits for the file's lock (held here) when the stop's first step runs: it is
    KILLed and gone when that step returns, no line of it lands, and the next edit refuses."""
    folder = tmp_path / "cluster"
    folder.mkdir()
    args = ["--marker", MARKER, "--lifetime", "60", "--file", str(keys), "--alive", f"{folder}/"]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(keys)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    editor = None
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        editor = subprocess.Popen([*EDITOR, *args, "--line", line()], stderr=subprocess.PIPE)
        assert wait_until(lambda: len(_edit_pids(folder)) == 1, 10)  # past its own check
        step = commands.stop_edits(f"{folder}/", ak.STOPPING, ak.EDIT_PID.format(pid="*"))
        stopped = subprocess.run(["/bin/sh", "-c", step], capture_output=True, text=True)
        assert stopped.returncode == 0 and "left=" not in stopped.stdout, stopped
        assert editor.poll() == -signal.SIGKILL
        assert (folder / ak.STOPPING).exists() and not _edit_pids(folder)
    finally:
        holder.communicate(b"", timeout=10)  # it lets go
        if editor is not None:
            editor.kill()
            editor.communicate(timeout=10)
    late = subprocess.run([*EDITOR, *args, "--line", line()], capture_output=True, text=True)
    assert late.returncode == 1 and "stopping" in late.stderr, late.stderr
    assert keys.read_bytes() == USER and not temps(keys)
