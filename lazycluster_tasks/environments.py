"""Environments: the Python packages and the user's code the workers need, made on each host from
this machine's own, so that hosts need nothing installed and no package registry.

What goes (a :class:`Manifest`): every distribution installed here (by default; a list of names
leaves out the rest, and a few tools no worker imports are left out unless asked for), each in the
version and with the files it has here, and the user's code — the folders on ``sys.path`` that are
not installed distributions (the project a flow runs from, a ``src/`` layout, an editable
install's source). Each distribution and each code folder is one unit, keyed by its content
(RECORD hashes, or sizes and times): a changed file makes a new key, the rest is reused.

How it travels: each unit is packed once here, a gzip'd tar kept in the cache folder, and only
the units a host lacks are sent, concatenated in one stream, in one command per host. On the host
(``hostside/envs.py``) they land in ``~/.cache/lazycluster/units/<key>/`` and an environment is a
venv of the host's own Python of the same minor version, ``~/.cache/lazycluster/envs/<key>/``,
whose site-packages links to the distributions' folders and whose one ``.pth`` file adds the code
folders: many environments share the units, and a second start finds its environment at once. A
host whose interpreter is this machine's and sees the same units (a shared filesystem) uses it as
it is: nothing is sent.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gzip
import hashlib
import importlib.metadata as metadata
import importlib.util
import io
import json
import logging
import os
import platform
import re
import shlex
import sys
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazycluster_tasks import commands, hostside
from lazycluster_tasks.connection import CommandResult, tail
from lazycluster_tasks.errors import EnvironmentSyncError, RemoteEnvironmentError
from lazycluster_tasks.group import run_parallel
from lazycluster_tasks.hostside.envs import CODE_UNIT
from lazycluster_tasks.runtime import Runtime

logger = logging.getLogger(__name__)

#: Distributions no worker imports, left out unless named: installers, linters, test tools.
NOT_FOR_WORKERS = (
    "pip",
    "setuptools",
    "wheel",
    "build",
    "twine",
    "virtualenv",
    "pre-commit",
    "mypy",
    "ruff",
    "black",
    "flake8",
    "pylint",
    "isort",
    "pytest",
    "pytest-*",
    "hypothesis",
    "coverage",
    "tox",
    "nox",
    "playwright",
    "types-*",
    "*-stubs",
)
#: Folders and files a code folder never ships (beside what its .gitignore names).
CODE_SKIPPED = (
    ".git",
    ".hg",
    ".svn",
    "__pycache__",
    "*.pyc",
    ".venv",
    "venv",
    ".tox",
    ".nox",
    "node_modules",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "*.egg-info",
    ".ipynb_checkpoints",
)
#: How a host lays an environment out (hostside/envs.py); part of every key, so a change of
#: layout makes new environments rather than reusing old ones. 3: site-packages links to the
#: distributions' units (2: a .pth line per unit; 1: a site.addsitedir per unit).
ENV_LAYOUT = 3
#: What the user's code folders may hold, together (then a clear error).
CODE_LIMIT = 50 * 2**20
CODE_FILES_LIMIT = 20_000


@dataclass(frozen=True)
class Unit:
    """One thing a host environment is made of: an installed distribution or a code folder,
    as files under one root (what goes on ``sys.path``), keyed by its content."""

    name: str  # the distribution's (normalized) or "code-<folder name>"
    version: str
    #: (where the file goes under the unit's folder on a host, the file here)
    files: tuple[tuple[str, str], ...]
    size: int
    key: str
    #: a glibc the distribution's binaries need (from its WHEEL tags), e.g. (2, 17)
    glibc: tuple[int, int] | None = None

    def describe(self) -> str:
        return f"{self.name} {self.version}".strip()


@dataclass(frozen=True)
class Manifest:
    """What an environment of this machine's is made of, and what a host needs to run it."""

    python: str  # "3.11"
    machine: str  # "x86_64"
    units: tuple[Unit, ...]
    key: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(f"{self.python} {self.machine} {ENV_LAYOUT}".encode())
        for unit in self.units:
            digest.update(unit.key.encode())
        object.__setattr__(self, "key", digest.hexdigest()[:16])

    #: the user's code folders here (their units are among ``units``)
    code_folders: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return sum(u.size for u in self.units)

    @property
    def glibc(self) -> tuple[int, int] | None:
        """The newest glibc one of the distributions' binaries needs (None: none)."""
        needs = [u.glibc for u in self.units if u.glibc is not None]
        return max(needs) if needs else None

    def describe(self) -> str:
        return (
            f"Python {self.python} on {self.machine}, {len(self.units)} parts, "
            f"{self.size / 2**20:.0f} MiB"
        )


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(name, normalize(p)) for p in patterns)


