"""A host's guard: once no process of a cluster is left on this host, clean up after it.

One guard runs per host and cluster, in the cluster folder, started by the first start there
(each later start starts one again if none runs). It looks at the folder every few seconds
(reading pid files and ``/proc``; no process started, idle otherwise). It acts when the cluster
has no process left on this host: one ran and none has for ``--quiet`` seconds, or none came
within ``--grace`` — whatever the reason (a controller that was killed, whose workers then ended
by their ``death_timeout``; a scale-down to nothing; a reboot of the controller). Then it:

1. moves the folder aside (a start racing it makes a fresh folder, with its own guard) and ends
   what is left of the cluster there — the host-to-host links' masters, a start that raced it —
   signalling only processes whose command line still names the folder;
2. removes the folder: TLS keys, the links' private key, the processes' env files, logs;
3. revokes the lines of ``~/.ssh/authorized_keys`` that let the cluster's keys into this host
   (the one safe edit), trying again every pause while it fails (a full disk, say) until the
   lines have expired anyway;
4. removes the working dir around the folder when it was made for the cluster and is empty.

When the controller's own cleanup runs first it stops the guard with the rest and does all of
the above itself, reporting the outcome. Its TERM finds the guard waiting, with this interpreter
and the edit's code loaded: the guard then revokes the lines the stop asked for in the folder
(``revoke.ask``: the cluster's, or this host's), writes the edit's answer (``revoke.answer``) and
exits; where no answer came the stop edits itself. A guard whose folder vanished revokes and
exits.

Runs on the hosts with the standard library only; see ``hostside``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import os
import shutil
import signal
import sys
import time

from . import authorized_keys

#: Seconds between two looks at the folder.
PAUSE = 1.0
#: Seconds the cluster must have had no process here before the guard acts.
QUIET = 6.0
#: Seconds to wait for a first process (the guard starts with them: a safety net).
GRACE = 120.0
#: Seconds between TERM and KILL for what is left.
STOP_GRACE = 2.0
#: Seconds the guard keeps ending what names the folder once it moved it aside: a start that
#: raced it (begun in the folder just before) is ended too, and makes no orphan.
SWEEP = 1.0
#: Seconds a failing revoke is tried again (our lines expire anyway; see authorized_keys).
REVOKE_FOR = 3600.0
#: Pid files in the folder that are not the cluster's own processes: the guard's, the links'.
GUARD_PID = "guard.pid"
GUARD_LOCK = "guard.lock"
#: What a stop asks the guard to revoke on its TERM (a marker), and the edit's answer.
REVOKE_ASK = "revoke.ask"
REVOKE_ANSWER = "revoke.answer"
LINK_PREFIX = "link-"


def _command_line(pid: int) -> str | None:
    """The process's command line (NULs as spaces), or None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            if handle.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return None
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return None


def _pid_files(folder: str) -> dict[str, int]:
    """Name (the file's, without ``.pid``) -> pid, for every readable pid file in the folder."""
    found = {}
    for path in glob.glob(os.path.join(glob.escape(folder), "*.pid")):
        try:
            with open(path, encoding="ascii") as handle:
                text = handle.read().strip()
        except (OSError, ValueError):
            continue
        if text.isdigit():
            found[os.path.basename(path)[: -len(".pid")]] = int(text)
    return found


def marked(pid: int, marker: str) -> bool:
    """The process runs (no zombie) and its command line names ``marker`` (not a reused pid)."""
    line = _command_line(pid)
    return line is not None and marker in line


def cluster_alive(folder: str, marker: str) -> bool:
    """A process of the cluster (not a link, a guard or an edit of authorized_keys) runs here."""
    for name, pid in _pid_files(folder).items():
        if name == GUARD_PID[: -len(".pid")] or name.startswith(
            (LINK_PREFIX, authorized_keys.EDIT_PREFIX)
        ):
            continue
        if marked(pid, marker):
            return True
    return False


def _marked_in(marker: str, folder: str) -> set[int]:
    """Every process (this one aside) whose command line names ``marker`` and that runs in
    ``folder``: those with pid files, and one that a start racing the guard began in the folder
    after the guard read them (a start after the guard moved the folder aside runs in a new
    one, under the same name: it is left alone)."""
    me, found = os.getpid(), set()
    inside = os.path.realpath(folder)
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if (cwd == inside or cwd.startswith(inside + "/")) and marked(int(entry), marker):
            found.add(int(entry))
    return found


