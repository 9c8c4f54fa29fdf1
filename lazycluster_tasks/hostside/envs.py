"""A host's environments: Python packages and code received from the controller, made into venvs.

Layout, under ``$XDG_CACHE_HOME/lazycluster`` (``~/.cache/lazycluster``), the login user's:

- ``units/<key>/``: one distribution's files (or one code folder's), as they are on sys.path;
- ``envs/<key>/``: a venv of this host's Python whose site-packages links to its units (its
  ``lazycluster.pth`` names the user's code folders);
  ``lazycluster-env.json`` in it says it is complete (only complete ones are used);
- ``lock``: held while units or environments are made (two starts at once make them once);
- ``envs/<key>/leases/<cluster folder name>``: a start that checked or made the environment
  holds it until its cluster's cleanup removes the file (or LEASE seconds pass): a prune
  between a start's check and its processes' start keeps it.

``check`` says what the host has (its Python, the environment, the units it lacks) without
changing anything; ``build`` receives the missing units on stdin (gzip'd tars, concatenated,
their sizes in the header, unpacked side by side) and makes the environment. Both write aside
and rename into place: a build that fails or is cut never leaves a unit or an environment a
later start would use. ``list`` and ``prune`` are for users.

Runs on the hosts with the standard library only (see ``hostside``); prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import glob
import json
import os
import platform
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

MARK = "lazycluster-env.json"
#: Seconds a start's hold on an environment lasts when no cleanup removes it (a killed
#: controller): far more than any start takes from its check to its processes.
LEASE = 900.0
LEASES = "leases"
PTH = "lazycluster.pth"
#: How the units of the user's code folders are named (``environments.py``): their folders are
#: put on sys.path, as they are on the controller's, rather than laid out in site-packages.
CODE_UNIT = "code-"
#: Seconds a build waits for another's lock (it builds the same, or what this one needs).
LOCK_WAIT = 600.0
#: Seconds a transfer may stall before the build gives up (a cut path sends no end of input).
STALL = 30.0
#: A build's folder for what it receives, in units/, followed by ``pid@host``.
INCOMING = ".incoming-"
#: Seconds another host's receiving folder is taken for a build under way (a shared home).
RECEIVING_ELSEWHERE = 3600.0
#: Unpacking processes a build runs at most (one per core): gzip's decompression, one core
#: each, is what a first start waits for, not the link (129 MiB of packs: 3.1 s of ``gzip -d``
#: on this host's core, 0.4-0.6 s through SSH; 2026-12-07).
UNPACKERS = 4
#: Bytes of stdin queued for one unpacking process at most.
QUEUED = 8 << 20


def cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lazycluster")


def _glibc() -> str:
    name, version = platform.libc_ver()
    return version if name == "glibc" else ""


def facts() -> dict[str, str]:
    """This interpreter: its path, version, machine and C library."""
    return {
        "python": sys.executable,
        "version": "%d.%d.%d" % sys.version_info[:3],  # noqa: UP031 - 3.8 hosts read this too
        "machine": platform.machine(),
        "glibc": _glibc(),
    }


def env_python(key: str) -> str | None:
    """The environment's interpreter, if the environment is complete."""
    folder = os.path.join(cache(), "envs", key)
    if not os.path.exists(os.path.join(folder, MARK)):
        return None
    return os.path.join(folder, "bin", "python")


def same_files(python: str, samples: list[list[object]]) -> bool:
    """The controller's own interpreter and files are here as they are there (a shared
    filesystem): ``python`` runs, and each sample [path, size, mtime_ns] is the same file."""
    if not samples or not os.access(python, os.X_OK):
        return False
    for path, size, stamp in samples:
        try:
            status = os.stat(str(path))
        except OSError:
            return False
        if (status.st_size, status.st_mtime_ns) != (size, stamp):
            return False
    return True


def _plain(name: str) -> bool:
    """Whether a lease's name is a plain file name (a cluster folder's)."""
    return bool(name) and not name.startswith(".") and "/" not in name