def scan(
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    code: Sequence[str] | None = None,
) -> Manifest:
    """This machine's environment as a manifest: the installed distributions (``include``:
    only those; ``exclude``: names or patterns left out, beside NOT_FOR_WORKERS unless
    ``include`` names them) and the user's code folders (``code``: these; default: the folders
    on ``sys.path`` that hold no installed distribution)."""
    units = list(_distributions(include, exclude))
    # what distributions hold already (an editable install's source in the project folder)
    shipped = {source for u in units for _, source in u.files}  # strings: 90k Paths took 0.07 s
    folders = code_folders(code)
    for folder in folders:
        unit = _code_unit(Path(folder), shipped)
        if unit is not None:
            units.append(unit)
    units.sort(key=lambda u: u.name)
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return Manifest(python, platform.machine(), tuple(units), tuple(folders))


#: (sys.path, its distributions' metadata folders and times, include, exclude) -> each
#: distribution's unit in that state, or the distribution itself where it is installed for
#: development (its sources are read again on every scan: they change without an install)
_seen: dict[tuple[object, ...], tuple[Unit | metadata.Distribution, ...]] = {}


def _installed() -> tuple[object, ...]:
    """What is installed where on sys.path: each entry's metadata folders with their times (an
    install, an upgrade or an uninstall changes them; files written beside them do not)."""
    found: list[object] = [tuple(sys.path)]
    for entry in sys.path:
        folder = entry or "."
        try:
            names = sorted(n for n in os.listdir(folder) if n.endswith((".dist-info", ".egg-info")))
        except OSError:
            continue
        for name in names:
            with contextlib.suppress(OSError):
                found.append((entry, name, os.stat(os.path.join(folder, name)).st_mtime_ns))
    return tuple(found)


def _distributions(include: Sequence[str] | None, exclude: Sequence[str]) -> tuple[Unit, ...]:
    """The units of the installed distributions, read once per state of what is installed
    (see ``_installed``); those installed for development, on every call."""
    state = (_installed(), tuple(include or ()), include is None, tuple(exclude))
    found = _seen.get(state)
    if found is None:
        found = tuple(_read_distributions(include, exclude))
        _seen.clear()
        _seen[state] = found
    units = []
    for item in found:
        unit = (
            _dist_unit(item, normalize(item.metadata["Name"]))
            if not isinstance(item, Unit)
            else item
        )
        if unit is not None:
            units.append(unit)
    return tuple(units)


def _read_distributions(
    include: Sequence[str] | None, exclude: Sequence[str]
) -> Iterator[Unit | metadata.Distribution]:
    wanted = {normalize(n) for n in include} if include is not None else None
    seen: set[str] = set()
    for dist in metadata.distributions():
        name = normalize(dist.metadata["Name"] or "")
        if not name or name in seen:
            continue  # the first on sys.path is the one imported
        seen.add(name)
        if wanted is not None and name not in wanted:
            continue
        if _matches(name, exclude) or (wanted is None and _matches(name, NOT_FOR_WORKERS)):
            continue
        if _editable(dist):
            yield dist
            continue
        unit = _dist_unit(dist, name)
        if unit is not None:
            yield unit


