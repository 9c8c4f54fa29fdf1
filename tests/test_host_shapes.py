"""Hosts that are not copies of this machine: other login shells, an unprivileged login user
with a home of its own, a filesystem of its own with only the system's Python."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client

import lazycluster_tasks
from lazycluster_tasks import (
    GroupError,
    LazySSHCluster,
    RemoteEnvironmentError,
    Runtime,
    environments,
    ssh,
    teardown,
)
from lazycluster_tasks.ssh_master import OpenSSHMaster
from lazycluster_tasks.testing.helpers import cluster_on, links_set_up, wait_until
from lazycluster_tasks.testing.hosts import TestHosts
from lazycluster_tasks.tunnels import MasterForward

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

SHELLS = {
    "host1": "/bin/dash",
    "host2": "/bin/bash",
    "host3": "/usr/bin/zsh",
    "host4": "/usr/bin/tcsh",
    "host5": "/usr/bin/fish",
}
#: A line every shell of SHELLS would read differently, as sh reads it.
TRICKY = (
    'x="it\'s"; printf \'%s|\' "$x" "a\\\\b" "`echo bt`" "$(echo cs)" \'!x\' \'ü€\' \'%d\'\n'
    "printf '\\nline2 %s\\n' \"$$\" >/dev/null; echo done; exit 3"
)


@pytest.fixture(scope="module")
def shells() -> TestHosts:
    missing = [s for s in SHELLS.values() if not os.path.exists(s)]
    if missing:
        pytest.skip(f"login shells not installed: {missing} (apt-get install tcsh zsh fish)")
    with TestHosts(len(SHELLS), shells=SHELLS) as hosts:
        yield hosts


def test_every_login_shell_runs_our_lines_and_reports_true_facts(shells: TestHosts) -> None:
    for host, shell in SHELLS.items():
        runtime = Runtime(host, ssh_config_path=str(shells.ssh_config_path))
        try:
            assert runtime.run("echo $SHELL").strip() == shell  # sshd ran the line through it
            result = runtime.connection.run(TRICKY)
            assert (result.exit_code, result.stdout) == (3, "it's|a\\b|bt|cs|!x|ü€|%d|done\n")
            info = runtime.info
            assert info["cpu_cores"] == os.cpu_count() and info["memory"] > 2**20, (host, info)
        finally:
            runtime.cleanup()
    assert not shells.leftovers()


def test_a_cluster_runs_on_hosts_of_every_login_shell(shells: TestHosts) -> None:
    cluster = cluster_on(shells, list(SHELLS), nanny=False)
    try:
        with Client(cluster) as client:
            client.wait_for_workers(len(SHELLS), timeout=60)
            ran = client.run(socket.gethostname)
            assert sorted(ran.values()) == sorted(SHELLS)
    finally:
        cluster.close()
    assert not shells.leftovers()


def _read_through(runtime: Runtime, hosts: TestHosts) -> str:
    """What a program on the runtime's host reads from a -R forward of ours, and whether the
    host runs the master's waiting session meanwhile."""
    assert wait_until(
        lambda: any(p.endswith(" cat") for p in hosts.leftover_processes().get(runtime.host, [])),
        10,
    ), (runtime.host, hosts.leftover_processes())
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = runtime.expose_port_to_runtime(listener.getsockname()[1])
        assert isinstance(runtime.tunnels[0], MasterForward)
        read = f"import socket; print(socket.create_connection(('127.0.0.1', {port})).recv(9))"
        answer: list[str] = []
        line = f"python3 -c {shlex.quote(read)}"  # the host's own Python
        reader = threading.Thread(target=lambda: answer.append(runtime.run(line)))
        reader.start()
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"from here")
        reader.join(30)
    return "".join(answer)