def _hold(key: str, lease: str) -> None:
    """Note that the cluster whose folder is named ``lease`` is about to use environment
    ``key`` (see LEASE); nothing when the name is not a plain file name."""
    if not _plain(lease):
        return
    folder = os.path.join(cache(), "envs", key, LEASES)
    with contextlib.suppress(OSError):
        os.makedirs(folder, mode=0o700, exist_ok=True)
        with open(os.path.join(folder, lease), "w", encoding="utf-8"):
            pass


def release(lease: str) -> None:
    """Remove the hold of the cluster whose folder is named ``lease`` on every environment
    (its cleanup; commands.release_env is the same line for the shell)."""
    if not _plain(lease):
        return
    for path in glob.glob(os.path.join(glob.escape(cache()), "envs", "*", LEASES, lease)):
        with contextlib.suppress(OSError):
            os.unlink(path)


def _held(folder: str) -> bool:
    """Whether a start holds the environment in ``folder`` (a lease younger than LEASE)."""
    where = os.path.join(folder, LEASES)
    now = time.time()
    for name in os.listdir(where) if os.path.isdir(where) else []:
        with contextlib.suppress(OSError):
            if now - os.path.getmtime(os.path.join(where, name)) < LEASE:
                return True
    return False


def check(
    key: str,
    units: list[str],
    ours: str = "",
    samples: list[list[object]] | None = None,
    lease: str = "",
) -> dict[str, object]:
    """What the host has for environment ``key``: the controller's own environment (a shared
    filesystem), or its interpreter if complete (its use is noted, and held for ``lease``),
    else the units it lacks."""
    found: dict[str, object] = dict(facts())
    if ours and same_files(ours, samples or []):
        found["same"] = True
        return found
    python = env_python(key)
    if python is not None:
        with contextlib.suppress(OSError):
            os.utime(os.path.join(cache(), "envs", key, MARK))  # last use, for prune
        _hold(key, lease)
        found["env"] = python
        found["missing"] = []
        return found
    have = os.path.join(cache(), "units")
    found["env"] = None
    found["missing"] = [u for u in units if not os.path.isdir(os.path.join(have, u))]
    return found


class BuildError(Exception):
    """Nothing half-made is left; the message names the path and the cause."""


@contextlib.contextmanager
def _locked(folder: str) -> Iterator[None]:
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(folder, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN) or time.monotonic() > deadline:
                    raise BuildError(f"{folder}/lock: not taken ({exc.strerror})") from exc
            time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def build(
    key: str,
    units: list[str],
    python: str,
    stall: float = STALL,
    lease: str = "",
    packs: list[int] | None = None,
) -> dict[str, object]:
    """Receive the units on stdin (what another start made meanwhile is kept, theirs dropped)
    and make environment ``key`` of them with ``python``; held for ``lease`` (see check).
    ``packs``: the sizes of the packs that follow, in order (unpacked side by side, a process
    per core; default: none follows)."""
    root = cache()
    # aside before the lock: the sender's bytes never wait for another start's build
    incoming, received = _receive(root, stall, packs or [])
    try:
        with _locked(root):
            _place(root, incoming)
            existing = env_python(key)
            if existing is None:
                missing = [u for u in units if not os.path.isdir(os.path.join(root, "units", u))]
                if missing:
                    raise BuildError(
                        f"{root}/units: missing after the transfer: {', '.join(missing)}"
                    )
                existing = _make_env(root, key, units, python)
            _hold(key, lease)
            return {"env": existing, "received": received}
    finally:
        shutil.rmtree(incoming, ignore_errors=True)


def _read(stall: float, most: int = 1 << 18) -> bytes:
    """The next block of stdin, of ``most`` bytes at most (b"" at its end); BuildError when
    none comes for ``stall`` s."""
    ready, _, _ = select.select([sys.stdin.buffer], [], [], stall)
    if not ready:
        raise BuildError(f"stdin: nothing came for {stall:g} s (the transfer was cut)")
    return os.read(sys.stdin.buffer.fileno(), most)


