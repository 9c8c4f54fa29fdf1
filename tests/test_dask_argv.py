"""The Dask processes' command lines (dask_argv.py): our flags, the user's options in Dask's
list and keyword forms, TLS."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

import pytest

from lazycluster_tasks import dask_argv
from lazycluster_tasks.dask_argv import (
    SCHEDULER_MODULE,
    WATCH_PRELOAD,
    WORKER_MODULE,
    scheduler_argv,
    worker_argv,
)
from lazycluster_tasks.dask_options import DaskOptions
from lazycluster_tasks.security import TLSPaths


def test_servers_keep_their_temp_files_in_the_cluster_folder(tmp_path):
    probe = (
        "import tempfile, dask; "
        "print(tempfile.gettempdir(), dask.config.get('temporary-directory'))"
    )
    env = dask_argv.server_env(str(tmp_path), {"USER_SET": "1"})
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.split() == [str(tmp_path), str(tmp_path)], done.stderr
    assert env["USER_SET"] == "1"
    assert dask_argv.server_env("/f", {"TMPDIR": "/mine"})["TMPDIR"] == "/mine"  # the user wins


def test_scheduler_argv_binds_where_asked_and_keeps_the_dashboard_local():
    options = DaskOptions(scheduler_options=["--idle-timeout", "1h"])
    argv = scheduler_argv("/py", "10.0.0.1", 8786, "/w/lazycluster-x", options)
    assert argv[:3] == ["/py", "-m", SCHEDULER_MODULE]
    line = shlex.join(argv)
    assert "--host 10.0.0.1 --port 8786 --dashboard-address 127.0.0.1:0" in line
    assert "--scheduler-file /w/lazycluster-x/scheduler.json" in line
    assert argv[argv.index("--preload") + 1] == WATCH_PRELOAD
    assert argv[-2:] == ["--idle-timeout", "1h"]
    quiet = scheduler_argv("/py", "127.0.0.1", 1, "/w", DaskOptions(dashboard=False))
    assert "--no-dashboard" in quiet


def test_worker_argv_direct_and_loopback():
    options = DaskOptions(threads_per_worker=2, memory_limit="1GiB", death_timeout=7)
    direct = worker_argv(
        "/py", "tcp://10.0.0.1:8786", "h1-0", "/w", options,
        address="10.0.0.2", port=60001, nanny_port=60002, loopback=False,
        resources={"GPU": 1, "SLOT": 2},
    )  # fmt: skip
    line = shlex.join(direct)
    assert direct[:5] == ["/py", "-m", WORKER_MODULE, "tcp://10.0.0.1:8786", "--name"]
    assert "--host 10.0.0.2 --worker-port 60001 --nanny --nanny-port 60002" in line
    assert "--death-timeout 7 --local-directory /w/h1-0 --nthreads 2 --memory-limit 1GiB" in line
    assert direct[direct.index("--resources") + 1] == "GPU=1 SLOT=2"
    tunnelled = worker_argv(
        "/py", "tcp://127.0.0.1:8786", "h1-1", "/w", DaskOptions(nanny=False),
        address="127.0.0.1", port=60003, nanny_port=None, loopback=True,
    )  # fmt: skip
    line = shlex.join(tunnelled)
    contact = "tcp://127.0.0.1:60003"
    assert f"--listen-address {contact} --contact-address {contact} --no-nanny" in line
    assert "--host" not in tunnelled and "--nthreads" not in tunnelled


def test_tls_flags_name_files_only():
    tls = TLSPaths("/w/tls/ca.pem", "/w/tls/worker-cert.pem", "/w/tls/worker-key.pem")
    argv = worker_argv(
        "/py", "tls://127.0.0.1:8786", "h1-0", "/w", DaskOptions(nanny=False),
        address="127.0.0.1", port=60001, nanny_port=None, loopback=True, tls=tls,
    )  # fmt: skip
    line = shlex.join(argv)
    assert "--listen-address tls://127.0.0.1:60001" in line
    assert "--protocol tls --tls-ca-file /w/tls/ca.pem --tls-cert /w/tls/worker-cert.pem" in line
    assert "--tls-key /w/tls/worker-key.pem" in line
    scheduler = shlex.join(scheduler_argv("/py", "0.0.0.0", 1, "/w", DaskOptions(), tls))
    assert "--protocol tls" in scheduler and "-----BEGIN" not in scheduler


def test_the_users_options_in_sshclusters_forms():
    worker = {"nthreads": 2, "memory_limit": "4GiB", "lifetime": "1h", "preload": ["a", "b"]}
    keywords = DaskOptions(
        worker_options=worker,
        scheduler_options={"dashboard_address": ":8797", "jupyter": True, "show": False},
    )
    keywords.check()
    # the keys we have options for set them; the rest become flags
    assert (keywords.threads_per_worker, keywords.memory_limit) == (2, "4GiB")
    worker = worker_argv(
        "/py", "tcp://10.0.0.1:8786", "h1-0", "/w", keywords,
        address="10.0.0.2", port=1, nanny_port=2, loopback=False,
    )  # fmt: skip
    line = shlex.join(worker)
    assert "--nthreads 2 --memory-limit 4GiB" in line
    assert worker[-6:] == ["--lifetime", "1h", "--preload", "a", "--preload", "b"]
    scheduler = scheduler_argv("/py", "10.0.0.1", 8786, "/w", keywords)
    # a port alone stays on the host's loopback, as our own dashboard does; flags on and off
    assert scheduler[-4:] == ["--dashboard-address", "127.0.0.1:8797", "--jupyter", "--no-show"]
    listed = DaskOptions(worker_options=["--lifetime", "1h"], worker_class="my.pkg.GPUWorker")
    listed.check()
    argv = worker_argv(
        "/py", "tcp://x:1", "h-0", "/w", listed, address="a", port=1, nanny_port=2, loopback=False
    )
    assert argv[-4:] == ["--worker-class", "my.pkg.GPUWorker", "--lifetime", "1h"]
    # SSHCluster's own classes are our nanny switch
    assert DaskOptions(worker_class="distributed.Nanny").nanny is True
    assert DaskOptions(worker_class="distributed.Worker").worker_class is None
    assert DaskOptions(worker_class="distributed.Worker").nanny is False


@pytest.mark.parametrize(
    ("options", "error", "says"),
    [
        ({"worker_options": 5}, TypeError, "worker_options must be a dict"),
        ({"worker_options": "--nthreads 2"}, TypeError, "not str '--nthreads 2'"),
        ({"scheduler_options": {"dashboard-adress": ":1"}}, ValueError, "did you mean"),
        ({"worker_options": {"nthread": 2}}, ValueError, "no option 'nthread'"),
        ({"worker_options": {"worker_port": 1}}, ValueError, "'worker_port' is set by lazycluster"),
        ({"worker_options": [["--nthreads"]]}, TypeError, "the list form takes strings"),
        ({"worker_class": "CUDAWorker"}, ValueError, "dotted name"),
        ({"workers_per_host": {"h1": 0}}, ValueError, "workers_per_host['h1']"),
        ({"gpus": {"h1": -1}}, ValueError, "gpus['h1']"),
        ({"setup": "module load x"}, TypeError, "setup must be a list"),
        ({"setup": {"h1": ["ok", ""]}}, ValueError, "not a shell line"),
    ],
)
def test_options_of_the_wrong_form_are_refused_naming_them(options, error, says):
    with pytest.raises(error) as info:
        DaskOptions(**options).check()
    assert says in str(info.value)


def test_setup_lines_run_in_the_shell_that_becomes_the_process(tmp_path):
    from lazycluster_tasks import commands, startup

    lines = ["export SITE=ok", 'echo "it\'s $SITE"', "source ./extra", "module load cuda/12"]
    (tmp_path / "extra").write_text("export MORE=1\n")
    (tmp_path / "w.setup").write_text(commands.setup_file(lines[:3]))
    start = commands.start_detached(
        [sys.executable, "-c", "import os; print(os.environ['SITE'], os.environ['MORE'])"],
        str(tmp_path), "w.log", "w.pid", setup_file="w.setup",
    )  # fmt: skip
    done = subprocess.run(["/bin/sh", "-c", start], capture_output=True, text=True, timeout=30)
    pid = int(done.stdout.split()[-1])
    _wait_gone(pid)
    log = (tmp_path / "w.log").read_text()
    assert log.endswith("it's ok\n[lazycluster] setup step 3: source ./extra\nok 1\n"), log
    (tmp_path / "f.setup").write_text(commands.setup_file(lines))
    start = commands.start_detached(["true"], str(tmp_path), "f.log", "f.pid", setup_file="f.setup")
    subprocess.run(["/bin/sh", "-c", start], capture_output=True, timeout=30)
    assert _wait_until_logged(tmp_path / "f.log", "failed (exit")
    said = startup.setup_failure((tmp_path / "f.log").read_text())
    assert said is not None and said.startswith(
        "setup step 4 (module load cuda/12) failed (exit 127)"
    )
    assert "module: not found" in said


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.02)


def _wait_until_logged(path, text: str) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return True
        time.sleep(0.02)
    return False


def test_the_network_mode_is_one_word_list_checked_in_one_place():
    from lazycluster_tasks.network import NETWORK_MODES, network_mode

    assert NETWORK_MODES == ("auto", "direct", "tunnelled")
    assert network_mode("direct") == "direct"
    for wrong in ("Direct", "ssh", None, 3):
        with pytest.raises(ValueError, match="network_mode must be one of auto, direct, tunnelled"):
            DaskOptions(network_mode=wrong).check()  # type: ignore[arg-type]


#: The options of dask-cuda's worker command (dask_cuda/cli.py: ``dask cuda worker``,
#: ``dask-cuda-worker``) among those lazycluster sets; it has no --nanny, --nanny-port nor
#: --no-nanny, and its --worker-class is the class its nannies run (a Worker).
CUDA_CLI_FLAGS = {
    "--name", "--host", "--worker-port", "--listen-address", "--contact-address",
    "--nthreads", "--memory-limit", "--resources", "--dashboard", "--no-dashboard",
    "--death-timeout", "--local-directory", "--protocol", "--tls-ca-file", "--tls-cert",
    "--tls-key", "--rmm-pool-size",
}  # fmt: skip


@pytest.mark.parametrize(
    "worker_class", ["dask_cuda.CUDAWorker", "dask_cuda.cuda_worker.CUDAWorker"]
)
@pytest.mark.parametrize("loopback", [False, True])
def test_dask_cudas_worker_starts_as_its_own_command_does(worker_class, loopback):
    options = DaskOptions(
        worker_class=worker_class,
        threads_per_worker=2,
        memory_limit="4GiB",
        worker_options=["--rmm-pool-size", "1GB"],
    )
    options.check()
    tls = TLSPaths("/w/tls/ca.pem", "/w/tls/worker-cert.pem", "/w/tls/worker-key.pem")
    argv = worker_argv(
        "/py", "tls://10.0.0.1:8786", "h1-0", "/w", options,
        address="10.0.0.2", port=60001, nanny_port=60002, loopback=loopback,
        resources={"GPU": 1}, tls=tls,
    )  # fmt: skip
    assert argv[:5] == ["/py", "-m", dask_argv.CUDA_WORKER_MODULE, "tls://10.0.0.1:8786", "--name"]
    assert dask_argv.CUDA_WORKER_MODULE == "dask_cuda.cli"  # what dask-cuda-worker runs
    flags = {a for a in argv if a.startswith("--")}
    assert flags <= CUDA_CLI_FLAGS, flags - CUDA_CLI_FLAGS
    assert "--worker-class" not in argv and worker_class not in argv  # never nested in a nanny
    line = shlex.join(argv)
    where = "--listen-address tls://127.0.0.1:60001" if loopback else "--worker-port 60001"
    assert where in line and "60002" not in line  # its nanny picks its own port
    assert "--nthreads 2 --memory-limit 4GiB --resources GPU=1" in line
    assert argv[-2:] == ["--rmm-pool-size", "1GB"]
    with pytest.raises(ValueError, match="nanny=False does not apply"):
        worker_argv(
            "/py", "tcp://x:1", "h-0", "/w", DaskOptions(worker_class=worker_class, nanny=False),
            address="a", port=1, nanny_port=None, loopback=False,
        )  # fmt: skip
