"""``processes.wait_ready``: a started server is up once its file exists and its port answers;
its group's end or the limit ends the wait. On this machine the wait runs in this process."""

from __future__ import annotations

import shlex
import threading

import psutil
import pytest

from lazycluster_tasks import hostside, processes
from lazycluster_tasks.runtime import Runtime

#: A server: after ``delay`` s it listens on PORT and writes FILE (unless told not to), then waits.
SERVER = """
import socket, sys, time
delay, port, ready, write = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
time.sleep(delay)
server = socket.create_server(("127.0.0.1", port))
if write == "yes":
    open(ready, "w").close()
time.sleep(30)
"""


#: The first line of the wait's program, as any command line that runs it holds it.
READY_DOC = hostside.source("ready").splitlines()[0]


def _start(runtime: Runtime, *args: object) -> int:
    """The server in a session of its own (its pid is its group's), detached; its pid."""
    argv = shlex.join(["python3", "-c", SERVER, *map(str, args)])
    result = runtime.connection.run(f"setsid {argv} >/dev/null 2>&1 </dev/null & echo $!")
    return int(result.stdout.split()[-1])


def _end(runtime: Runtime, pid: int) -> None:
    runtime.connection.run(f"kill -KILL -{pid} 2>/dev/null; true")


def _interpreters_started_here(stop: threading.Event, seen: list[str]) -> None:
    me = psutil.Process()
    while not stop.wait(0.005):
        for child in me.children(recursive=True):
            try:
                line = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if READY_DOC in line:  # the wait's program
                seen.append(line[:80])


@pytest.mark.parametrize(
    ("delay", "write", "limit", "state"),
    [(0.3, "yes", 20, "up"), (0.0, "no", 0.6, "timeout")],
    ids=["up", "no-file"],
)
def test_the_wait_ends_with_the_server_up_or_at_its_limit(any_runtime, delay, write, limit, state):
    runtime = any_runtime
    folder = runtime.working_dir
    ready = f"{folder}/ready-{delay}"
    port = runtime.get_free_port(list(range(43100, 43200)))
    pid = _start(runtime, delay, port, ready, write)
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=_interpreters_started_here, args=(stop, seen))
    watcher.start()
    try:
        got, waited = processes.wait_ready(runtime, "python3", ready, "127.0.0.1", port, pid, limit)
    finally:
        stop.set()
        watcher.join()
        _end(runtime, pid)
    assert got == state
    if state == "up":  # not before the file (written after the listener) existed
        assert waited < limit and runtime.connection.run(f"test -e {ready}").ok
    else:
        assert waited >= limit
    if runtime.is_local:  # no interpreter started for the wait: it ran in this process
        assert not seen


def test_the_wait_ends_when_the_group_ends_without_the_server_up(any_runtime):
    runtime = any_runtime
    port = runtime.get_free_port(list(range(43100, 43200)))
    # its leader ends at once: the port was given as text, not a number
    pid = _start(runtime, 0.0, "not-a-port", f"{runtime.working_dir}/ready-dead", "yes")
    got, waited = processes.wait_ready(
        runtime, "python3", f"{runtime.working_dir}/ready-dead", "127.0.0.1", port, pid, 20
    )
    assert got == "dead"
    assert waited < 10