def read_header(stall: float) -> dict[str, Any]:
    """What the controller sends ahead of any data on stdin (its length in digits and a
    newline, then a JSON object): the lists that grow with the environment, which a command
    line could not hold. Read to its last byte and no further (the data follows)."""
    digits = b""
    while not digits.endswith(b"\n"):
        byte = _read(stall, 1)
        if not byte or len(digits) > 12 or not (byte.isdigit() or byte == b"\n"):
            raise BuildError("stdin: no header (its length, a newline, then JSON)")
        digits += byte
    size = int(digits)
    text = b""
    while len(text) < size:
        block = _read(stall, size - len(text))
        if not block:
            raise BuildError(f"stdin: the header ended after {len(text)} of {size} bytes")
        text += block
    try:
        header = json.loads(text)
    except ValueError as exc:
        raise BuildError(f"stdin: the header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise BuildError("stdin: the header is not a JSON object")
    return header


def _feed(fd: int, block: bytes, stall: float) -> None:
    """Write ``block`` to the non-blocking ``fd``; BuildError when it takes nothing for
    ``stall`` s (the unpacking stopped)."""
    view = memoryview(block)
    while view:
        _, ready, _ = select.select([], [fd], [], stall)
        if not ready:
            raise BuildError(f"tar: took nothing for {stall:g} s")
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            continue


class _Drain:
    """Reads a stream to its end in a thread, keeping its first lines (the causes)."""

    KEPT = 20

    def __init__(self, stream: IO[bytes]) -> None:
        self._lines: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: IO[bytes]) -> None:
        for raw in stream:
            if len(self._lines) < self.KEPT:
                self._lines.append(raw.decode(errors="replace").strip())

    def first(self) -> str:
        """The first line that says what failed ("" when there was none)."""
        self._thread.join(10)
        useful = [line for line in self._lines if line and "Exiting with failure" not in line]
        return useful[0] if useful else ""