def end_all(folder: str, marker: str, grace: float = STOP_GRACE, sweep: float = SWEEP) -> list[int]:
    """TERM every process group whose leader has a pid file in ``folder`` or runs in it, if its
    command line names ``marker``; KILL what is left after ``grace``; look again for ``sweep``
    seconds (a start racing the guard). Returns the groups that survived."""
    me = os.getpid()
    groups = {pid for pid in _pid_files(folder).values() if pid != me and marked(pid, marker)}
    groups |= {_group(pid) for pid in _marked_in(marker, folder)}
    groups.discard(os.getpgrp())
    for group in groups:
        _signal(group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while groups and time.monotonic() < deadline:
        time.sleep(0.05)
        groups = {g for g in groups if _command_line(g) is not None}
    for group in groups:
        _signal(group, signal.SIGKILL)
    until = time.monotonic() + sweep
    while time.monotonic() < until:
        for pid in _marked_in(marker, folder):
            with contextlib.suppress(OSError):
                os.killpg(_group(pid), signal.SIGKILL)
        time.sleep(0.1)
    return sorted(g for g in groups if _command_line(g) is not None)


def _signal(group: int, sig: int) -> None:
    """Signal the process group of a marked leader; one that has no group yet (between its
    start's fork and its ``setsid``) alone."""
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        with contextlib.suppress(OSError):
            os.kill(group, sig)
    except OSError:
        pass


def _group(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return pid


def claim(folder: str) -> int | None:
    """The folder's guard lock (a descriptor held for the guard's life), or None when another
    guard holds it: two starts at once may each start a guard; one of them watches."""
    try:
        fd = os.open(os.path.join(folder, GUARD_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def own_pid_file(folder: str) -> None:
    """The pid file names this guard (a start that raced it may have written another's)."""
    path = os.path.join(folder, GUARD_PID)
    mine = f"{os.getpid()}\n"
    try:
        with open(path, encoding="ascii") as handle:
            if handle.read() == mine:
                return
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError), open(path, "w", encoding="ascii") as handle:
        handle.write(mine)


def wait_until_unused(folder: str, marker: str, pause: float, quiet: float, grace: float) -> bool:
    """Until the cluster has had no process here for ``quiet`` seconds (after one ran), or none
    came within ``grace``: True. False when the folder went away (someone else cleaned up)."""
    start = time.monotonic()
    seen, empty_since = False, None
    while os.path.isdir(folder):
        own_pid_file(folder)
        now = time.monotonic()
        if cluster_alive(folder, marker):
            seen, empty_since = True, None
        else:
            empty_since = now if empty_since is None else empty_since
            if (seen and now - empty_since >= quiet) or (not seen and now - start >= grace):
                return True
        time.sleep(pause)
    return False


def revoke(key_marker: str, pause: float, give_up: float) -> None:
    """Remove the lines of ``key_marker`` from authorized_keys, trying again while that fails
    for a reason that may pass (a full disk, say; pauses doubling up to a minute) for at most
    ``give_up`` seconds; our lines expire anyway."""
    deadline = time.monotonic() + give_up
    while True:
        try:
            result = authorized_keys.set_lines(key_marker, [], 0.0)
        except authorized_keys.EditError as exc:
            if not exc.retry or time.monotonic() + pause > deadline:
                print(f"guard: the lines stay until they expire: {exc}", file=sys.stderr)
                return
            print(f"guard: revoke failed, trying again: {exc}", file=sys.stderr)
            time.sleep(pause)
            pause = min(2 * pause, 60.0)
            continue
        if result.changed:  # the file and each key's comment
            named = ", ".join(result.removed)
            print(f"guard: {key_marker} removed from {result.path}: {named}", file=sys.stderr)
        return


class Stopped(Exception):
    """A stop's TERM came while the guard waited."""


def _stopped(signum: int, frame: object) -> None:
    raise Stopped


def answer_stop(folder: str, key_marker: str) -> None:
    """The revoke a stop asked for in ``folder`` (its ``REVOKE_ASK``), with the edit's answer
    written to ``REVOKE_ANSWER`` once it is done. Only this cluster's lines: those of its key
    marker, or every line of the cluster (a home shared by several hosts holds them all). A
    failed edit writes no answer: the stop edits itself and reports why."""
    try:
        with open(os.path.join(folder, REVOKE_ASK), encoding="utf-8") as handle:
            asked = handle.read().strip()
    except (OSError, ValueError):
        return
    if asked not in (key_marker, key_marker.partition("@")[0]):
        print(f"guard: not this cluster's lines, left to the stop: {asked!r}", file=sys.stderr)
        return
    try:
        result = authorized_keys.set_lines(asked, [], 0.0)
    except (authorized_keys.EditError, ValueError) as exc:
        print(f"guard: revoke failed, left to the stop: {exc}", file=sys.stderr)
        return
    path = os.path.join(folder, REVOKE_ANSWER)
    with contextlib.suppress(OSError):  # complete or absent: written aside, then renamed
        with open(f"{path}.part", "w", encoding="utf-8") as handle:
            handle.write(authorized_keys.answer(result, by="guard") + "\n")
        os.replace(f"{path}.part", path)


def clean(folder: str, marker: str, remove: str, sweep: float = SWEEP) -> None:
    """Steps 1, 2 and 4 of the module's docstring: what is left ended, the folder removed,
    and ``remove`` (the working dir made for the cluster) once it is empty."""
    # loaded only now (most guards never get here: their cluster's cleanup ends them; every one
    # starts beside the booting workers), before the folder that holds this program moves; a
    # folder removed meanwhile leaves the hold on the environments to expire (envs.LEASE)
    try:
        from . import envs
    except ImportError:
        envs = None  # type: ignore[assignment]

    aside = f"{folder.rstrip('/')}.gone-{os.getpid()}"
    try:
        os.rename(folder, aside)
    except OSError:
        aside = folder  # removed meanwhile, or not ours to move: stop and remove in place
    left = end_all(aside, marker, sweep=sweep)
    if left:
        print(f"guard: process groups {left} survived SIGKILL", file=sys.stderr)
    shutil.rmtree(aside, ignore_errors=True)
    if envs is not None:
        envs.release(os.path.basename(folder.rstrip("/")))  # its hold on the environments
    if remove and remove.rstrip("/") != folder.rstrip("/"):
        with contextlib.suppress(OSError):
            os.rmdir(remove)  # only when empty: another cluster's folder may be in it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guard", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--folder", required=True, help="the cluster folder on this host")
    parser.add_argument(
        "--key-marker", default="", help="the lines letting its keys in (<marker>@<host>)"
    )
    parser.add_argument("--remove", default="", help="the working dir made for the cluster")
    parser.add_argument("--pause", type=float, default=PAUSE)
    parser.add_argument("--quiet", type=float, default=QUIET)
    parser.add_argument("--grace", type=float, default=GRACE)
    parser.add_argument("--sweep", type=float, default=SWEEP)
    parser.add_argument("--revoke-for", type=float, default=REVOKE_FOR)
    args = parser.parse_args(argv)
    folder = os.path.abspath(args.folder)
    marker = folder.rstrip("/") + "/"  # what every command line of the cluster names
    if not os.path.isdir(folder):  # cleaned up before this guard even looked
        if args.key_marker:
            revoke(args.key_marker, args.pause, args.revoke_for)
        return 0
    if claim(folder) is None:
        print("guard: another guard watches this folder", file=sys.stderr)
        return 0
    # a stop's TERM while it waits: the revoke it asked for, at once (see answer_stop); from
    # then on a TERM ends the guard (the edit is safe at any moment)
    try:
        if args.key_marker:
            signal.signal(signal.SIGTERM, _stopped)
        unused = wait_until_unused(folder, marker, args.pause, args.quiet, args.grace)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except Stopped:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        answer_stop(folder, args.key_marker)
        return 0
    if unused:
        print("guard: no process of the cluster is left here; cleaning up", file=sys.stderr)
        clean(folder, marker, args.remove, args.sweep)
    if args.key_marker:
        revoke(args.key_marker, args.pause, args.revoke_for)
    return 0


if __name__ == "__main__":
    sys.exit(main())