current = scan  # what a start asks for: the distributions' units are reused while unchanged


def _library_roots() -> set[str]:
    paths = sysconfig.get_paths()
    found = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    found |= {p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))}
    return {os.path.realpath(p) for p in found}


def _dist_unit(dist: metadata.Distribution, name: str) -> Unit | None:
    """A distribution's files under its root (its site-packages), without those outside it
    (scripts, data files); an editable install's: its source folders instead of its hooks."""
    editable = _editable(dist)
    picked: list[tuple[str, str]] = []
    hashes: list[str] = []
    for record in dist.files or []:
        relative = str(record)
        # absolute: a distribution found through "" on sys.path (python -c or -m in a project
        # with its .egg-info) names its files from the current folder, which a host has not
        path = Path(os.path.abspath(str(dist.locate_file(record))))
        if relative.startswith("..") or not path.is_file():
            continue
        if editable and ".dist-info/" not in relative and ".egg-info/" not in relative:
            continue  # its sources are shipped as they are now, below
        picked.append((relative, str(path)))
        hashes.append(record.hash.value if record.hash else _stamp(path))
    if editable:
        for top in _top_levels(dist):
            spec = importlib.util.find_spec(top)
            where = list(spec.submodule_search_locations or []) if spec is not None else []
            source = (
                Path(where[0]) if where else Path(spec.origin) if spec and spec.origin else None
            )
            if source is None or not source.exists():
                continue
            for path in _walk(source) if source.is_dir() else [source]:
                picked.append((str(path.relative_to(source.parent)), str(path)))
                hashes.append(_stamp(path))
    if not picked:
        return None
    return _unit(name, dist.version or "0", picked, hashes, _glibc_needed(dist))


def _unit(
    name: str,
    version: str,
    files: list[tuple[str, str]],
    stamps: list[str],
    glibc: tuple[int, int] | None = None,
) -> Unit:
    listing = sorted(f"{where} {stamp}" for (where, _), stamp in zip(files, stamps, strict=True))
    digest = hashlib.sha256("\n".join(listing).encode()).hexdigest()[:12]
    size = sum(os.path.getsize(source) for _, source in files)
    key = f"{name}-{version}-{digest}" if version else f"{name}-{digest}"
    return Unit(name, version, tuple(files), size, key, glibc)


def _editable(dist: metadata.Distribution) -> bool:
    """Installed for development: its files are a project's sources (an editable install, or
    a project's own .egg-info found on sys.path), which its metadata may not list as they are."""
    root = os.path.realpath(str(dist.locate_file("")))
    if root not in _library_roots():
        return True
    try:
        text = dist.read_text("direct_url.json")
        return bool(text and json.loads(text).get("dir_info", {}).get("editable"))
    except (ValueError, OSError):
        return False


def _top_levels(dist: metadata.Distribution) -> list[str]:
    text = dist.read_text("top_level.txt") or ""
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if names:
        return names
    mapping = metadata.packages_distributions()
    name = dist.metadata["Name"]
    return [top for top, dists in mapping.items() if name in dists]


def _glibc_needed(dist: metadata.Distribution) -> tuple[int, int] | None:
    """The glibc the distribution's wheel tags ask for (manylinux), None for pure Python."""
    text = dist.read_text("WHEEL") or ""
    needs = []
    for line in text.splitlines():
        if not line.startswith("Tag:"):
            continue
        tag = line.split(":", 1)[1].strip()
        if m := re.search(r"manylinux_(\d+)_(\d+)_", tag):
            needs.append((int(m.group(1)), int(m.group(2))))
        elif m := re.search(r"manylinux(1|2010|2014)_", tag):
            needs.append({"1": (2, 5), "2010": (2, 12), "2014": (2, 17)}[m.group(1)])
    return min(needs) if needs else None  # any of its tags will do: the least it needs