class _Unpacker:
    """One ``tar`` that unpacks the packs given to it, fed from a queue by a thread of its own
    (the reader of stdin goes on to the next pack meanwhile)."""

    def __init__(self, incoming: str, stall: float) -> None:
        self.tar = subprocess.Popen(
            ["tar", "-x", "-z", "-i", "--no-same-owner", "-f", "-", "-C", incoming],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.tar.stdin is not None and self.tar.stderr is not None
        self.errors = _Drain(self.tar.stderr)  # a full disk makes a line per file
        os.set_blocking(self.tar.stdin.fileno(), False)
        self.stall = stall
        self.queued = 0  # bytes given and not yet written (read by the chooser, a hint)
        self.failed: BaseException | None = None
        self._blocks: list[bytes | None] = []
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def give(self, block: bytes | None) -> None:
        """Queue ``block`` (None: the end); BuildError when this tar took nothing for ``stall``
        s; BrokenPipeError when it ended (its exit status says why)."""
        deadline = time.monotonic() + self.stall
        with self._ready:
            while block is not None and self.queued >= QUEUED and self.failed is None:
                if not self._ready.wait(max(0.0, deadline - time.monotonic())):
                    raise BuildError(f"tar: took nothing for {self.stall:g} s")
            if self.failed is not None:
                raise BrokenPipeError() if isinstance(self.failed, OSError) else self.failed
            self._blocks.append(block)
            self.queued += len(block or b"")
            self._ready.notify_all()

    def _run(self) -> None:
        stdin = self.tar.stdin
        assert stdin is not None
        try:
            while True:
                with self._ready:
                    while not self._blocks:
                        self._ready.wait()
                    block = self._blocks.pop(0)
                if block is None:
                    return
                _feed(stdin.fileno(), block, self.stall)
                with self._ready:
                    self.queued -= len(block)
                    self._ready.notify_all()
        except (BuildError, OSError) as exc:
            with self._ready:
                self.failed = exc
                self._ready.notify_all()
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def finish(self) -> None:
        """Wait for its last block to be written and tar to end; BuildError when it failed."""
        self._thread.join()
        failed = self.failed
        if isinstance(failed, BuildError):
            self.stop()
            raise failed
        if self.tar.wait() != 0:
            raise BuildError(self.errors.first() or f"tar exited {self.tar.returncode}")

    def stop(self) -> None:
        self.tar.kill()
        self.tar.wait()
        with self._ready:  # the feeder, if it still waits for a block, ends
            self._blocks.append(None)
            self._ready.notify_all()
        self._thread.join()


def _unpack_side_by_side(incoming: str, stall: float, packs: list[int]) -> int:
    """The packs of these sizes from stdin, each given whole to the unpacker with the least
    queued; returns the bytes read (BuildError when stdin ends before the last pack)."""
    count = min(UNPACKERS, len(packs), os.cpu_count() or 1)
    unpackers = [_Unpacker(incoming, stall) for _ in range(count)]
    total = 0
    try:
        broken = False
        try:
            for size in packs:
                unpacker = min(unpackers, key=lambda u: u.queued)
                left = size
                while left > 0:
                    block = _read(stall, min(left, 1 << 18))
                    if not block:
                        raise BuildError(f"stdin ended {left} bytes before a pack's end")
                    total += len(block)
                    left -= len(block)
                    unpacker.give(block)
            if _read(stall, 1):
                raise BuildError("stdin: more bytes than the packs the header named")
        except BrokenPipeError:
            broken = True  # a tar ended: its status and first line say why
        for unpacker in unpackers:
            with contextlib.suppress(BrokenPipeError):
                unpacker.give(None)
        for unpacker in unpackers:
            unpacker.finish()
        if broken:
            raise BuildError("tar ended before its input did")
    except BaseException:
        for unpacker in unpackers:
            unpacker.stop()
        raise
    return total


def _receive(root: str, stall: float, packs: list[int]) -> tuple[str, int]:
    """Unpack stdin (gzip'd tars, one after the other, of the sizes ``packs``; none when the
    host has every unit already) into a folder of this process's (no lock needed). Returns the
    folder and the bytes read; removes the folder when it fails."""
    units = os.path.join(root, "units")
    os.makedirs(units, mode=0o700, exist_ok=True)
    incoming = os.path.join(units, f"{INCOMING}{os.getpid()}@{socket.gethostname()}")
    os.mkdir(incoming, 0o700)
    try:
        return incoming, _unpack_side_by_side(incoming, stall, packs)
    except BuildError as exc:
        shutil.rmtree(incoming, ignore_errors=True)
        raise BuildError(f"{incoming}: the units were not received whole ({exc})") from None
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise


def _place(root: str, incoming: str) -> None:
    """(Under the lock) move each received unit into place unless it is there already."""
    units = os.path.join(root, "units")
    for name in sorted(os.listdir(incoming)):
        target = os.path.join(units, name)
        if os.path.isdir(target):
            continue  # made meanwhile by another start: the same content
        try:
            os.rename(os.path.join(incoming, name), target)
        except OSError as exc:
            raise BuildError(f"{target}: not moved into place ({exc.strerror})") from exc


def _receiving(path: str) -> bool:
    """Whether ``path`` (in units/) is the folder of a build still receiving: its process lives
    (on this host), or another host's build made it within the hour (a home shared by hosts).
    A prune leaves those, and removes what builds cut short left."""
    name = os.path.basename(path)
    pid, _, host = (
        name[len(INCOMING) :].partition("@") if name.startswith(INCOMING) else ("", "", "")
    )
    if not pid.isdigit():
        return False
    if host != socket.gethostname():
        try:
            return time.time() - os.stat(path).st_mtime < RECEIVING_ELSEWHERE
        except OSError:
            return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process of another user's now: left to the next prune
    return True


def link_units(site_dir: str, units: list[str]) -> None:
    """Lay the units out in ``site_dir`` as pip lays out one site-packages: a link per top-level
    entry. A folder two units share (a namespace package, ``__pycache__``) becomes a folder of
    links to the entries of both; of a file two units share, the first one's stays. Their
    ``.pth`` files then run as site-packages' do. One folder on sys.path makes each import one
    lookup: a sys.path entry per unit had each failed import try them all, and a worker's
    processes start 40-70 ms of CPU slower at 130 units."""
    for unit in units:
        _link_into(unit, site_dir)


def _link_into(source: str, target: str) -> None:
    for name in sorted(os.listdir(source)):
        here, there = os.path.join(source, name), os.path.join(target, name)
        if not os.path.lexists(there):
            os.symlink(here, there)
        elif os.path.isdir(here) and os.path.isdir(there):
            if os.path.islink(there):  # shared: a folder of its own, with both units' entries
                first = os.readlink(there)
                os.unlink(there)
                os.mkdir(there)
                _link_into(first, there)
            _link_into(here, there)


def _pth_line(unit: str) -> str:
    """The line of ``lazycluster.pth`` that puts a code folder's ``unit`` on sys.path (where the
    controller has it on sys.path too): the folder itself, or ``site.addsitedir`` where it holds
    ``.pth`` files (or where its path cannot be one line)."""
    if "\n" in unit or "\r" in unit or any(n.endswith(".pth") for n in os.listdir(unit)):
        return f"import site; site.addsitedir({unit!r})\n"
    return unit + "\n"


def _make_env(root: str, key: str, units: list[str], python: str) -> str:
    envs = os.path.join(root, "envs")
    os.makedirs(envs, mode=0o700, exist_ok=True)
    aside = os.path.join(envs, f".{key}-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    try:
        made = subprocess.run(
            [python, "-m", "venv", "--without-pip", aside],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
        )
        if made.returncode != 0:
            why = made.stdout.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
            raise BuildError(f"{aside}: {python} -m venv failed ({why[0]})")
        probe = [
            os.path.join(aside, "bin", "python"),
            "-c",
            "import site; print(site.getsitepackages()[0])",
        ]
        site_dir = subprocess.run(probe, stdout=subprocess.PIPE, check=True).stdout.decode().strip()
        code = [os.path.join(root, "units", u) for u in units if u.startswith(CODE_UNIT)]
        dists = [os.path.join(root, "units", u) for u in units if not u.startswith(CODE_UNIT)]
        link_units(site_dir, dists)
        lines = [_pth_line(folder) for folder in code]
        with open(os.path.join(site_dir, PTH), "w", encoding="utf-8") as handle:
            handle.writelines(lines)
        with open(os.path.join(aside, MARK), "w", encoding="utf-8") as handle:
            json.dump({"key": key, "units": units, "made": time.time()}, handle)
        target = os.path.join(envs, key)
        os.rename(aside, target)
        return os.path.join(target, "bin", "python")
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(f"{aside}: the environment was not made ({exc})") from exc
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def in_use(root: str) -> set[str]:
    """The environments a running process was started with (a cluster's scheduler or
    workers: their command line names the environment's interpreter)."""
    prefix = os.path.join(root, "envs", "")
    lines: list[list[str]] = []
    if os.path.isdir("/proc"):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    lines.append(handle.read().decode(errors="replace").split("\0"))
            except OSError:
                continue  # gone meanwhile, or not ours to read
    else:  # no /proc (BSD, macOS): ps
        ps = subprocess.run(["ps", "-ax", "-o", "command="], stdout=subprocess.PIPE, check=False)
        lines = [line.split() for line in ps.stdout.decode(errors="replace").splitlines()]
    return {
        arg[len(prefix) :].split("/", 1)[0]
        for args in lines
        for arg in args
        if arg.startswith(prefix)
    }


def listing() -> list[dict[str, object]]:
    """The complete environments here: key, size of their units, when made, last use (a
    start that uses it notes it), and whether a running process uses it."""
    root = cache()
    busy = in_use(root)
    found = []
    for key in (
        sorted(os.listdir(os.path.join(root, "envs")))
        if os.path.isdir(os.path.join(root, "envs"))
        else []
    ):
        mark = os.path.join(root, "envs", key, MARK)
        if key.startswith(".") or not os.path.exists(mark):
            continue
        with open(mark, encoding="utf-8") as handle:
            made = json.load(handle)
        units = made.get("units", [])
        size = sum(_size(os.path.join(root, "units", u)) for u in units)
        found.append(
            {
                "key": key,
                "units": len(units),
                "bytes": size,
                "made": made.get("made"),
                "used": os.path.getmtime(mark),
                "in_use": key in busy,
                "held": _held(os.path.join(root, "envs", key)),
            }
        )
    return found


def prune(keep: list[str], older: float) -> dict[str, object]:
    """Remove the environments whose last use is ``older`` seconds ago or more, unless a
    running process uses them, a starting cluster holds them or ``keep`` names them, then the
    units no environment left uses, and what a cut build left aside."""
    root = cache()
    removed: list[str] = []
    busy: list[str] = []
    held: list[str] = []
    with _locked(root):
        now = time.time()
        kept_units: set[str] = set()
        for env in listing():
            key = str(env["key"])
            used = float(env["used"])  # type: ignore[arg-type]
            if env["in_use"]:
                busy.append(key)
            elif env["held"]:
                held.append(key)
            if key in keep or env["in_use"] or env["held"] or now - used < older:
                with open(os.path.join(root, "envs", key, MARK), encoding="utf-8") as handle:
                    kept_units.update(json.load(handle).get("units", []))
                continue
            shutil.rmtree(os.path.join(root, "envs", key), ignore_errors=True)
            removed.append(key)
        for folder in ("envs", "units"):
            where = os.path.join(root, folder)
            for name in os.listdir(where) if os.path.isdir(where) else []:
                if _receiving(os.path.join(where, name)):
                    continue
                stale = name.startswith(".") or (folder == "units" and name not in kept_units)
                if stale:
                    shutil.rmtree(os.path.join(where, name), ignore_errors=True)
    return {"removed": removed, "in_use": busy, "held": held}


def _size(folder: str) -> int:
    total = 0
    for base, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(base, name)).st_size
    return total


@contextlib.contextmanager
def _progress(every: float) -> Iterator[None]:
    """An empty line on stdout every ``every`` s while the build works: the controller counts
    ``stall`` s without one as a cut path (the answer, one JSON line, comes after them)."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            with contextlib.suppress(OSError):
                os.write(sys.stdout.fileno(), b"\n")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _sizes(header: dict[str, Any]) -> list[int]:
    """The header's pack sizes (BuildError when they are not a list of byte counts)."""
    packs = header.get("packs", [])
    if not isinstance(packs, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in packs
    ):
        raise BuildError(f"stdin: the header's packs are not a list of sizes: {packs!r:.80}")
    return packs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="envs", description=__doc__.split("\n", 1)[0])
    parser.add_argument("action", choices=["check", "build", "list", "prune"])
    parser.add_argument("--key", default="")
    parser.add_argument("--python", default=sys.executable, help="what makes the venv")
    parser.add_argument("--ours", default="", help="check: the controller's interpreter")
    parser.add_argument(
        "--stall", type=float, default=STALL, help="check, build: seconds stdin may stall"
    )
    parser.add_argument("--keep", default="", help="prune: environment keys to keep")
    parser.add_argument("--older", type=float, default=0.0, help="prune: unused seconds")
    parser.add_argument("--lease", default="", help="check, build: the cluster folder's name")
    args = parser.parse_args(argv)
    try:
        # check, build: the unit keys in order (and check's samples, [[path, size, mtime_ns],
        # ...]) come first on stdin
        header = read_header(args.stall) if args.action in ("check", "build") else {}
        units = [str(u) for u in header.get("units", [])]
        if args.action == "check":
            answer: object = check(args.key, units, args.ours, header.get("samples"), args.lease)
        elif args.action == "build":
            with _progress(args.stall / 3):
                answer = build(args.key, units, args.python, args.stall, args.lease, _sizes(header))
        elif args.action == "list":
            answer = {"envs": listing(), "cache": cache()}
        else:
            answer = prune([k for k in args.keep.split(",") if k], args.older)
    except BuildError as exc:
        print(f"envs: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