def test_an_openssh_master_comes_up_through_every_login_shell_and_leaves_nothing(
    shells: TestHosts,
) -> None:
    """The master's session command runs through the login shell (tcsh, fish, ...): it says
    it runs (the start waits for that), waits on its terminal while the master runs and ends
    with it; a forward on it reaches the host."""
    for host in SHELLS:
        runtime = Runtime(host, ssh_config_path=str(shells.ssh_config_path))
        try:
            assert runtime.use_openssh(), host
            assert isinstance(runtime._master, OpenSSHMaster) and runtime._master._tty, host
            assert _read_through(runtime, shells) == "b'from here'\n", host
        finally:
            runtime.cleanup()
    assert wait_until(lambda: not shells.leftovers(), timeout=5), shells.leftovers()


# -- hosts that share nothing with this machine --------------------------------------------------

PRIVATE = ["host1", "host2"]


@pytest.fixture(scope="module")
def private_hosts() -> Iterator[TestHosts]:
    """Two hosts with a filesystem of their own (empty /tmp, /root, /home, /work: this
    machine's checkout, venv and pyenv are not there), an unprivileged login user with a home
    of its own, and only the system's Python (no dask)."""
    with TestHosts(len(PRIVATE), user=True, private=True) as hosts:
        yield hosts
        assert not hosts.leftovers()


def _user_code(project: Path, answer: int, padding: int = 0) -> Path:
    """A package of the user's, importable here only (``userpkg.compute.answer()``); its file."""
    (project / "userpkg").mkdir(parents=True)
    (project / "userpkg" / "__init__.py").write_text("")
    code = project / "userpkg" / "compute.py"
    code.write_text(f"def answer():\n    return {answer}\n" + "#" * padding)
    return code


def _answers(cluster: LazySSHCluster) -> set[tuple[str, str, int]]:
    """Where each worker runs, with which interpreter, and what the user's code answers."""

    def probe() -> tuple[str, str, int]:
        import userpkg.compute  # only this machine has it: it came with the job

        return socket.gethostname(), sys.executable, userpkg.compute.answer()

    with Client(cluster) as client:
        client.wait_for_workers(len(PRIVATE), timeout=60)
        return set(client.run(probe).values())


def test_a_cluster_starts_with_defaults_on_hosts_that_share_nothing(
    private_hosts: TestHosts, tmp_path, monkeypatch, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="lazycluster_tasks.cluster_environments")
    code = _user_code(tmp_path / "project", 42)
    monkeypatch.syspath_prepend(str(tmp_path / "project"))  # where the user's flow runs from
    # what the hosts have: the system's Python, no dask, nothing of this machine's checkout
    # or interpreters wherever they live (a CI clone is not under /work)
    here = shlex.join([str(Path(lazycluster_tasks.__file__).resolve()), sys.executable])
    check = f"for p in {here}; do [ ! -e \"$p\" ] || exit 1; done; ! python3 -c 'import dask'"
    for host in PRIVATE:
        assert private_hosts.run_in(host, ["sh", "-c", check]).wait() == 0

    def leases() -> dict[str, list[str]]:  # host -> the clusters holding its environments
        return {
            h: sorted(
                p.name for p in private_hosts.home_dir(h).glob(".cache/lazycluster/envs/*/leases/*")
            )
            for h in PRIVATE
        }

    first = cluster_on(private_hosts, PRIVATE)
    try:
        found = _answers(first)
        holder = f"lazycluster-{first.engine.cluster_id}"
        assert leases() == {h: [holder] for h in PRIVATE}  # held from its check on
    finally:
        first.close()
    assert leases() == {h: [] for h in PRIVATE}  # its cleanup let go
    home = f"/home/{private_hosts.user}/.cache/lazycluster/envs/"
    assert {(h, a) for h, _, a in found} == {(h, 42) for h in PRIVATE}
    assert all(python.startswith(home) for _, python, _ in found)
    made = [r.getMessage() for r in caplog.records if "environment" in r.getMessage()]
    assert len([m for m in made if " MiB sent in " in m]) == len(PRIVATE), made
    caplog.clear()
    # the next start finds the environment: a check, nothing sent
    second = cluster_on(private_hosts, PRIVATE)
    try:
        assert {a for _, _, a in _answers(second)} == {42}
    finally:
        second.close()
    ready = [r.getMessage() for r in caplog.records if "environment" in r.getMessage()]
    assert len(ready) == len(PRIVATE) and all(" ready (" in m for m in ready), ready
    assert all(float(m.rsplit("(", 1)[1].split()[0]) <= 1.0 for m in ready), ready
    caplog.clear()
    # a changed file of the user's is picked up at the next start; only it is sent
    time.sleep(0.01)
    code.write_text("def answer():\n    return 43\n")
    third = cluster_on(
        private_hosts, PRIVATE, workers_per_host=2, n_workers=len(PRIVATE), nanny=True
    )
    try:
        assert {a for _, _, a in _answers(third)} == {43}
        sent = [r.getMessage() for r in caplog.records if " MiB sent in " in r.getMessage()]
        assert len(sent) == len(PRIVATE) and all(" 0.0 MiB sent" in m for m in sent), sent
        # ... and by the running workers at sync_code(), without a restart
        time.sleep(0.01)
        code.write_text("def answer():\n    return 44\n")
        dropped = third.sync_code()
        assert len(dropped) == len(PRIVATE) and all(
            "userpkg.compute" in names for names in dropped.values()
        ), dropped
        assert {a for _, _, a in _answers(third)} == {44}
        with Client(third) as client:  # a worker its nanny starts again reads it too
            client.restart_workers(sorted(client.scheduler_info(n_workers=-1)["workers"])[:1])
            answers = client.run(lambda: __import__("userpkg.compute").compute.answer())
            assert len(answers) == len(PRIVATE) and set(answers.values()) == {44}, answers
        third.scale(2 * len(PRIVATE))  # new workers start with it too
        third.wait_started()
        with Client(third) as client:
            answers = client.run(lambda: __import__("userpkg.compute").compute.answer())
            assert len(answers) == 2 * len(PRIVATE) and set(answers.values()) == {44}
    finally:
        third.close()