def code_folders(code: Sequence[str] | None = None) -> list[str]:
    """The user's code folders: ``code``, or by default :func:`_code_folders` (cheap: no
    distribution is read)."""
    return [os.path.realpath(f) for f in code] if code is not None else _code_folders()


def _code_folders() -> list[str]:
    """Folders on sys.path that are not the standard library's or installed distributions':
    the user's project (where the flow runs from, PYTHONPATH, a src/ layout)."""
    roots = _library_roots()
    found: list[str] = []
    for entry in sys.path:
        path = os.path.realpath(entry or os.getcwd())
        if path in roots or not os.path.isdir(path) or path in found:
            continue
        if any(path.startswith(r.rstrip("/") + "/") for r in roots):
            continue
        found.append(path)
    return found


def _code_unit(folder: Path, shipped: set[str]) -> Unit | None:
    """The Python code of a folder of the user's (what its .gitignore and CODE_SKIPPED leave),
    without what shipped distributions already hold."""
    ignore = list(CODE_SKIPPED) + _gitignore(folder)
    files: list[tuple[str, str]] = []
    stamps: list[str] = []
    size = 0
    for path in _walk(folder, ignore):
        if str(path) in shipped:
            continue
        files.append((str(path.relative_to(folder)), str(path)))
        stamps.append(_stamp(path))
        size += path.stat().st_size
        if size > CODE_LIMIT or len(files) > CODE_FILES_LIMIT:
            raise EnvironmentSyncError(
                f"the code folder {folder} holds more than {CODE_LIMIT >> 20} MiB or "
                f"{CODE_FILES_LIMIT} files: name the folders to ship (code=[...]), list what "
                "to leave out in its .gitignore, or environment=None"
            )
    if not any(where.endswith(".py") for where, _ in files):
        return None
    return _unit(f"{CODE_UNIT}{normalize(folder.name) or 'root'}", "", files, stamps)


def _gitignore(folder: Path) -> list[str]:
    try:
        lines = (folder / ".gitignore").read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.strip().strip("/") for line in lines if line.strip() and not line.startswith("#")]


def _walk(top: Path, ignore: Sequence[str] = ("__pycache__",)) -> list[Path]:
    found = []
    for base, dirs, names in os.walk(top):
        here = Path(base)
        dirs[:] = sorted(d for d in dirs if not _ignored(d, here / d, top, ignore))
        for name in sorted(names):
            path = here / name
            if not _ignored(name, path, top, ignore) and path.is_file():
                found.append(path)
    return found


def _ignored(name: str, path: Path, top: Path, patterns: Sequence[str]) -> bool:
    relative = str(path.relative_to(top))
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(relative, p) for p in patterns)


def _stamp(path: Path) -> str:
    status = path.stat()
    return f"{status.st_size}:{status.st_mtime_ns}"


class Packs:
    """Each unit packed once (a gzip'd tar, its files under ``<key>/``), kept in ``folder``."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def path(self, unit: Unit) -> Path:
        """The unit's pack, made now if it is not there yet (written aside, then renamed)."""
        packed = self.folder / f"{unit.key}.tar.gz"
        if packed.exists():
            return packed
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, temp = tempfile.mkstemp(prefix=f".{unit.key}.", dir=self.folder)
        try:
            with (
                os.fdopen(fd, "wb") as raw,
                gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as out,
                tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar,
            ):
                for where, source in unit.files:
                    info = tar.gettarinfo(source, f"{unit.key}/{where}")
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    with open(source, "rb") as handle:
                        tar.addfile(info, handle)
            os.replace(temp, packed)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return packed


def stream(packs: Packs, units: Iterable[Unit], head: bytes = b"") -> io.BufferedReader:
    """The packs of ``units`` as one stream (concatenated gzip'd tars, read with -i), after
    ``head``."""
    paths = [packs.path(u) for u in units]
    return io.BufferedReader(_Concatenated(paths, head))


