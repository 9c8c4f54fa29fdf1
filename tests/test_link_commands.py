"""The SSH links' lines are pure strings: check them as strings and run them through a real
/bin/sh."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from lazycluster_tasks import link_commands
from lazycluster_tasks.testing.helpers import wait_until


def sh(line: str) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/sh", "-c", line], capture_output=True, text=True, timeout=10)


# -- host-to-host links --------------------------------------------------------------------


def _in_home(home: Path, line: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/bin/sh", "-c", line], env={**os.environ, "HOME": str(home)}, capture_output=True,
        text=True, timeout=10, input=stdin,
    )  # fmt: skip


def test_a_link_keys_line_lets_in_one_host_for_the_given_ports_and_nothing_else():
    from lazycluster_tasks.links import LinkKey

    key, marker = LinkKey.generate(), link_commands.peer_marker("abc123")
    comment = link_commands.key_comment(marker, "gpu 1;rm", "cpu2")
    assert comment == "lazycluster-link-abc123/gpu_1_rm@cpu2"
    assert link_commands.key_scope(marker, "cpu2") == "lazycluster-link-abc123@cpu2"
    line = link_commands.authorized_line(key.public, comment, ["10.0.0.5", "fd00::1"], [4, 3], [5])
    options, kind, blob, named = line.split()
    assert (kind, named) == ("ssh-ed25519", comment) and blob == key.public.split()[1]
    assert options == (
        'restrict,port-forwarding,from="10.0.0.5,fd00::1",'
        'permitopen="127.0.0.1:3",permitopen="127.0.0.1:4",permitlisten="127.0.0.1:5",'
        'command="/bin/false"'
    )
    # no port yet: a target nothing resolves (a line without permitopen would allow any port)
    bare = link_commands.authorized_line(key.public, comment)
    assert 'permitopen="lazycluster.invalid:1",permitlisten="lazycluster.invalid:1"' in bare
    assert "from=" not in bare  # the host's addresses unknown: from anywhere, said in the log
    with pytest.raises(ValueError):
        link_commands.authorized_line(key.public, comment, ['10.0.0.5" command="id'])
    with pytest.raises(ValueError, match="comment"):
        link_commands.authorized_line(key.public, "a b")
    assert "PRIVATE" not in repr(key) and key.private not in repr(key)


def test_revoking_a_clusters_keys_leaves_every_decision_to_the_edit(tmp_path):
    """The revoke is the edit program alone (it decides under the file's lock): no file, or no
    line of ours, changes nothing; our lines go, the user's bytes stay."""
    from lazycluster_tasks import hostside

    program = hostside.source("authorized_keys")
    marker = link_commands.peer_marker("abc123")
    line = link_commands.revoke_keys(sys.executable, marker)
    assert "grep" not in line
    keys = tmp_path / ".ssh" / "authorized_keys"
    done = _in_home(tmp_path, line, program)  # no file: nothing is made
    assert done.returncode == 0 and not json.loads(done.stdout)["changed"], done.stderr
    assert not keys.parent.exists()
    keys.parent.mkdir()
    user = b"ssh-ed25519 AAAAuser j\xfcrgen@laptop\r\n\x00\nno final newline"
    keys.write_bytes(user)
    done = _in_home(tmp_path, line, program)  # not named: not written
    assert done.returncode == 0 and not json.loads(done.stdout)["changed"]
    assert keys.read_bytes() == user
    ours = f'expiry-time="20991231000000Z",restrict {marker}/h1@h2\n'.encode()
    keys.write_bytes(ours + user)
    done = _in_home(tmp_path, line, program)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["changed"] and keys.read_bytes() == user


def test_link_alive_names_each_link_and_says_whether_its_master_runs(tmp_path):
    master = subprocess.Popen(["sleep", "30"])
    ended = subprocess.Popen(["true"])
    ended.wait()
    zombie = subprocess.Popen(["true"])  # ended, not reaped yet: not running
    assert wait_until(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE)
    files = {}
    for name, pid in (("link-a-b", master.pid), ("link-a c", ended.pid), ("z", zombie.pid)):
        files[name] = str(tmp_path / f"{name}.pid")  # one path with a space
        Path(files[name]).write_text(f"{pid}\n")
    files["never"] = str(tmp_path / "missing.pid")  # not started (yet)
    try:
        done = sh(link_commands.link_alive(files))
        assert done.returncode == 0
        assert done.stdout.splitlines() == ["link-a-b=1", "link-a c=0", "z=0", "never=0"]
    finally:
        master.kill()
        master.wait()
        zombie.wait()
    assert link_commands.link_alive({}) == "true"


MASTER = (
    "import socket, sys, time\n"
    "time.sleep(float(sys.argv[2]))\n"
    "if sys.argv[1]:\n"
    "    s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()\n"
    "time.sleep(float(sys.argv[3]))\n"
)


def test_link_states_wait_for_each_control_socket_and_tell_the_ones_that_never_came(tmp_path):
    """A master is up once its control socket exists (OpenSSH makes it after logging in); one
    that ended, or whose socket is left from a dead process, or that took too long, is not."""

    def master(control: str, after: float, lives: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", MASTER, control, str(after), str(lives)])

    stale = tmp_path / "old.s"
    with socket.socket(socket.AF_UNIX) as left:
        left.bind(str(stale))
    procs = {
        "late one": ("a b.s", master(str(tmp_path / "a b.s"), 0.6, 30)),
        "ended": ("e.s", master("", 0.2, 0)),
        "stale": ("old.s", master("", 0, 0)),
        "slow": ("s.s", master(str(tmp_path / "s.s"), 20, 0)),
    }
    procs["stale"][1].wait()
    try:
        line = link_commands.link_states(
            {name: control for name, (control, _) in procs.items()},
            {name: proc.pid for name, (_, proc) in procs.items()},
            timeout=2,
        )
        done = subprocess.run(
            ["/bin/sh", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=20
        )
        assert done.stdout.splitlines() == ["late one=1", "ended=0", "stale=0", "slow=0"]
        assert "ssh" not in line and "date" not in line  # builtins and sleep only
    finally:
        for _, proc in procs.values():
            proc.kill()
            proc.wait()


def test_link_forward_parts_make_one_call_and_try_each_part_alone_when_it_fails(tmp_path):
    with pytest.raises(ValueError, match="no forwards"):
        link_commands.link_forward_parts("l.s", {})
    with pytest.raises(ValueError, match="no ports"):
        link_commands.link_forward_parts("l.s", {"a": ([], False)})
    control = str(tmp_path / "no master.s")
    one = link_commands.link_forward_parts(control, {"a": ([41001], False)})
    assert one.count("ssh ") == 1 and "-L 127.0.0.1:41001:127.0.0.1:41001" in one
    both = link_commands.link_forward_parts(
        control, {"a": ([41001], False), "b c": ([41002], True)}
    )
    specs = ["-L", "127.0.0.1:41001:127.0.0.1:41001", "-R", "127.0.0.1:41002:127.0.0.1:41002"]
    whole = link_commands._mux_call(control, specs, False)
    assert both.startswith(f"if {whole} ") and both.count("ssh ") == 3
    # run by a real shell with no master behind the socket: every part is tried, none made
    assert sh(both).stdout.splitlines() == ["a=0", "b c=0"]
    cancel = link_commands.link_forward_parts(control, {"a": ([41001], True)}, cancel=True)
    assert " -O cancel -R 127.0.0.1:41001:127.0.0.1:41001 link" in cancel


def test_link_lines_refuse_bad_input_and_bind_loopback_only():
    with pytest.raises(ValueError, match="cluster id"):
        link_commands.peer_marker("a b")
    with pytest.raises(ValueError, match="public key"):
        link_commands.authorized_line('ssh-ed25519 AAAA" command="id', "lazycluster-link-m/h")
    with pytest.raises(ValueError, match="no ports"):
        link_commands.link_forwards("/f/link0.s", [])
    forward = link_commands.link_forwards("/f d/link0.s", [41002, 41001, 41001])
    assert forward == (
        "ssh -F /dev/null -S '/f d/link0.s' -O forward "
        "-L 127.0.0.1:41001:127.0.0.1:41001 -L 127.0.0.1:41002:127.0.0.1:41002 link"
    )
    reverse = link_commands.link_forwards("/f/link0.s", [41001], cancel=True, reverse=True)
    assert (
        reverse
        == "ssh -F /dev/null -S /f/link0.s -O cancel -R 127.0.0.1:41001:127.0.0.1:41001 link"
    )
    argv = link_commands.link_master_argv(
        "/f/link0.s", "/f/link/key", "/f/link/known_hosts", "lazycluster-h2", "ssh-rsa",
        "me", "-oProxyCommand=x", 22,
    )  # fmt: skip
    assert argv[:4] == ["ssh", "-F", "/dev/null", "-N"]  # the host's ssh config is not read
    assert argv[-2:] == ["--", "-oProxyCommand=x"]  # an address is never an option
    for option in (
        "StrictHostKeyChecking=yes",
        "BatchMode=yes",
        "IdentitiesOnly=yes",
        "GlobalKnownHostsFile=/dev/null",
        "HostKeyAlgorithms=rsa-sha2-512,rsa-sha2-256",
    ):
        assert option in argv  # fmt: skip
