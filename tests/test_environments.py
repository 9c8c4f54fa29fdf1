"""The environment follows the job: what this machine sends (environments.py) and what a host
makes of it (hostside/envs.py), on real files and processes here, then on hosts that share
nothing with this machine (their own filesystem, an unprivileged user, the system's Python)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from lazycluster_tasks import environments, hostside
from lazycluster_tasks.errors import EnvironmentSyncError, RemoteEnvironmentError
from lazycluster_tasks.testing.helpers import fill, small_disk, wait_until


def _project(folder: Path, answer: str = "42") -> Path:
    """A user's project: a package only this machine has (not installed anywhere)."""
    package = folder / "userpkg"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "compute.py").write_text(f"def answer():\n    return {answer}\n")
    (folder / ".gitignore").write_text("data/\n")
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "big.bin").write_bytes(b"x" * 1000)
    return folder


def test_the_manifest_holds_what_workers_need_and_not_what_they_never_import(tmp_path) -> None:
    project = _project(tmp_path / "project")
    manifest = environments.scan(code=[str(project)])
    names = {u.name for u in manifest.units}
    assert {"distributed", "dask", "cloudpickle", "prefect", "lazycluster-tasks"} <= names
    assert not names & {"pip", "mypy", "ruff", "pytest", "playwright", "hypothesis"}
    code = next(u for u in manifest.units if u.name == "code-project")
    assert sorted(where for where, _ in code.files) == [
        ".gitignore",
        "userpkg/__init__.py",
        "userpkg/compute.py",
    ]  # data/ is in its .gitignore
    ours = next(u for u in manifest.units if u.name == "lazycluster-tasks")
    # this project is installed for development: its sources go as they are now
    assert "lazycluster_tasks/environments.py" in {where for where, _ in ours.files}
    assert manifest.python == f"{sys.version_info[0]}.{sys.version_info[1]}"
    same = environments.scan(code=[str(project)])
    assert same.key == manifest.key  # nothing changed: the same environment
    time.sleep(0.01)
    _project(project, answer="43")  # a changed file makes a new code unit, the rest stays
    changed = environments.scan(code=[str(project)])
    assert changed.key != manifest.key
    moved = {u.key for u in changed.units} ^ {u.key for u in manifest.units}
    assert {k.split("-")[0] for k in moved} == {"code"}
    only = environments.scan(include=["distributed", "pytest"], exclude=["dask"], code=[])
    assert {u.name for u in only.units} == {"distributed", "pytest"}  # named: no default out