class _Concatenated(io.RawIOBase):
    def __init__(self, paths: Sequence[Path], head: bytes = b"") -> None:
        self._paths = list(paths)
        self._current: io.BufferedReader | io.BytesIO | None = io.BytesIO(head) if head else None

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        super().close()

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while True:
            if self._current is None:
                if not self._paths:
                    return 0
                self._current = open(self._paths.pop(0), "rb")  # noqa: SIM115
            n = self._current.readinto(buffer)
            if n:
                return n
            self._current.close()
            self._current = None


# -- making the environment on the hosts -------------------------------------------------------

#: Seconds a host has to say what it has.
CHECK_TIMEOUT = 60.0
#: Bytes per second a transfer is given at least (then its timeout passes).
SLOWEST = 1 << 20
#: Seconds a transfer may make no progress, here and on the host, before it counts as cut.
STALL = 30.0


@dataclass(frozen=True)
class HostEnvironment:
    """What a host runs the cluster's processes with."""

    host: str
    python: str
    #: this machine's own interpreter and files, on a filesystem the host shares
    shared: bool = False
    sent: int = 0
    seconds: float = 0.0


def _program() -> str:
    return hostside.source("envs")


def host_line(*args: str) -> str:
    """The host program for the user (``list``, ``prune``), with the host's own Python."""
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return commands.any_python(shlex.join(["-I", "-c", _program(), *args]), [f"python{minor}"])


def env_key(manifest: Manifest, python: str | None) -> str:
    """The key of a host's environment: the manifest's, and the interpreter given as its base
    (another base is another environment; the units are shared)."""
    if python is None:
        return manifest.key
    return f"{manifest.key}-{hashlib.sha256(python.encode()).hexdigest()[:8]}"


def check_line(
    manifest: Manifest,
    python: str | None,
    lease: str = "",
    samples: Sequence[list[Any]] | None = None,
) -> str:
    """Ask a host what it has: run by ``python`` (the given base), else by the first of
    python3.X, python3; it reads :func:`check_input` on its stdin. ``lease``: the cluster
    folder's name, whose start holds the environment it finds until its cleanup (a prune
    meanwhile keeps it). ``samples``: the manifest's (:func:`_samples`), when taken already."""
    key = env_key(manifest, python)
    args = ["check", "--key", key, "--ours", sys.executable, "--lease", lease]
    run = shlex.join(["-I", "-c", _program(), *args])
    if python is not None:
        run = f"exec {shlex.quote(python)} {run}"
    else:
        run = commands.any_python(run, [f"python{manifest.python}"])
    same = _same_files(_samples(manifest) if samples is None else samples)
    if same is None:
        return run
    return f"if {same}; then echo {shlex.quote(SAME)}; else {run}; fi"


def check_input(manifest: Manifest, samples: Sequence[list[Any]] | None = None) -> bytes:
    """What the check reads on its stdin: the units in order and a sample file of each
    (``samples``: as for :func:`check_line`)."""
    if samples is None:
        samples = _samples(manifest)
    return header({"units": [u.key for u in manifest.units], "samples": list(samples)})


def header(options: Mapping[str, Any]) -> bytes:
    """``options`` as the host program reads them ahead of any data on its stdin (see
    ``hostside/envs.read_header``). They grow with the environment: on a command line, a few
    hundred distributions would pass the 128 KiB a single argument may have."""
    text = json.dumps(options).encode()
    return b"%d\n%s" % (len(text), text)


#: The check's answer where a host shares this machine's files (as hostside.envs.check's).
SAME = json.dumps({"same": True})


#: Bytes the sample files' names may take in the check's line (relative to their common
#: folder: about 50 per unit); past it the line asks the host program only.
SAMPLE_NAMES_MOST = 48 << 10


