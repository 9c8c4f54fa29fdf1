"""Set a cluster's lines in the user's ``~/.ssh/authorized_keys`` without risking a byte of it.

Runs on the hosts, with nothing but the standard library (any Python 3.8+): sent over SSH on its
stdin by the controller, or imported by the host's guard. One operation does everything —
*make the lines of this marker exactly these* — so adding, updating, renewing and revoking are
the same code: ``set`` with lines, ``set`` without (revoke).

What it never does: change a line that is not ours, reorder the user's lines, touch line endings
or bytes it does not understand (NUL, Latin-1, CRLF), or replace the file with anything it did not
read back and verify first. The new text is written to a temporary file next to the real one,
read back, and renamed over it only if the original is still what was read; any failure before
that rename leaves the original byte for byte as it was (the temporary file is removed). Our lines
go first, so a file without a final newline keeps it that way.

Our lines end with the comment ``<marker>/<dialler>@<target>``: the key of the host that dials,
let in for the host it dials. An edit names the lines it makes exact by ``<marker>`` (all of a
cluster's: its revoke) or ``<marker>@<target>`` (those for one host: a home shared by several
hosts of a cluster holds every host's lines, and each host sets and revokes its own). Each line
is given an ``expiry-time`` computed here, from this host's own clock. Lines of any of our
clusters whose expiry passed are dropped by every edit (a host that missed a revoke is swept by
the next one).

Exclusive access is a POSIX lock on the file itself (re-checked after locking: a concurrent
editor may have replaced the file meanwhile). Where locks exclude nothing across hosts (NFS
mounted ``nolock``: ``local_lock=``), nothing is edited. A read-only file, a dangling symbolic
link or a directory are left alone too: each is an error naming the file and the cause.

Lines are let in only while their cluster runs on this host (``alive``: its folder here): an
edit that adds lines first leaves its pid in the folder (``edit-<pid>.pid``), then checks that the
folder exists without a ``stopping`` file, and checks again once its lines are in. A stop writes
``stopping``, ends the edits whose pids it finds, then revokes: an edit it did not see either
refuses or takes its lines out again, so a cleanup never waits for the edits under way.

Exit codes: 0 done (a JSON line on stdout), 1 not edited (the reason on stderr), 2 bad usage,
3 lines that raced a stop stay in the file (the reason on stderr; they expire).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import sys
import time
from collections.abc import Iterator
from typing import NamedTuple

#: Every marker of ours starts with this (the links' keys of a cluster: ``<prefix><id>``).
MARKER_PREFIX = "lazycluster-link-"
#: Seconds an edit waits for another editor's lock before giving up (nothing edited).
LOCK_TIMEOUT = 10.0
#: Attempts when the file changes between our read and our rename (an editor that takes no
#: lock, e.g. the user's own ``ssh-copy-id``); files replaced by our other editors while we
#: waited for the lock are tried again until LOCK_TIMEOUT.
ATTEMPTS = 5
#: Temporary files of ours older than this (seconds) are removed by the next edit.
STALE_TEMP = 3600.0
TEMP_TAG = ".lazycluster-"
#: In a cluster's folder on this host: written by a stop before it revokes the lines.
STOPPING = "stopping"
#: In a cluster's folder on this host: the pid of an edit that adds lines, while it runs.
EDIT_PREFIX = "edit-"
EDIT_PID = EDIT_PREFIX + "{pid}.pid"
_MARKER = re.compile(r"[A-Za-z0-9_.-]+(@[A-Za-z0-9_.-]+)?\Z")
_EXPIRY = re.compile(rb'(?:^|,)expiry-time="(\d{14})Z"')


class EditError(Exception):
    """The file was not edited (it is as it was); the message names it and the cause.
    ``retry``: the cause may pass (a full disk, a quota, another editor's lock)."""

    def __init__(self, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry


class LinesLeft(EditError):
    """Lines an edit let in while its cluster began to stop here could not be taken out again
    (the file holds them until they expire)."""


#: Errors of a write that may pass: a full disk or quota, a stale NFS handle, a busy lock.
PASSING = {errno.ENOSPC, errno.EDQUOT, errno.ESTALE, errno.EAGAIN, errno.EINTR, errno.ENOLCK}


class Result(NamedTuple):
    path: str  # the file edited (the symbolic link's target, when it is one)
    changed: bool  # False: nothing to do (no line of ours, none given)
    lines: int  # lines of ours in the file now
    expiry: str  # expiry-time of our lines, UTC, YYYYMMDDHHMMSS ("" when none)
    removed: tuple[str, ...] = ()  # comments of the lines of ours it removed (not set again)


def default_path() -> str:
    return os.path.join(os.path.expanduser("~"), ".ssh", "authorized_keys")


def split_lines(data: bytes) -> list[bytes]:
    """Lines as sshd reads them (ended by ``\\n`` only), each with its ending; the last one may
    have none. ``b"".join(split_lines(d)) == d`` for any bytes."""
    parts = data.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def comment(line: bytes) -> bytes:
    """The last field of a line (a key's comment, when it has one)."""
    fields = line.split()
    return fields[-1] if fields else b""


def is_ours(line: bytes, marker: str) -> bool:
    """The line's comment is one of ``marker``'s: ``<marker>`` alone or ``<marker>/...``, and
    when ``marker`` is ``<marker>@<target>``, one that ends with ``@<target>``."""
    name, _, target = marker.partition("@")
    found, mark = comment(line), name.encode()
    if target:
        return found.startswith(mark + b"/") and found.endswith(b"@" + target.encode())
    return found == mark or found.startswith(mark + b"/")


def expired(line: bytes, now: float) -> bool:
    """A line of any of our clusters whose expiry-time has passed (UTC)."""
    if not comment(line).startswith(MARKER_PREFIX.encode()):
        return False
    found = _EXPIRY.search(line.split(None, 1)[0])
    if found is None:
        return False
    return found.group(1).decode() <= time.strftime("%Y%m%d%H%M%S", time.gmtime(now))


def with_expiry(line: str, expiry: str) -> bytes:
    """``line`` (options, key type, key, comment) with ``expiry-time`` as its first option."""
    return f'expiry-time="{expiry}Z",{line}\n'.encode()


def check_line(line: str, marker: str) -> None:
    """A line we may write: one line of printable ASCII, with options, naming ``marker``."""
    if not line.isascii() or not line.isprintable():
        raise ValueError(f"not one line of printable ASCII: {line!r}")
    fields = line.split()
    if len(fields) < 4 or not is_ours(line.encode(), marker):
        raise ValueError(f"not an options + key + {marker} line: {line!r}")
    if "expiry-time=" in fields[0]:
        raise ValueError("the expiry-time is set here, from this host's clock")


#: The first line of a file we made (the user had none), and of one whose folder we made too:
#: both go once the last line of ours does and nothing of the user's is in the file.
MADE = b"# lazycluster made this file; it goes with the last of its keys\n"
MADE_WITH_FOLDER = b"# lazycluster made this file and its folder; both go with its last key\n"


def new_text(original: bytes, marker: str, ours: list[bytes], now: float) -> bytes:
    """``ours`` first (after the line saying we made the file, while a line of ours is left),
    then every line of ``original`` that is not ``marker``'s nor an expired line of ours,
    unchanged and in order. Empty: the file was ours alone and goes."""
    lines = split_lines(original)
    made = lines[:1] if lines[:1] in ([MADE], [MADE_WITH_FOLDER]) else []
    kept = [line for line in lines[len(made) :] if not _dropped(line, marker, now)]
    prefix = MARKER_PREFIX.encode()
    if not (ours or any(comment(line).startswith(prefix) for line in kept)):
        made = []  # no line of ours left: the file is the user's, or nobody's
    return b"".join(made) + b"".join(ours) + b"".join(kept)


def _dropped(line: bytes, marker: str, now: float) -> bool:
    return is_ours(line, marker) or expired(line, now)


def verify(original: bytes, new: bytes, marker: str, ours: list[bytes], now: float) -> None:
    """Every line of ``original`` that is not ours is in ``new``, byte for byte and in order,
    after exactly ``ours``; raises EditError otherwise."""
    lines = split_lines(original)
    made = lines[:1] if lines[:1] in ([MADE], [MADE_WITH_FOLDER]) else []
    kept = [line for line in lines[len(made) :] if not _dropped(line, marker, now)]
    result = split_lines(new)
    if result[:1] == made and made:
        result = result[1:]
    if result[: len(ours)] != ours or result[len(ours) :] != kept:
        raise EditError("the new text failed its check (a line of the user's would change)")


def lock_works(path: str, mountinfo: str | None = None) -> str | None:
    """None when a POSIX lock on ``path`` excludes every editor of it; else why not (a mount
    whose locks are local to this host, as NFS mounted ``nolock``)."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
                mountinfo = handle.read()
        except OSError:  # no /proc (macOS, BSD): locks are the kernel's own there
            return None
    best, options, kind = "", "", ""
    folder = os.path.dirname(path)
    for row in mountinfo.splitlines():
        head, sep, tail = row.partition(" - ")
        fields = head.split()
        if not sep or len(fields) < 6:
            continue
        point = _unescape(fields[4])
        inside = folder == point or folder.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            rest = tail.split()
            best, kind = point, rest[0] if rest else ""
            options = fields[5] + "," + (rest[2] if len(rest) > 2 else "")
    if kind.startswith("nfs"):
        local = re.search(r"(?:^|,)local_lock=(\w+)", options)
        if "nolock" in options.split(",") or (local and local.group(1) in ("all", "posix")):
            return f"{kind} mounted with locks local to this host (nolock)"
    return None


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _failed(path: str, what: str, exc: OSError) -> EditError:
    """``path``: what failed, and the system's reason; the file was not edited."""
    return EditError(f"{path}: {what} ({exc.strerror or exc}); not edited", exc.errno in PASSING)


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 16, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _lock(fd: int, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise _failed(path, "cannot be locked", exc) from exc
        if time.monotonic() >= deadline:
            why = f"{path}: locked by another editor for {timeout:g} s; not edited"
            raise EditError(why, retry=True)
        time.sleep(0.02)


def _host() -> str:
    """This host's name as our temporary files carry it (from what ``socket.gethostname``
    reads, without loading ``socket``: the guard imports this module at every start)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", os.uname().nodename)[:40]


def _temp_name(real: str) -> str:
    host = _host()
    folder, name = os.path.split(real)
    return os.path.join(folder, f".{name}{TEMP_TAG}{host}-{os.getpid()}-{os.urandom(4).hex()}")


def _remove_stale_temps(real: str, now: float) -> None:
    """Temporary files of ours that a killed edit left: this host's whose process is gone, and
    any older than STALE_TEMP."""
    folder, name = os.path.split(real)
    host = _host()
    prefix = f".{name}{TEMP_TAG}"
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        path = os.path.join(folder, entry)
        owner = entry[len(prefix) :].rsplit("-", 2)
        try:
            old = now - os.lstat(path).st_mtime > STALE_TEMP
            gone = len(owner) == 3 and owner[0] == host and not _pid_runs(int(owner[1]))
            if old or gone:
                os.unlink(path)
        except (OSError, ValueError):
            continue


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _copy_metadata(source: os.stat_result, fd: int, real: str) -> None:
    """Mode, owner and group of the original on the new file, and its extended attributes (an
    SELinux label sshd may require); EditError when one cannot be kept."""
    try:
        os.fchmod(fd, stat.S_IMODE(source.st_mode))
        now = os.fstat(fd)
        if (now.st_uid, now.st_gid) != (source.st_uid, source.st_gid):
            os.fchown(fd, source.st_uid, source.st_gid)
    except OSError as exc:
        raise _failed(real, "its owner or mode cannot be kept", exc) from exc
    if not hasattr(os, "listxattr"):
        return
    try:
        names = os.listxattr(real)
    except OSError:
        return
    for attribute in names:
        try:
            os.setxattr(fd, attribute, os.getxattr(real, attribute))
        except OSError as exc:
            if attribute.startswith("security."):
                raise _failed(real, f"its {attribute} cannot be kept", exc) from exc


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create(path: str, ours: bytes) -> bool:
    """Make the file (and ``~/.ssh``, 0700) with ``ours``, mode 0600, if it does not exist,
    saying that we made it; False when it appeared meanwhile."""
    folder = os.path.dirname(path)
    text = (MADE if os.path.isdir(folder) else MADE_WITH_FOLDER) + ours
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise _failed(folder, "cannot be made", exc) from exc
    temp = _temp_name(path)
    try:
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise _failed(path, "cannot be created", exc) from exc
    try:
        try:
            _write_all(fd, text)
            os.fsync(fd)
            if _read_all(fd) != text:
                raise EditError(f"{path}: what was written did not read back; nothing edited")
        except OSError as exc:
            raise _failed(path, "cannot be written", exc) from exc
        finally:
            os.close(fd)
        try:
            os.link(temp, path)  # fails if the file appeared meanwhile: never overwritten
        except FileExistsError:
            return False
        except OSError as exc:
            raise _failed(path, "cannot be created", exc) from exc
        _fsync_folder(folder)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)


def stopping(folder: str) -> bool:
    """The cluster whose folder on this host is ``folder`` is stopping here, or is gone."""
    return not os.path.isdir(folder) or os.path.lexists(os.path.join(folder, STOPPING))


@contextlib.contextmanager
def _registered(folder: str) -> Iterator[None]:
    """This edit's pid in ``folder`` while it runs (a stop ends the edits it finds there)."""
    pid_file = os.path.join(folder, EDIT_PID.format(pid=os.getpid()))
    try:
        fd = os.open(pid_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            _write_all(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(pid_file)
        raise _failed(folder, "cannot hold this edit's pid", exc) from exc
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(pid_file)


def set_lines(
    marker: str,
    lines: list[str],
    lifetime: float,
    path: str | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
    alive: str | None = None,
) -> Result:
    """Make ``marker``'s lines of the file exactly ``lines`` (each valid ``lifetime`` seconds
    from now), the user's lines untouched; no lines: revoke. Raises EditError when the file was
    not edited (then it is byte for byte as it was). ``alive``: the cluster's folder on this
    host; lines are let in only while it runs here (see the module's docstring)."""
    if alive is None or not lines:
        return _set_lines(marker, lines, lifetime, path, lock_timeout)
    refused = EditError(f"{alive}: the cluster is stopping on this host; not edited")
    if stopping(alive):
        raise refused
    with _registered(alive):
        if stopping(alive):  # it began before the stop could see this edit
            raise refused
        result = _set_lines(marker, lines, lifetime, path, lock_timeout)
        if not stopping(alive):
            return result
        try:  # the stop began during the edit: its revoke may have come before our lines
            _set_lines(marker, [], 0.0, path, lock_timeout)
        except EditError as exc:
            raise LinesLeft(
                f"{alive}: the cluster began to stop during the edit, and its lines could not "
                f"be taken out again (they expire at {result.expiry}Z): {exc}",
                exc.retry,
            ) from exc
        raise EditError(
            f"{alive}: the cluster began to stop during the edit; its lines were taken out again"
        )


def _set_lines(
    marker: str, lines: list[str], lifetime: float, path: str | None, lock_timeout: float
) -> Result:
    if not _MARKER.match(marker) or not marker.startswith(MARKER_PREFIX):
        raise ValueError(f"not a marker of ours: {marker!r}")
    for line in lines:
        check_line(line, marker)
    if lines and not lifetime > 0:
        raise ValueError(f"lifetime must be > 0 seconds, not {lifetime!r}")
    path = path or default_path()
    deadline = time.monotonic() + lock_timeout
    changed = 0  # times an editor that takes no lock changed the file during ours
    while True:
        now = time.time()
        expiry = time.strftime("%Y%m%d%H%M%S", time.gmtime(now + lifetime)) if lines else ""
        ours = [with_expiry(line, expiry) for line in lines]
        left = max(0.0, deadline - time.monotonic())
        done = _attempt(path, marker, ours, now, left)
        if isinstance(done, tuple):
            return Result(done[1], done[0], len(ours), expiry, done[2] if done[0] else ())
        if done == CHANGED:
            changed += 1
            if changed >= ATTEMPTS:
                why = f"{path}: changed by another editor {changed} times; not edited"
                raise EditError(why, retry=True)
        elif time.monotonic() >= deadline:  # replaced by our other editors, again and again
            why = f"{path}: busy with other editors for {lock_timeout:g} s; not edited"
            raise EditError(why, retry=True)


#: Why an attempt must be made again: the file was replaced while we waited for its lock (by
#: an editor that takes it), or changed between our read and our rename (by one that does not).
REPLACED, CHANGED = "replaced", "changed"


def _attempt(
    path: str, marker: str, ours: list[bytes], now: float, lock_timeout: float
) -> tuple[bool, str, tuple[str, ...]] | str:
    """One try: (changed, the file's path, the comments of the lines removed), or REPLACED or
    CHANGED (try again)."""
    if os.path.islink(path) and not os.path.exists(path):
        raise EditError(f"{path}: a symbolic link to nothing; not edited")
    if not os.path.lexists(path):
        if not ours:
            return False, path, ()
        return (True, path, ()) if _create(path, b"".join(ours)) else REPLACED
    real = os.path.realpath(path)
    why = lock_works(real)
    if why is not None:
        raise EditError(f"{real}: {why}: nothing would keep two editors apart; not edited")
    try:
        fd = os.open(real, os.O_RDWR | os.O_NOFOLLOW)
    except OSError as exc:
        raise _failed(real, "cannot be opened for writing", exc) from exc
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise EditError(f"{real}: not a regular file; not edited")
        if not found.st_mode & stat.S_IWUSR:  # read-only on purpose: not ours to change
            raise EditError(
                f"{real}: read-only (mode {stat.S_IMODE(found.st_mode):04o}); not edited"
            )
        if found.st_nlink > 1:  # a rename would part it from its other names
            raise EditError(f"{real}: has {found.st_nlink} hard links; not edited")
        _lock(fd, real, lock_timeout)
        before = os.fstat(fd)
        try:
            if (os.stat(real).st_ino, os.stat(real).st_dev) != (before.st_ino, before.st_dev):
                return REPLACED  # while we waited for the lock: lock the new one
        except FileNotFoundError:
            return REPLACED
        try:
            original = _read_all(fd)
        except OSError as exc:
            raise _failed(real, "cannot be read", exc) from exc
        _remove_stale_temps(real, now)
        new = new_text(original, marker, ours, now)
        if new == original and not ours:
            return False, real, ()
        verify(original, new, marker, ours, now)
        kept = {comment(line) for line in ours}
        removed = tuple(
            comment(line).decode("ascii", "replace")
            for line in split_lines(original)
            if _dropped(line, marker, now) and comment(line) not in kept
        )
        if not new and original.startswith((MADE, MADE_WITH_FOLDER)):
            done = _remove(real, fd, before, original, original.startswith(MADE_WITH_FOLDER))
        else:
            done = _replace(real, fd, before, original, new)
        return done if isinstance(done, str) else (*done, removed)
    finally:
        os.close(fd)  # the lock goes with it


def _unchanged(real: str, fd: int, before: os.stat_result, original: bytes) -> bool:
    """``real`` is still the file we read, with what we read (no editor that takes no lock
    changed it meanwhile)."""
    now = os.stat(real)
    if (now.st_ino, now.st_size, now.st_mtime_ns) != (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    ):
        return False
    return _read_all(fd) == original


def _remove(
    real: str, fd: int, before: os.stat_result, original: bytes, folder: bool
) -> tuple[bool, str] | str:
    """The file we made holds nothing but that line: it goes (and the folder we made with it,
    if empty), if it still holds what we read."""
    try:
        if not _unchanged(real, fd, before, original):
            return CHANGED
        os.unlink(real)
    except OSError as exc:
        raise _failed(real, "cannot be removed", exc) from exc
    _fsync_folder(os.path.dirname(real))
    if folder:
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(real))
    return True, real


def _replace(
    real: str, fd: int, before: os.stat_result, original: bytes, new: bytes
) -> tuple[bool, str] | str:
    """Write ``new`` aside, check it, and rename it over ``real`` if ``real`` still holds
    ``original``; the original stays as it was on any failure."""
    temp = _temp_name(real)
    try:
        out = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise _failed(real, "no file can be made beside it", exc) from exc
    renamed = False
    try:
        try:
            try:
                _write_all(out, new)
                os.fsync(out)
                written = _read_all(out)
            except OSError as exc:
                raise _failed(real, "the new text cannot be written", exc) from exc
            _copy_metadata(before, out, real)
        finally:
            os.close(out)
        if written != new:
            raise EditError(f"{real}: the new text did not read back as written; not edited")
        try:
            if not _unchanged(real, fd, before, original):
                return CHANGED  # by an editor that takes no lock
            os.rename(temp, real)
            renamed = True
        except OSError as exc:
            raise _failed(real, "cannot be replaced", exc) from exc
        _fsync_folder(os.path.dirname(real))
        return True, real
    finally:
        if not renamed:
            with contextlib.suppress(OSError):
                os.unlink(temp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="authorized_keys", description="Set a marker's lines in ~/.ssh/authorized_keys."
    )
    parser.add_argument("--marker", required=True)
    parser.add_argument("--line", action="append", default=[], help="a line to have (repeat)")
    parser.add_argument(
        "--lines-on-stdin",
        type=int,
        default=None,
        metavar="N",
        help="also N lines on stdin, each ending in a newline (a command line has a length "
        "limit); fewer, more, or a last one cut off: nothing is edited",
    )
    parser.add_argument("--lifetime", type=float, default=0.0, help="seconds the lines are valid")
    parser.add_argument("--file", default=None, help="default: ~/.ssh/authorized_keys")
    parser.add_argument("--lock-timeout", type=float, default=LOCK_TIMEOUT)
    parser.add_argument(
        "--alive",
        default=None,
        metavar="FOLDER",
        help="the cluster's folder on this host: lines are let in only while it runs here",
    )
    args = parser.parse_args(argv)
    lines = list(args.line)
    if args.lines_on_stdin is not None:
        given = sys.stdin.read()
        got = given.split("\n")
        if got.pop() != "" or len(got) != args.lines_on_stdin:  # an input cut short
            print(
                f"authorized_keys: {args.lines_on_stdin} lines expected on stdin, "
                f"{len(given.splitlines())} came (the last complete: {given.endswith(chr(10))}); "
                "not edited",
                file=sys.stderr,
            )
            return 2
        lines += got
    try:
        result = set_lines(
            args.marker, lines, args.lifetime, args.file, args.lock_timeout, args.alive
        )
    except ValueError as exc:
        print(f"authorized_keys: {exc}", file=sys.stderr)
        return 2
    except EditError as exc:
        print(f"authorized_keys: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, LinesLeft) else 1
    print(answer(result))
    return 0


def answer(result: Result, by: str = "") -> str:
    """The edit's outcome as the one JSON line a controller reads (this program's output);
    ``by``: the program that edited, when not this one."""
    return json.dumps({**result._asdict(), **({"by": by} if by else {})})


if __name__ == "__main__":
    sys.exit(main())