def test_a_flow_runs_its_tasks_on_hosts_that_share_nothing(
    private_hosts: TestHosts, prefect_api: str
) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from tests.prefect_jobs import tasks_on_the_hosts

    state = tasks_on_the_hosts(PRIVATE, str(private_hosts.ssh_config_path), return_state=True)
    ran = state.result()
    assert {host for host, _ in ran} == set(PRIVATE)
    home = f"/home/{private_hosts.user}/.cache/lazycluster/envs/"
    assert all(python.startswith(home) for _, python in ran)
    with get_client(sync_client=True) as client:  # this run's (the test server is the run's)
        runs = ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
        new = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=runs))
    # the run shows each host's environment: a progress that reached every host, a table
    progress = [a for a in new if a.type == "progress" and "environment" in a.description]
    assert [(a.data, a.description.split(" (")[0]) for a in progress] == [
        (100.0, "environment ready on 2/2 hosts")
    ]
    (table,) = [a for a in new if a.type == "table" and a.key.startswith("environment-")]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert sorted(r["host"] for r in rows) == PRIVATE
    assert all(r["state"] in ("made", "found") and r["python"].startswith(home) for r in rows)


def _env_home(hosts: TestHosts, host: str, python: str) -> str:
    """The ``home`` (the base interpreter's folder) of the host environment of ``python``."""
    home = f"/home/{hosts.user}/"
    assert python.startswith(home + ".cache/lazycluster/envs/"), python
    config = hosts.home_dir(host) / python[len(home) :].rsplit("/bin/", 1)[0] / "pyvenv.cfg"
    lines = dict(line.split(" = ", 1) for line in config.read_text().splitlines() if " = " in line)
    return lines["home"]