def _same_files(samples: Sequence[list[Any]]) -> str | None:
    """Shell that succeeds where the host sees this machine's interpreter and each sample file
    as they are here (size, mtime to the nanosecond: GNU stat's ``%.9Y``, their digest by
    sha256sum; the paths relative to their common folder, to keep the line short). Where it
    cannot tell (another stat), it fails and the host program decides. It saves the host an
    interpreter at every start where it shares this machine's filesystem. None when there is
    no sample, or their names would take more than SAMPLE_NAMES_MOST."""
    if not samples:
        return None
    paths = [str(path) for path, _, _ in samples]
    root = os.path.commonpath(paths)
    if root in paths:  # one sample: its folder
        root = os.path.dirname(root)
    names = " ".join(shlex.quote(os.path.relpath(path, root)) for path in paths)
    if len(names) > SAMPLE_NAMES_MOST:
        return None
    listing = "".join(
        f"{size} {stamp // 10**9}.{stamp % 10**9:09d}\n" for _, size, stamp in samples
    )
    want = f"{hashlib.sha256(listing.encode()).hexdigest()}  -"
    seen = (
        f'"$(cd -- {shlex.quote(root)} 2>/dev/null && '
        f'stat -L -c "%s %.9Y" -- {names} 2>/dev/null | sha256sum)"'
    )
    return f"[ -x {shlex.quote(sys.executable)} ] && [ {seen} = {shlex.quote(want)} ]"


def _samples(manifest: Manifest) -> list[list[Any]]:
    """One file per unit, as a host that shares this machine's filesystem sees it."""
    return [_sample(u) for u in manifest.units if u.files]


def _sample(unit: Unit) -> list[object]:
    """One file of the unit, as a host that shares this machine's filesystem sees it."""
    source = unit.files[0][1]
    status = os.stat(source)
    return [source, status.st_size, status.st_mtime_ns]


def build_line(manifest: Manifest, python: str, given: str | None = None, lease: str = "") -> str:
    """Make the environment with ``python`` (the interpreter the check ran with) of what it
    reads on stdin: :func:`build_input`, then the packs of the units it lacks; held for
    ``lease`` as by :func:`check_line`."""
    args = ["build", "--key", env_key(manifest, given), "--python", python]
    args += ["--stall", f"{STALL:g}", "--lease", lease]
    return shlex.join([python, "-I", "-c", _program(), *args])


def build_input(manifest: Manifest, packs: Sequence[int] | None = None) -> bytes:
    """What the build reads on its stdin before the units' packs: the units in order, and the
    sizes of the packs that follow (the host unpacks them side by side, a core each)."""
    options: dict[str, Any] = {"units": [u.key for u in manifest.units]}
    if packs is not None:
        options["packs"] = list(packs)
    return header(options)


