"""Helpers that several test modules use (as distributed keeps them in ``utils_test``): waiting
for a condition, the checkout's root, runtimes and clusters on the test hosts, a cluster's
processes left on this machine, a full disk, and small programs the tests run with ``python -c``.

Plain functions and constants: the fixtures are in :mod:`lazycluster_tasks.testing.pytest_plugin`
and the tests' ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import psutil
import pytest

from lazycluster_tasks.connection import Connection
from lazycluster_tasks.runtime import Runtime
from lazycluster_tasks.testing.hosts import TestHosts

if TYPE_CHECKING:
    from lazycluster_tasks.ssh_cluster import LazySSHCluster

#: The checkout this package runs from in the tests (editable install): what processes the tests
#: start put on PYTHONPATH to import ``tests`` and ``flows``, and their working dir.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Environment that keeps Prefect from phoning home (set for the test session and the servers
#: and workers it starts).
QUIET_ENV = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Ask ``predicate`` every ``interval`` s until it is true; after ``timeout`` s its last
    answer (whether it held)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class EndlessInput(io.RawIOBase):
    """A command's input that never ends."""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return b"x" * (size if size > 0 else 2**16)


def send_until_cut(
    connection: Connection, cut: Callable[[], None], wait: float
) -> tuple[float, BaseException | None]:
    """Stream endless input to ``cat`` on ``connection``, call ``cut`` once it flows, and wait
    at most ``wait`` s for the command to fail: (seconds from the cut until it failed, its
    exception); AssertionError when it still runs."""
    failed: list[BaseException] = []

    def send() -> None:
        try:
            connection.run("cat > /dev/null", stdin=cast(BinaryIO, EndlessInput()), timeout=None)
        except BaseException as exc:
            failed.append(exc)

    sending = threading.Thread(target=send, daemon=True)
    sending.start()
    time.sleep(1)
    assert not failed and sending.is_alive(), failed  # it streams
    cut()
    began = time.monotonic()
    sending.join(wait)
    assert not sending.is_alive(), "the send still waits on the cut path"
    return time.monotonic() - began, failed[0] if failed else None


def links_set_up(cluster: Any, client: Any, workers: int, timeout: float = 60) -> Any:
    """Once ``workers`` workers registered with ``client``'s scheduler: the cluster's
    host-to-host links (a tunnelled LazySSHCluster's), their set-up done."""
    client.wait_for_workers(workers, timeout=timeout)
    links = cluster.engine.routing.links
    assert links is not None, "no host-to-host links: not a tunnelled cluster"
    links.wait()
    return links


def ssh_runtime(hosts: TestHosts, name: str = "host1", **kwargs: Any) -> Runtime:
    """A Runtime on test host ``name``, reached through the hosts' SSH config."""
    return Runtime(name, ssh_config_path=str(hosts.ssh_config_path), **kwargs)


#: Options of the tests' clusters unless a test gives them. A nanny is one more interpreter
#: per worker (about 0.5 s of CPU each, on the 2 cores all test hosts share); as in Dask's own
#: tests, those about nannies, restarts and the defaults ask for one (``nanny=True``).
TEST_DEFAULTS: dict[str, Any] = {"threads_per_worker": 1, "nanny": False}


def fill_test_defaults(options: dict[str, Any]) -> None:
    """Fill in TEST_DEFAULTS where ``options`` are silent (a worker class given decides on
    its nanny itself)."""
    for name, value in TEST_DEFAULTS.items():
        if name != "nanny" or "worker_class" not in options:
            options.setdefault(name, value)


def cluster_on(
    hosts: TestHosts,
    names: Sequence[str],
    cls: type[LazySSHCluster] | None = None,
    **options: Any,
) -> LazySSHCluster:
    """A LazySSHCluster (or ``cls``, a subclass) on the test hosts ``names``, reached through
    the hosts' SSH config, one thread per worker and no nanny unless ``options`` say otherwise
    (see TEST_DEFAULTS)."""
    from lazycluster_tasks.ssh_cluster import LazySSHCluster  # pulls in distributed.deploy

    options.setdefault("ssh_config_path", str(hosts.ssh_config_path))
    fill_test_defaults(options)
    return (cls or LazySSHCluster)(list(names), **options)


def local_leftovers(cluster_id: str) -> list[str]:
    """Processes on this machine that still belong to the cluster (``pid command line``)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if f"lazycluster-{cluster_id}" in cmdline and proc.pid != os.getpid():
            found.append(f"{proc.pid} {cmdline[:120]}")
    return found


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "64k") -> Iterator[None]:
    """A tmpfs of ``size`` mounted on ``folder`` (needs root: the test is skipped without),
    unmounted after."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a full disk is made with a tmpfs mount: needs root")
    folder.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """Fill the disk of ``folder`` to the last byte; returns the filler."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"x" * 512)
    finally:
        os.close(fd)
    return filler


#: A controller process of its own: starts a DaskCluster (argv: ssh config, network mode, hosts),
#: prints its record as one JSON line and sleeps, to be killed (its cluster then has no
#: controller). Dask's death timeout also bounds a nanny's start (its worker must have registered
#: by then): 4 s failed starts on a loaded CI machine ("failure-to-start TimeoutError"); 8 s does
#: not.
DASK_CONTROLLER = """
import json, sys, time
from lazycluster_tasks import RuntimeGroup
from lazycluster_tasks.dask import CONTROLLER_KEY, DaskCluster, teardown
group = RuntimeGroup(hosts=sys.argv[3:], ssh_config_path=sys.argv[1])
cluster = DaskCluster(group, network_mode=sys.argv[2], death_timeout=8, idle_timeout=2)
cluster.start()
print(cluster.record().model_dump_json(), flush=True)
time.sleep(600)
"""

#: Asks the HTTP service at 127.0.0.1:argv[1] for the path argv[2] (with the Basic auth string
#: in argv[3], if any) and prints the status line of the answer and the start of its body.
HTTP_GET = (
    "import base64, socket, sys\n"
    "auth = sys.argv[3] if len(sys.argv) > 3 else ''\n"
    "head = 'GET ' + sys.argv[2] + ' HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n'\n"
    "if auth:\n"
    "    head += 'Authorization: Basic ' + base64.b64encode(auth.encode()).decode() + '\\r\\n'\n"
    "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), 5)\n"
    "s.sendall((head + '\\r\\n').encode()); s.settimeout(5); got = b''\n"
    "while True:\n"
    "    part = s.recv(4096)\n"
    "    if not part: break\n"
    "    got += part\n"
    "print(got.split(b'\\r\\n')[0].decode(), got.rsplit(b'\\r\\n\\r\\n', 1)[-1][:40])\n"
)