def test_a_package_installed_for_development_is_read_again_and_the_rest_is_not(
    tmp_path, monkeypatch
) -> None:
    """A distribution installed for development (a project's own .egg-info on sys.path) ships
    its sources as they are at each scan, though nothing was installed meanwhile; the other
    distributions are read once, however often files appear beside them."""
    project = tmp_path / "devproject"
    (project / "devpkg").mkdir(parents=True)
    (project / "devpkg" / "__init__.py").write_text("ANSWER = 1\n")
    info = project / "devpkg-0.1.egg-info"
    info.mkdir()
    (info / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: devpkg\nVersion: 0.1\n")
    (info / "top_level.txt").write_text("devpkg\n")
    monkeypatch.syspath_prepend(str(project))

    def units() -> dict[str, environments.Unit]:
        found = environments.scan(include=["devpkg", "toolz"], code=[]).units
        return {u.name: u for u in found}

    first = units()
    assert [where for where, _ in first["devpkg"].files if where.endswith(".py")] == [
        "devpkg/__init__.py"
    ]
    time.sleep(0.01)
    (project / "devpkg" / "__init__.py").write_text("ANSWER = 2\n")  # no folder changes
    second = units()
    assert second["devpkg"].key != first["devpkg"].key
    read = list(environments._seen.values())
    (project / "output.csv").write_text("a,b\n")  # a flow's output beside its code
    third = units()
    assert third["toolz"] is first["toolz"] and list(environments._seen.values()) == read


def test_code_folders_too_large_are_a_clear_error(tmp_path, monkeypatch) -> None:
    project = _project(tmp_path / "project")
    (project / "userpkg" / "model.pkl").write_bytes(b"x" * 4096)
    monkeypatch.setattr(environments, "CODE_LIMIT", 2048)
    with pytest.raises(EnvironmentSyncError, match=r"project holds more than .*code=\[\.\.\.\]"):
        environments.scan(code=[str(project)])


@pytest.mark.parametrize(
    ("found", "says"),
    [
        ({"version": "3.9.2", "python": "/usr/bin/python3"}, "no Python {minor} (found 3.9.2 at"),
        ({"machine": "aarch64"}, "a aarch64 machine; this one's packages are built for"),
        ({"glibc": "2.5"}, "its C library (2.5) is older than glibc"),
    ],
)
def test_a_host_that_cannot_run_this_machines_packages_is_named_with_what_differs(
    found: dict, says: str
) -> None:
    manifest = environments.scan(code=[])
    host = {
        "version": f"{manifest.python}.0",
        "python": "/usr/bin/python3",
        "machine": manifest.machine,
        "glibc": "9.99",
        **found,
    }
    with pytest.raises(RemoteEnvironmentError) as info:
        environments._fits("gpu1", host, manifest)
    assert str(info.value).startswith("gpu1: " + says.format(minor=manifest.python))


# -- the host's side, run here -----------------------------------------------------------------


def envs(home: Path, *args: str, data: bytes = b"") -> subprocess.CompletedProcess:
    """hostside/envs.py as a host runs it (its source on the command line), with ``home``."""
    argv = [sys.executable, "-I", "-c", hostside.source("envs"), *args]
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    return subprocess.run(argv, input=data, capture_output=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[environments.Manifest, Packed]:
    """A small manifest (two pure-Python distributions and a project) and its packs."""
    folder = tmp_path_factory.mktemp("small")
    project = _project(folder / "project")
    manifest = environments.scan(include=["cloudpickle", "toolz"], code=[str(project)])
    return manifest, _packed(folder / "packs", manifest)


@dataclass(frozen=True)
class Packed:
    """The packs of a manifest's units as the controller sends them: one stream, and the size
    of each pack in it (the build's header names them)."""

    data: bytes
    sizes: list[int]


def _packed(folder: Path, manifest: environments.Manifest) -> Packed:
    packs = environments.Packs(folder)
    with environments.stream(packs, manifest.units) as data:
        return Packed(data.read(), [packs.path(u).stat().st_size for u in manifest.units])


def _ask(
    home: Path, manifest: environments.Manifest, action: str, packed: Packed | None = None
) -> subprocess.CompletedProcess:
    """``check`` or ``build`` of ``manifest``, with what the controller sends on stdin."""
    data = packed.data if packed is not None else b""
    return envs(home, action, "--key", manifest.key, data=_input(manifest, action, packed) + data)


def _input(manifest: environments.Manifest, action: str, packed: Packed | None = None) -> bytes:
    if action == "check":
        return environments.check_input(manifest)
    return environments.build_input(manifest, packed.sizes if packed is not None else [])


def test_a_host_makes_the_environment_once_and_finds_it_after(tmp_path, small) -> None:
    manifest, data = small
    home = tmp_path / "home"
    home.mkdir()
    before = json.loads(_ask(home, manifest, "check").stdout)
    assert before["env"] is None and len(before["missing"]) == 3
    made = _ask(home, manifest, "build", data)
    assert made.returncode == 0, made.stderr
    answer = json.loads(made.stdout)
    assert answer["received"] == len(data.data)
    python = answer["env"]
    ran = subprocess.run(
        [python, "-c", "import cloudpickle, userpkg.compute as c; print(c.answer())"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert ran.stdout.strip() == "42", ran.stderr
    after = json.loads(_ask(home, manifest, "check").stdout)
    assert after["env"] == python and after["missing"] == []
    listed = json.loads(envs(home, "list").stdout)["envs"]
    assert [e["key"] for e in listed] == [manifest.key]
    pruned = json.loads(envs(home, "prune").stdout)
    assert pruned["removed"] == [manifest.key]
    assert not list((home / ".cache" / "lazycluster" / "units").iterdir())


def test_a_host_that_shares_these_files_is_told_by_the_shell_without_an_interpreter(
    tmp_path: Path,
) -> None:
    """The check's shell compares this machine's files with what the host sees (GNU stat and
    sha256sum, no interpreter started): the same files are "same" with no Python on the PATH;
    a file changed there, or a stat that cannot tell, leaves it to the host program."""
    manifest = environments.scan(code=[str(_project(tmp_path / "project"))])
    tools = tmp_path / "tools"  # the shell's tools, and no python3 among them
    tools.mkdir()
    for tool in ("stat", "sha256sum"):
        (tools / tool).symlink_to(subprocess.check_output(["which", tool], text=True).strip())
    line = environments.check_line(manifest, None, "")

    def check(path: Path) -> subprocess.CompletedProcess[str]:
        env = {"PATH": str(path), "HOME": str(tmp_path)}
        stdin = environments.check_input(manifest).decode()
        return subprocess.run(
            ["/bin/sh", "-c", line], input=stdin, capture_output=True, text=True, env=env
        )

    same = check(tools)
    assert (same.returncode, same.stdout.strip()) == (0, environments.SAME), same
    # the project's sampled file, changed by a nanosecond
    (changed,) = [
        Path(p) for p, _, _ in environments._samples(manifest) if p.startswith(str(tmp_path))
    ]
    stamp = changed.stat()
    os.utime(changed, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1))
    decided = check(tools)  # the program runs: no Python here, so it says so
    assert decided.returncode == 127 and environments.SAME not in decided.stdout, decided
    (tools / "stat").unlink()
    (tools / "stat").symlink_to("/bin/false")  # a stat that cannot tell
    os.utime(changed, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert check(tools).returncode == 127
    with_python = check(Path(f"{tools}:{Path(sys.executable).parent}:/usr/bin:/bin"))
    assert json.loads(with_python.stdout.splitlines()[-1])["same"] is True, with_python


def _many_units(folder: Path, count: int) -> environments.Manifest:
    """A manifest of ``count`` distributions of one small file each."""
    made = []
    for n in range(count):
        code = folder / f"pkg{n}" / "__init__.py"
        code.parent.mkdir(parents=True)
        code.write_text(f"N = {n}\n")
        files = ((f"pkg{n}/__init__.py", str(code)),)
        made.append(environments.Unit(f"pkg{n}", "1.0", files, 8, f"pkg{n}-1.0-{n:012x}"))
    base = environments.scan(include=["toolz"])
    return environments.Manifest(base.python, base.machine, tuple(made))


@pytest.mark.parametrize("count", [1500, 4000])
def test_an_environment_of_thousands_of_distributions_is_checked(tmp_path, count) -> None:
    """What grows with the environment goes on stdin: the line stays below the 128 KiB one
    argument may have (before, a few hundred distributions passed it and no host started).
    The sample files' names stay in the line while they fit, for the shell's answer without
    an interpreter; past that the host program answers."""
    manifest = _many_units(tmp_path / "site", count)
    line = environments.check_line(manifest, None, "")
    stdin = environments.check_input(manifest)
    assert len(line) < 96 << 10 and len(stdin) > 128 << 10, (len(line), len(stdin))
    inline = count == 1500  # 1500 names fit in the line, 4000 do not
    assert ("sha256sum" in line) == inline
    tools = tmp_path / "tools"  # the shell's tools, and no python3 among them
    tools.mkdir()
    for tool in ("stat", "sha256sum"):
        (tools / tool).symlink_to(subprocess.check_output(["which", tool], text=True).strip())

    def check(path: str) -> subprocess.CompletedProcess[bytes]:
        env = {"PATH": path, "HOME": str(tmp_path)}
        return subprocess.run(["/bin/sh", "-c", line], input=stdin, capture_output=True, env=env)

    with_python = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    same = check(with_python)
    assert same.returncode == 0 and json.loads(same.stdout.splitlines()[-1])["same"], same
    shell_only = check(str(tools))
    assert shell_only.returncode == (0 if inline else 127), shell_only
    # a file changed here: not the same files; this host has none of the units
    (tmp_path / "site" / "pkg7" / "__init__.py").write_text("N = 'seven'\n")
    found = json.loads(check(with_python).stdout.splitlines()[-1])
    assert "same" not in found and found["env"] is None
    assert found["missing"] == [u.key for u in manifest.units]


def test_an_environment_lays_out_its_distributions_in_site_packages(tmp_path) -> None:
    """Distributions are links in the venv's site-packages (one sys.path entry for all, their
    .pth files run by site); the user's code folders are lines of lazycluster.pth."""
    project = _project(tmp_path / "project")
    manifest = environments.scan(include=["setuptools", "toolz"], code=[str(project)])
    packed = _packed(tmp_path / "packs", manifest)
    home = tmp_path / "home"
    home.mkdir()
    made = _ask(home, manifest, "build", packed)
    assert made.returncode == 0, made.stderr
    python = json.loads(made.stdout)["env"]
    units = home / ".cache" / "lazycluster" / "units"
    key = {u.name: u.key for u in manifest.units}
    (site,) = Path(python).parent.parent.glob("lib/python*/site-packages")
    assert (site / "toolz").resolve() == units / key["toolz"] / "toolz"
    assert (site / "lazycluster.pth").read_text().splitlines() == [str(units / key["code-project"])]
    probe = (
        "import sys, toolz, userpkg.compute as c; "
        "print(c.answer(), '_distutils_hack' in sys.modules, "
        f"[p for p in sys.path if p.startswith({str(units)!r})])"
    )
    ran = subprocess.run(
        [python, "-c", probe],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    # setuptools' distutils-precedence.pth ran; only the code folder is a path of its own
    assert ran.stdout.split(" ", 2) == ["42", "True", f"{[str(units / key['code-project'])]}\n"]


def test_units_sharing_a_folder_share_it_in_site_packages(tmp_path) -> None:
    """A folder two units hold (a namespace package, ``__pycache__``) holds both units' entries;
    of a file both hold, the first unit's is kept."""
    from lazycluster_tasks.hostside import envs as hostside_envs

    first, second, site = tmp_path / "first", tmp_path / "second", tmp_path / "site"
    for unit, part in ((first, "a"), (second, "b")):
        (unit / "space" / part).mkdir(parents=True)
        (unit / "space" / part / "__init__.py").write_text(f"NAME = {part!r}\n")
        (unit / "same.py").write_text(f"FROM = {unit.name!r}\n")
        (unit / "__pycache__").mkdir()
        (unit / "__pycache__" / f"{part}.txt").write_text(part)
    site.mkdir()
    hostside_envs.link_units(str(site), [str(first), str(second)])
    assert not (site / "space").is_symlink() and not (site / "__pycache__").is_symlink()
    assert sorted(p.name for p in (site / "space").iterdir()) == ["a", "b"]
    assert sorted(p.name for p in (site / "__pycache__").iterdir()) == ["a.txt", "b.txt"]
    assert (site / "same.py").resolve() == first / "same.py"
    code = "import same, space.a, space.b; print(same.FROM, space.a.NAME, space.b.NAME)"
    ran = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.stdout.split() == ["first", "a", "b"], ran.stderr


def test_a_cut_or_failed_transfer_leaves_nothing_a_later_start_would_use(tmp_path, small) -> None:
    manifest, data = small
    home = tmp_path / "home"
    home.mkdir()
    half = Packed(data.data[: len(data.data) // 2], data.sizes)
    cut = _ask(home, manifest, "build", half)
    assert cut.returncode == 1 and b"not received whole" in cut.stderr
    root = home / ".cache" / "lazycluster"
    assert not list((root / "units").iterdir()) or all(
        not p.name.startswith(".") for p in (root / "units").iterdir()
    )
    assert not (root / "envs").exists() or not list((root / "envs").iterdir())
    check = json.loads(_ask(home, manifest, "check").stdout)
    assert check["env"] is None  # nothing half-made is taken for an environment
    done = _ask(home, manifest, "build", data)  # the next start finishes it
    assert done.returncode == 0, done.stderr


def test_a_full_disk_during_a_transfer_is_an_error_naming_the_path(tmp_path, small) -> None:
    manifest, data = small
    home = tmp_path / "home"
    with small_disk(home, size="256k"):
        filler = fill(home)
        filler.unlink()
        (home / "filler").write_bytes(b"x" * (200 * 1024))  # room for less than the units
        full = _ask(home, manifest, "build", data)
        assert full.returncode == 1
        assert b"/.cache/lazycluster/units" in full.stderr and b"not received whole" in full.stderr
        leftovers = list((home / ".cache" / "lazycluster" / "units").iterdir())
        assert leftovers == []  # the part received went with the failure
        assert json.loads(_ask(home, manifest, "check").stdout)["env"] is None


def test_the_packs_are_unpacked_side_by_side_a_core_each(tmp_path, small) -> None:
    """As many ``tar`` processes as the host has cores (up to UNPACKERS, one per pack at most)
    run at once, each given whole packs; the environment is the same as one tar makes."""
    from lazycluster_tasks.hostside import envs as hostside_envs

    manifest, data = small
    home = tmp_path / "home"
    home.mkdir()
    argv = [sys.executable, "-I", "-c", hostside.source("envs"), "build", "--key", manifest.key]
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    build = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert build.stdin is not None
    try:
        build.stdin.write(_input(manifest, "build", data))  # the header: the packs' sizes
        build.stdin.flush()
        expected = min(hostside_envs.UNPACKERS, len(data.sizes), os.cpu_count() or 1)

        def tars() -> list[psutil.Process]:
            return [p for p in psutil.Process(build.pid).children() if p.name() == "tar"]

        assert wait_until(lambda: len(tars()) == expected, 10), tars()
        out, err = build.communicate(data.data, timeout=60)
    finally:
        build.kill()
        build.wait()
    assert build.returncode == 0, err
    python = json.loads(out)["env"]
    ran = subprocess.run(
        [python, "-c", "import cloudpickle, toolz, userpkg.compute as c; print(c.answer())"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.stdout.strip() == "42", ran.stderr


@pytest.mark.parametrize(
    "sizes, why",
    [
        ("longer", b"bytes before a pack's end"),
        ("shorter", b"more bytes than the packs the header named"),
        ("none", b"more bytes than the packs the header named"),
        ("negative", b"not a list of sizes"),
    ],
)
def test_a_header_whose_sizes_are_not_the_streams_leaves_nothing(
    tmp_path, small, sizes, why
) -> None:
    manifest, data = small
    told = {
        "longer": [*data.sizes[:-1], data.sizes[-1] + 1],
        "shorter": [*data.sizes[:-1], data.sizes[-1] - 1],
        "none": [],
        "negative": [-1, *data.sizes],
    }[sizes]
    home = tmp_path / "home"
    home.mkdir()
    wrong = _ask(home, manifest, "build", Packed(data.data, told))
    assert wrong.returncode == 1 and why in wrong.stderr, wrong.stderr
    units = home / ".cache" / "lazycluster" / "units"
    assert not units.exists() or list(units.iterdir()) == []
    assert json.loads(_ask(home, manifest, "check").stdout)["env"] is None


def test_a_pack_that_does_not_unpack_fails_the_build_and_leaves_nothing(tmp_path, small) -> None:
    """One tar fails (a pack's bytes corrupted) while the others unpack theirs."""
    manifest, data = small
    spoiled = bytearray(data.data)
    last = len(spoiled) - data.sizes[-1]  # the last pack: its gzip data past the header
    spoiled[last + 20 : last + 60] = bytes(40)
    home = tmp_path / "home"
    home.mkdir()
    failed = _ask(home, manifest, "build", Packed(bytes(spoiled), data.sizes))
    assert failed.returncode == 1 and b"not received whole" in failed.stderr, failed.stderr
    units = home / ".cache" / "lazycluster" / "units"
    assert list(units.iterdir()) == []
    assert _ask(home, manifest, "build", data).returncode == 0  # the next start makes it


def test_two_starts_at_once_make_one_environment(tmp_path, small) -> None:
    manifest, data = small
    home = tmp_path / "home"
    home.mkdir()
    answers: list[subprocess.CompletedProcess] = []
    threads = [
        threading.Thread(target=lambda: answers.append(_ask(home, manifest, "build", data)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.returncode for a in answers] == [0, 0, 0], [a.stderr for a in answers]
    assert len({json.loads(a.stdout)["env"] for a in answers}) == 1
    root = home / ".cache" / "lazycluster"
    assert sorted(p.name for p in (root / "units").iterdir()) == sorted(
        u.key for u in manifest.units
    )
    assert [p.name for p in (root / "envs").iterdir()] == [manifest.key]


def test_sync_code_has_workers_here_read_the_changed_files_in_place(tmp_path, monkeypatch) -> None:
    """On this machine (and hosts sharing its files) workers read the user's folders where they
    are: sync_code() makes them forget what they loaded, and the next task reads the change."""
    from distributed import Client

    from lazycluster_tasks import LazySSHCluster

    project = _project(tmp_path / "project")
    monkeypatch.syspath_prepend(str(project))
    cluster = LazySSHCluster(
        ["localhost"], threads_per_worker=1, environment={"code": [str(project)]}
    )
    try:
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=60)

            def answer() -> int:
                import userpkg.compute

                return userpkg.compute.answer()

            assert list(client.run(answer).values()) == [42]
            time.sleep(0.01)
            _project(project, answer="43")
            assert list(client.run(answer).values()) == [42]  # loaded already: kept
            dropped = cluster.sync_code()
            assert list(dropped.values()) == [["userpkg", "userpkg.compute"]]
            assert list(client.run(answer).values()) == [43]
    finally:
        cluster.close()


def test_the_cli_lists_what_a_start_ships_by_distribution() -> None:
    def shipped(*args: str) -> dict:
        argv = [sys.executable, "-m", "lazycluster_tasks.cli", "envs", "--shipped", *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    everything = shipped("--json")
    sizes = {u["name"]: u["bytes"] for u in everything["units"]}
    assert {"dask", "distributed", "cloudpickle"} <= set(sizes) and "pytest" not in sizes
    assert everything["bytes"] == sum(sizes.values())
    assert list(sizes.values()) == sorted(sizes.values(), reverse=True)  # the largest first
    without = shipped("--json", "--exclude", "numpy")
    assert "numpy" not in {u["name"] for u in without["units"]}
    assert everything["bytes"] - without["bytes"] == sizes["numpy"]
    assert without["key"] != everything["key"]


def test_a_starting_cluster_holds_its_environment_until_its_cleanup_or_the_lease_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between a start's check and its processes' start nothing runs with the environment:
    a prune then (even at --older 0) keeps it while the start holds it; the cluster's cleanup
    lets go (the shell line of its stop, or the guard's), and a hold nobody ended expires."""
    from lazycluster_tasks import commands
    from lazycluster_tasks.hostside import envs

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "lazycluster" / "envs" / "k1"
    (folder / "bin").mkdir(parents=True)
    (folder / envs.MARK).write_text(json.dumps({"units": [], "made": time.time()}))
    assert envs.check("k1", [], lease="lazycluster-c1")["env"] == str(folder / "bin" / "python")
    assert envs.prune([], 0.0) == {"removed": [], "in_use": [], "held": ["k1"]}
    assert envs.listing()[0]["held"] is True
    # the cleanup's line (as the stop of the cluster folder runs it) lets go of c1 only
    envs.check("k1", [], lease="lazycluster-c2")
    line = commands.release_env("lazycluster-c1")
    env = {**os.environ, "HOME": str(tmp_path / "nohome"), "XDG_CACHE_HOME": str(tmp_path)}
    assert subprocess.run(["sh", "-c", line], env=env).returncode == 0
    assert sorted(p.name for p in (folder / envs.LEASES).iterdir()) == ["lazycluster-c2"]
    envs.release("lazycluster-c2")  # the guard's way, once the controller is gone
    assert envs.prune([], 0.0) == {"removed": ["k1"], "in_use": [], "held": []}
    # a hold that nobody ended (a controller killed before its guard started) expires
    (folder / "bin").mkdir(parents=True)
    (folder / envs.MARK).write_text(json.dumps({"units": [], "made": time.time()}))
    envs.check("k1", [], lease="lazycluster-c3")
    lease = folder / envs.LEASES / "lazycluster-c3"
    old = time.time() - envs.LEASE - 1
    os.utime(lease, (old, old))
    assert envs.prune([], 0.0)["removed"] == ["k1"]
    # names that are no cluster folder's are refused (the shell line) or ignored (the program)
    for bad in ("", "../x", ".hidden", "a b", "*"):
        with pytest.raises(ValueError, match="not a cluster folder's name"):
            commands.release_env(bad)
    assert subprocess.run(["sh", "-c", commands.release_env("c-1")], env=env).returncode == 0


def test_a_distribution_found_through_the_current_folder_is_named_by_absolute_paths(
    tmp_path, monkeypatch
) -> None:
    """``python -c`` or ``-m`` in a project that holds its .egg-info puts "" first on sys.path:
    that distribution's files are found relative to the current folder. A host (sharing this
    machine's files or not) must get paths that do not depend on it, or a shared host is not
    seen as one and gets an environment made for nothing."""
    info = tmp_path / "fakepkg.egg-info"
    info.mkdir()
    (info / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n")
    (info / "SOURCES.txt").write_text("fakepkg/__init__.py\nfakepkg.egg-info/PKG-INFO\n")
    (tmp_path / "fakepkg").mkdir()
    (tmp_path / "fakepkg" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", *sys.path])
    (unit,) = environments.scan(include=["fakepkg"], code=[]).units
    sources = [source for _, source in unit.files]
    assert sorted(sources) == sorted(
        [str(tmp_path / "fakepkg" / "__init__.py"), str(tmp_path / "fakepkg.egg-info" / "PKG-INFO")]
    )


def test_a_build_takes_its_bytes_while_another_start_holds_the_lock(tmp_path) -> None:
    """A second start's bytes are read while the first one builds: a sender that waited for
    another start's build would count it a stalled transfer."""
    project = _project(tmp_path / "project")
    (project / "userpkg" / "table.bin").write_bytes(os.urandom(1 << 18))  # does not compress
    manifest = environments.scan(include=["toolz"], code=[str(project)])
    packed = _packed(tmp_path / "packs", manifest)
    data = packed.data
    home = tmp_path / "home"
    root = home / ".cache" / "lazycluster"
    root.mkdir(parents=True)
    argv = [sys.executable, "-I", "-c", hostside.source("envs"), "build", "--key", manifest.key]
    sent = _input(manifest, "build", packed) + data
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    holder = subprocess.Popen(  # another start's build, holding the lock
        [sys.executable, "-c", LOCK_HOLDER, str(root / "lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        build = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        assert build.stdin is not None and len(data) > 1 << 17  # more than a pipe holds
        sender = threading.Thread(target=lambda: (build.stdin.write(sent), build.stdin.close()))
        sender.start()
        sender.join(20)
        assert not sender.is_alive(), "the build read nothing while the lock was held"
        assert build.poll() is None  # it waits for the lock with its bytes unpacked aside
        aside = [p.name for p in (root / "units").iterdir()]
        assert len(aside) == 1 and aside[0].startswith(".incoming-")
    finally:
        holder.kill()
        holder.wait()
    assert build.wait(timeout=60) == 0, build.stderr.read()  # type: ignore[union-attr]
    out = build.stdout.read()  # type: ignore[union-attr]
    assert json.loads(out)["received"] == len(data)
    assert sorted(p.name for p in (root / "units").iterdir()) == sorted(
        u.key for u in manifest.units
    )


def test_prune_leaves_a_build_that_is_receiving(tmp_path) -> None:
    """What a live build receives stays; what a dead one left goes."""
    home = tmp_path / "home"
    units = home / ".cache" / "lazycluster" / "units"
    host = socket.gethostname()
    live = units / f".incoming-{os.getpid()}@{host}"
    dead = units / f".incoming-{_dead_pid()}@{host}"
    elsewhere = units / ".incoming-1@another-host"  # a home shared with a host building now
    for folder in (live, dead, elsewhere):
        folder.mkdir(parents=True)
    pruned = envs(home, "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert sorted(p.name for p in units.iterdir()) == sorted([live.name, elsewhere.name])


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


#: Holds an exclusive lock on argv[1] (as hostside.envs takes it) until killed.
LOCK_HOLDER = (
    "import fcntl, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
    "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
    "print('locked', flush=True)\n"
    "time.sleep(60)\n"
)