def _answer(result: CommandResult, host: str, what: str) -> dict[str, Any]:
    if result.ok:
        try:
            return dict(json.loads(result.stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            pass
    why = " ".join(tail(result.stderr or result.output, 400).split()) or f"exit {result.exit_code}"
    raise RemoteEnvironmentError(f"{host}: {what} failed: {why}", host=host)


def _fits(host: str, found: Mapping[str, Any], manifest: Manifest, given: bool = False) -> None:
    """The host's interpreter runs what this machine's does; RemoteEnvironmentError naming
    what differs otherwise."""
    version = str(found.get("version", "?"))
    if ".".join(version.split(".")[:2]) != manifest.python:
        which = "the interpreter given (python=) is" if given else "found"
        raise RemoteEnvironmentError(
            f"{host}: no Python {manifest.python} ({which} {version} at {found.get('python')}); "
            f"install python{manifest.python} there, or give python= an interpreter of it "
            "there, or environment=None to use one you manage",
            host=host,
        )
    if found.get("machine") != manifest.machine:
        raise RemoteEnvironmentError(
            f"{host}: a {found.get('machine')} machine; this one's packages are built for "
            f"{manifest.machine} (environment=None to use one you installed there)",
            host=host,
        )
    needed = manifest.glibc
    glibc = tuple(int(x) for x in str(found.get("glibc") or "0.0").split(".")[:2])
    if needed is not None and glibc < needed:
        have = found.get("glibc") or "no glibc"
        raise RemoteEnvironmentError(
            f"{host}: its C library ({have}) is older than glibc {needed[0]}.{needed[1]}, which "
            "packages built here need (environment=None to use one you installed there)",
            host=host,
        )


def sync(
    runtimes: Sequence[Runtime],
    manifest: Manifest,
    packs: Packs,
    python: Mapping[str, str] | None = None,
    on_host: Callable[[HostEnvironment], None] | None = None,
    lease: str = "",
) -> dict[str, HostEnvironment]:
    """Each host's interpreter for ``manifest``: this machine's where the host shares its
    files, else an environment of its own, made where it is missing from the units it lacks
    (packed once here, sent in one stream per host, all hosts at once). ``python``: host ->
    the interpreter given there, the base its environment is made from (default: python3.X
    on its PATH); ``on_host`` is called as each host is ready
    (from its own thread; an exception from it is logged). Raises GroupError naming each host
    that failed and why (no Python of the minor version, another platform, a full disk, a
    cut transfer). ``lease``: see :func:`check_line`."""
    chosen = dict(python or {})
    started = {rt.host: time.monotonic() for rt in runtimes}

    samples = _samples(manifest)  # one stat of each sample for every host's check
    asked = check_input(manifest, samples)

    def look(runtime: Runtime) -> dict[str, Any]:
        result = runtime.connection.run(
            check_line(manifest, chosen.get(runtime.host), lease, samples),
            stdin=asked,
            timeout=CHECK_TIMEOUT,
        )
        given = chosen.get(runtime.host)
        if result.exit_code in (126, 127) and given is not None:
            raise RemoteEnvironmentError(
                f"{runtime.host}: the interpreter given (python=) {given!r} does not run there "
                f"({tail(result.output, 200).strip()}); give one of Python {manifest.python} "
                "there, or none to use python3.X on the PATH",
                host=runtime.host,
            )
        if result.exit_code == 127:
            raise RemoteEnvironmentError(
                f"{runtime.host}: no Python 3 to run the cluster with "
                f"({tail(result.output, 200).strip()}); install python{manifest.python}",
                host=runtime.host,
            )
        return _answer(result, runtime.host, "the environment check")

    found = run_parallel("environment check", {rt.host: rt for rt in runtimes}, look)
    lacking = {u for answer in found.values() for u in answer.get("missing") or []}
    units = [u for u in manifest.units if u.key in lacking]
    for unit in units:  # packed once, here, before any host waits for it
        packs.path(unit)

    def make(runtime: Runtime) -> HostEnvironment:
        made = _make(runtime)
        if on_host is not None:
            try:
                on_host(made)
            except Exception:
                logger.exception("environment progress callback failed")
        return made

    def _make(runtime: Runtime) -> HostEnvironment:
        host, answer = runtime.host, found[runtime.host]
        if answer.get("same"):
            return HostEnvironment(host, sys.executable, shared=True)
        _fits(host, answer, manifest, host in chosen)
        if answer.get("env"):
            return HostEnvironment(host, str(answer["env"]), seconds=_since(started[host]))
        missing = set(answer.get("missing") or [])
        sending = [u for u in units if u.key in missing]
        sizes = [packs.path(u).stat().st_size for u in sending]
        size = sum(sizes)
        with stream(packs, sending, head=build_input(manifest, sizes)) as data:
            result = runtime.connection.run(
                build_line(manifest, str(answer["python"]), chosen.get(host), lease),
                stdin=data,
                timeout=CHECK_TIMEOUT + size / SLOWEST,
                stall=STALL,
            )
        made = _answer(result, host, "making the environment")
        return HostEnvironment(host, str(made["env"]), sent=size, seconds=_since(started[host]))

    return run_parallel("environment", {rt.host: rt for rt in runtimes}, make)


def _since(start: float) -> float:
    return time.monotonic() - start