def test_an_interpreter_given_per_host_is_the_base_its_environment_is_made_from(
    private_hosts: TestHosts, tmp_path, monkeypatch
) -> None:
    _user_code(tmp_path / "based", 9)
    monkeypatch.syspath_prepend(str(tmp_path / "based"))
    # the line: the system's Python given for every host, environment sync on
    cluster = cluster_on(private_hosts, PRIVATE, python="/usr/bin/python3")
    try:
        found = _answers(cluster)
    finally:
        cluster.close()
    assert {(h, a) for h, _, a in found} == {(h, 9) for h in PRIVATE}
    assert {_env_home(private_hosts, h, p) for h, p, _ in found} == {"/usr/bin"}
    # host1: a Python of its own (not on the PATH); host2: python3.X on its PATH
    own = private_hosts.home_dir("host1") / "own-python" / "bin"
    own.mkdir(parents=True)
    (own / "python3").symlink_to("/usr/bin/python3.11")
    given = f"/home/{private_hosts.user}/own-python/bin/python3"
    cluster = cluster_on(private_hosts, PRIVATE, python={"host1": given})
    try:
        found = _answers(cluster)
    finally:
        cluster.close()
    homes = {h: _env_home(private_hosts, h, p) for h, p, _ in found}
    assert homes == {"host1": given.rsplit("/", 1)[0], "host2": "/usr/bin"}
    assert {a for _, _, a in found} == {9}
    # an interpreter given that does not run there: named, before anything starts
    started = time.monotonic()
    with pytest.raises(GroupError) as info:
        cluster_on(private_hosts, PRIVATE, python={"host1": "/nowhere/python3"})
    assert time.monotonic() - started < 30
    assert list(info.value.errors) == ["host1"]
    assert str(info.value.errors["host1"]).startswith(
        "host1: the interpreter given (python=) '/nowhere/python3' does not run there"
    )
    assert not private_hosts.leftovers()
    # host2's check held its environment for the start; the failed start's cleanup let go
    # although it never made a folder there
    home2 = private_hosts.home_dir("host2")
    assert not list(home2.glob(".cache/lazycluster/envs/*/leases/*"))


def test_opting_out_of_the_environment_uses_the_hosts_python_as_it_is(
    private_hosts: TestHosts,
) -> None:
    def caches() -> dict[str, list[str]]:
        found = {}
        for host in PRIVATE:
            envs = private_hosts.home_dir(host) / ".cache" / "lazycluster" / "envs"
            found[host] = sorted(os.listdir(envs)) if envs.is_dir() else []
        return found

    before = caches()
    unrunnable = f"/home/{private_hosts.user}/unrunnable-python3"  # there, no execute bit
    for host in PRIVATE:
        (private_hosts.home_dir(host) / "unrunnable-python3").write_text("")
    for python, error in [
        (None, f"Python interpreter {sys.executable!r} not found; give python=PATH"),
        (unrunnable, f"{unrunnable!r} not executable by the login user; give python=PATH"),
        (
            "/usr/bin/python3",
            "dask.distributed is not importable by its Python (3.11",
        ),
    ]:
        started = time.monotonic()
        with pytest.raises(GroupError) as info:
            cluster_on(private_hosts, PRIVATE, python=python, environment=None)
        assert time.monotonic() - started < 30
        assert sorted(info.value.errors) == PRIVATE
        for host, exc in info.value.errors.items():
            assert isinstance(exc, RemoteEnvironmentError), exc
            assert str(exc).startswith(f"{host}: ") and error in str(exc), exc
            if python == "/usr/bin/python3":
                assert "(nothing is installed for you)" in str(exc), exc
        assert wait_until(lambda: not private_hosts.leftovers(), 10), private_hosts.leftovers()
    assert caches() == before  # nothing made, nothing sent


def test_teardown_from_the_record_on_hosts_that_share_nothing(private_hosts: TestHosts) -> None:
    script = (
        "import sys, time\n"
        "from lazycluster_tasks import LazySSHCluster\n"
        "c = LazySSHCluster(sys.argv[2:], ssh_config_path=sys.argv[1], threads_per_worker=1)\n"
        "print(c.record().model_dump_json(), flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(private_hosts.ssh_config_path), *PRIVATE],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        record = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
        assert all(private_hosts.processes(h) for h in PRIVATE)
    finally:
        proc.kill()
        proc.wait()
    report = teardown(record)
    assert set(report.values()) == {f"{k}: stopped" for k in record["folders"]}
    assert not private_hosts.leftovers()


def test_a_host_without_python3_is_named_in_bounded_time() -> None:
    with TestHosts(1, user=True, private=True, hidden=("python3", "python3.11")) as bare:
        started = time.monotonic()
        with pytest.raises(GroupError) as info:  # each host that failed, and why
            LazySSHCluster(["host1"], ssh_config_path=str(bare.ssh_config_path))
        assert time.monotonic() - started < 60
        error = info.value.errors["host1"]
        assert isinstance(error, RemoteEnvironmentError)
        assert str(error).startswith("host1: no Python 3 to run the cluster with")
        assert not bare.leftovers()


def test_two_clusters_starting_at_once_make_one_environment(
    private_hosts: TestHosts, tmp_path, monkeypatch
) -> None:
    _user_code(tmp_path / "together", 7)
    monkeypatch.syspath_prepend(str(tmp_path / "together"))  # a code unit no host has yet
    found: list[set] = []
    errors: list[BaseException] = []

    def start(first_port: int) -> None:
        try:
            cluster = cluster_on(private_hosts, PRIVATE, ports=range(first_port, first_port + 50))
            try:
                found.append(_answers(cluster))
            finally:
                cluster.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(p,)) for p in (53000, 54000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    assert [{a for _, _, a in f} for f in found] == [{7}, {7}]
    for host in PRIVATE:
        root = private_hosts.home_dir(host) / ".cache" / "lazycluster"
        code = [p.name for p in (root / "units").iterdir() if p.name.startswith("code-together")]
        assert len(code) == 1  # made once, by the first build; the other found it
        assert not [p for p in (root / "units").iterdir() if p.name.startswith(".")]


def test_a_full_disk_during_a_sync_names_host_and_path_and_leaves_nothing_half_made(
    private_hosts: TestHosts, tmp_path, monkeypatch
) -> None:
    _user_code(tmp_path / "crowded", 5, padding=8192)
    monkeypatch.syspath_prepend(str(tmp_path / "crowded"))  # a code unit no host has yet
    disk = private_hosts.home_dir("host1").parent  # the host's own /home
    cache = private_hosts.home_dir("host1") / ".cache" / "lazycluster"
    units = cache / "units"
    before = set(os.listdir(units)) if units.is_dir() else set()
    small = f"remount,size={_used(disk) + (4 << 20)}"
    subprocess.run(["mount", "-o", small, str(disk)], check=True)
    filler = disk / "filler"
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)
        with pytest.raises(GroupError) as info:
            cluster_on(private_hosts, PRIVATE)
        error = info.value.errors["host1"]
        assert isinstance(error, RemoteEnvironmentError), error
        assert str(error).startswith("host1: ") and "/.cache/lazycluster/" in str(error), error
        assert "No space left on device" in str(error), error
        assert (set(os.listdir(units)) if units.is_dir() else set()) == before  # none half made
    finally:
        filler.unlink(missing_ok=True)
        subprocess.run(["mount", "-o", "remount,size=4g", str(disk)], check=True)
    cluster = cluster_on(private_hosts, PRIVATE)  # room again: the next start makes it
    try:
        with Client(cluster) as client:
            client.wait_for_workers(len(PRIVATE), timeout=60)
            answers = client.run(lambda: __import__("userpkg.compute").compute.answer())
            assert set(answers.values()) == {5}
    finally:
        cluster.close()
    assert not private_hosts.leftovers()


def _used(folder: Path) -> int:
    stat = os.statvfs(folder)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def _tree_bytes(folder: Path) -> int:
    return sum(p.lstat().st_size for p in folder.rglob("*"))


LOCK_HOLDER = (
    "import fcntl, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.mark.parametrize("when", ["while sending", "after sending"])
def test_a_transfer_cut_by_the_network_is_finished_by_the_next_start(monkeypatch, when) -> None:
    """A cut while the packs travel, or after they all arrived while the host's build waits
    (here: for another start's lock), fails the start within the stall (6 s here)."""
    monkeypatch.setattr(environments, "STALL", 6.0)  # a cut is noticed within this, both ends
    monkeypatch.setattr(ssh, "UNACKNOWLEDGED_LIMIT", 6)  # also where the send itself waits
    with TestHosts(1, user=True, private=True) as fresh:
        home = fresh.home_dir("host1")
        root = home / ".cache" / "lazycluster"
        units = root / "units"
        config = str(fresh.ssh_config_path)
        errors: list[BaseException] = []
        holder = None
        if when == "after sending":  # another start's build holds the host's lock
            owner = home.stat()
            for folder in (home / ".cache", root):
                folder.mkdir(mode=0o700, exist_ok=True)
                os.chown(folder, owner.st_uid, owner.st_gid)
            (root / "lock").touch(0o600)
            os.chown(root / "lock", owner.st_uid, owner.st_gid)
            holder = subprocess.Popen(
                [sys.executable, "-c", LOCK_HOLDER, str(root / "lock")],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert holder.stdout is not None and holder.stdout.readline() == "locked\n"

        def start() -> None:
            try:
                LazySSHCluster(["host1"], ssh_config_path=config).close()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=start)
        thread.start()

        def receiving() -> bool:
            return units.is_dir() and any(p.name.startswith(".incoming") for p in units.iterdir())

        assert wait_until(receiving, timeout=60, interval=0.02)
        if holder is not None:  # every byte unpacked: the build waits for the lock
            sizes: list[int] = []
            assert wait_until(
                lambda: sizes.append(_tree_bytes(units)) or sizes[-1:] * 10 == sizes[-10:], 60
            )  # unchanged for 10 looks, 0.5 s
        fresh.cut_host("host1")
        began = time.monotonic()
        thread.join(120)
        if thread.is_alive():  # where the start waits, for the report (seen once under load)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        assert not thread.is_alive() and errors, "a cut transfer must fail the start"
        took = time.monotonic() - began
        print(f"the cut start failed {took:.1f} s after the cut: {errors[0]}")
        assert took < 45, took  # the stall, then the cleanup: each reach of the cut host bounded
        if holder is not None:
            holder.kill()
            holder.wait()
        fresh.restore_host("host1")
        cluster = LazySSHCluster(["host1"], ssh_config_path=config, threads_per_worker=1)
        try:
            with Client(cluster) as client:
                assert client.submit(lambda: 6 * 7).result(timeout=30) == 42
        finally:
            cluster.close()
        assert not [p for p in units.iterdir() if p.name.startswith(".")]
        assert wait_until(lambda: not fresh.leftovers(), 10), fresh.leftovers()


def test_links_and_healing_work_as_the_unprivileged_user_of_hosts_that_share_nothing(
    private_hosts: TestHosts,
) -> None:
    """Only SSH open: the links log in as the hosts' own user with keys let into its own
    ~/.ssh/authorized_keys, and carry worker traffic; a killed worker is replaced."""
    private_hosts.set_network("ssh-only", "drop")
    cluster = cluster_on(private_hosts, PRIVATE, network_mode="tunnelled", environment={"code": []})
    marker = f"lazycluster-link-{cluster.engine.cluster_id}"
    try:
        with Client(cluster) as client:
            links = links_set_up(cluster, client, len(PRIVATE))
            assert len(links.up) == 2, links.down
            dialled = {far for _, far in {links.link_of(p) for p in links.up}}
            assert all(marker in private_hosts.authorized_keys(h) for h in dialled)
            workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
            block = client.submit(lambda: b"x" * (8 << 20), workers=[workers[0]], pure=False)
            size = client.submit(len, block, workers=[workers[1]], allow_other_workers=False)
            assert size.result(timeout=60) == 8 << 20
            victim = cluster.engine.workers["host2-1"]["pid"]
            assert private_hosts.run_in("host2", ["kill", "-KILL", "--", f"-{victim}"]).wait() == 0
            assert wait_until(
                lambda: "host2-1" not in cluster.engine.workers and len(cluster.workers) == 2,
                timeout=60,
            )
            client.wait_for_workers(len(PRIVATE), timeout=60)
    finally:
        cluster.close()
        private_hosts.set_network("open")
    assert not any(marker in private_hosts.authorized_keys(h) for h in PRIVATE)


def _envs_cli(hosts: TestHosts, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LAZYCLUSTER_SSH_CONFIG": str(hosts.ssh_config_path)}
    argv = [sys.executable, "-m", "lazycluster_tasks.cli", "envs", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


def test_prune_goes_by_last_use_and_never_removes_an_environment_in_use(
    private_hosts: TestHosts,
) -> None:
    """Last in the module: the CLI lists and prunes what the tests before made."""
    long_ago = time.time() - 10 * 86400

    def env_of(cluster: LazySSHCluster) -> dict[str, Path]:
        """host -> its environment's folder, as seen from here."""
        home = f"/home/{private_hosts.user}/"
        return {
            h: private_hosts.home_dir(h) / e.python[len(home) :].rsplit("/bin/", 1)[0]
            for h, e in cluster.engine.environments.items()
        }

    def backdate(folders: dict[str, Path]) -> None:  # made and last used 10 days ago
        for folder in folders.values():
            mark = folder / "lazycluster-env.json"
            made = json.loads(mark.read_text())
            mark.write_text(json.dumps({**made, "made": long_ago}))
            os.utime(mark, (long_ago, long_ago))

    def listed() -> dict[str, dict[str, dict]]:
        found = _envs_cli(private_hosts, *PRIVATE, "--json")
        assert found.returncode == 0, found.stderr
        hosts = json.loads(found.stdout)["hosts"]
        assert all(e["bytes"] > 2**20 for h in PRIVATE for e in hosts[h]["envs"]), hosts
        return {h: {e["key"]: e for e in hosts[h]["envs"]} for h in PRIVATE}

    running = cluster_on(private_hosts, PRIVATE, n_workers=len(PRIVATE))
    try:
        running.wait_started()
        folders = env_of(running)
        backdate(folders)
        envs = listed()
        table = _envs_cli(private_hosts, "host1")  # the table names them too
        assert table.returncode == 0 and folders["host1"].name in table.stdout, table.stdout
        for host, folder in folders.items():
            assert envs[host][folder.name]["in_use"] is True
            assert envs[host][folder.name]["used"] == pytest.approx(long_ago, abs=1)
        # unused for 10 days by the files, but a running cluster's: kept even at --older 0
        pruned = _envs_cli(private_hosts, *PRIVATE, "--prune", "--older", "0")
        assert pruned.returncode == 0, pruned.stderr
        assert "host1: removed" in pruned.stdout and "(kept 1 in use)" in pruned.stdout
        assert all(f.is_dir() for f in folders.values())
        with Client(running) as client:  # and it still runs tasks
            assert client.submit(lambda: 6 * 7).result(timeout=30) == 42
    finally:
        running.close()
    assert not any(e["in_use"] for found in listed().values() for e in found.values())
    backdate(folders)
    # made 10 days ago, used by a start now: the default --prune (7 days) keeps it
    again = cluster_on(private_hosts, PRIVATE)
    again.close()
    envs = listed()
    for host, folder in folders.items():
        assert envs[host][folder.name]["used"] > time.time() - 60
        assert envs[host][folder.name]["made"] == pytest.approx(long_ago, abs=1)
    pruned = _envs_cli(private_hosts, *PRIVATE, "--prune")
    assert pruned.returncode == 0 and all(f.is_dir() for f in folders.values()), pruned.stdout
    # not used for 10 days: removed
    backdate(folders)
    pruned = _envs_cli(private_hosts, *PRIVATE, "--prune")
    assert pruned.returncode == 0, pruned.stderr
    assert not any(f.exists() for f in folders.values()), pruned.stdout
    # at --older 0 the environments the tests before made go too, with every unit
    pruned = _envs_cli(private_hosts, *PRIVATE, "--prune", "--older", "0")
    assert pruned.returncode == 0, pruned.stderr
    for host in PRIVATE:
        cache = private_hosts.home_dir(host) / ".cache" / "lazycluster"
        assert not list((cache / "envs").iterdir()) and not list((cache / "units").iterdir())
    assert listed() == {h: {} for h in PRIVATE}
    assert not private_hosts.leftovers()
