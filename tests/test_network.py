"""The preflight probe measures every path a direct cluster needs, in networks as sites build."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from lazycluster_tasks import RuntimeGroup
from lazycluster_tasks.hostside.probe import BLOCKED as BLOCKED_STATES
from lazycluster_tasks.hostside.probe import NOT_MEASURED
from lazycluster_tasks.network import (
    CONTROLLER,
    MODES_FILE,
    MODES_KEPT,
    PROBE_WINDOW,
    START_SLACK,
    last_mode,
    plan_network,
    remember_mode,
)
from lazycluster_tasks.ports import bindable_here, local_used_ports, parse_proc_net_tcp
from lazycluster_tasks.testing.hosts import TestHosts

pytestmark = pytest.mark.multihost

HOSTS = ["host1", "host2", "host3"]
PORTS = [61000, 61001, 61002, 61003]
#: topology -> paths expected blocked: (controller->host, host->host, host->controller)
BLOCKED = {
    "isolated": (False, True, False),
    "ssh-only": (True, True, True),
    "no-connect-back": (False, False, True),
}


def plan(hosts: TestHosts, names: list[str] = HOSTS, window: float = PROBE_WINDOW):
    group = RuntimeGroup(hosts=names, ssh_config_path=str(hosts.ssh_config_path))
    try:
        return plan_network(group, "auto", PORTS, lambda rt: sys.executable, window=window)
    finally:
        group.cleanup()


def test_open_network_is_direct_with_every_path_measured(
    multi_hosts: TestHosts, no_leftovers: TestHosts, no_local_leaks: None
) -> None:
    result = plan(multi_hosts)
    assert result.mode == "direct", result.reasons
    n = len(HOSTS)
    assert len(result.paths) == n + n * (n - 1) + n  # here->host, host->host, host->here
    assert set(result.paths.values()) == {"open"} and result.probe_seconds > 0
    assert f"{CONTROLLER} -> host2" in result.paths and "host2 -> host3" in result.paths


#: every topology that blocks a path x every way a closed port answers (tests/test_sites.py
#: runs clusters end to end in a selection of them)
SHAPES = [
    (topology, closed)
    for topology in ("isolated", "ssh-only", "no-connect-back")
    for closed in ("drop", "reset", "icmp")
]
#: where a blocked path is known without waiting: a dropped dial is silent past SILENT_AFTER,
#: an ICMP reject is final, and this machine's listener refuses only if the path is blocked
#: (only a refusal between hosts, whose probes may not listen yet, is dialled again)
DECIDED_AT_ONCE = {shape for shape in SHAPES if shape != ("isolated", "reset")}


@pytest.mark.parametrize(("topology", "closed"), SHAPES, ids=[f"{t}-{c}" for t, c in SHAPES])
def test_blocked_paths_are_found_however_closed_ports_answer(
    multi_hosts: TestHosts,
    topology: str,
    closed: str,
    no_leftovers: TestHosts,
    no_local_leaks: None,
) -> None:
    """Every blocked path is reported blocked, every open one open (or honestly not
    measured once another path had decided the plan); where a blocked path is known at once,
    the plan comes well inside a window of 60 s."""
    at_once = (topology, closed) in DECIDED_AT_ONCE
    multi_hosts.set_network(topology, closed)
    try:
        start = time.monotonic()
        result = plan(multi_hosts, window=60 if at_once else PROBE_WINDOW)
        elapsed = time.monotonic() - start
    finally:
        multi_hosts.set_network("open")
    assert result.mode == "tunnelled"
    to_host, host_to_host, to_here = BLOCKED[topology]
    for key, state in result.paths.items():
        source, target = key.split(" -> ")
        if source == CONTROLLER:
            blocked = to_host
        elif target == CONTROLLER:
            blocked = to_here
        else:
            blocked = host_to_host
        if blocked:
            assert state != "open" and any(key in reason for reason in result.reasons), key
        else:
            assert state in ("open", NOT_MEASURED), (key, state)
    assert any(state.startswith(BLOCKED_STATES) for state in result.paths.values())
    if at_once:
        assert result.probe_seconds < 10, result.paths  # no fixed window
    else:  # a blocked path costs the probe window once, not once per path or per host
        assert elapsed < PROBE_WINDOW + START_SLACK + 5


def test_a_foreign_listener_is_not_a_path(
    multi_hosts: TestHosts, no_leftovers: TestHosts, no_local_leaks: None
) -> None:
    """A port that answers, but not with the probe's nonce, proves nothing about the probe's
    own path: here host2's probe finds every candidate port taken by another program."""
    blocker = multi_hosts.run_in(
        "host2",
        [
            sys.executable,
            "-c",
            "import socket, time\n"
            f"s = [socket.create_server(('', p)) for p in {PORTS}]\n"
            "print('ready', flush=True)\n"
            "while True:\n"
            "    for x in s: x.setblocking(False)\n"
            "    time.sleep(30)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert blocker.stdout is not None and blocker.stdout.readline().strip() == "ready"
        result = plan(multi_hosts, ["host1", "host2"])
    finally:
        blocker.kill()
        blocker.wait()
    assert result.mode == "tunnelled"
    assert "no probe port free" in result.paths[f"{CONTROLLER} -> host2"]
    assert result.paths["host1 -> host2"] != "open"


def test_ports_held_by_connections_count_as_taken() -> None:
    """A connection's local port blocks a bind as much as a listener; TIME_WAIT does not."""
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue\n"
        "   0: 0100007F:EA61 00000000:0000 0A 00000000:00000000\n"  # 60001 listening
        "   1: 0100007F:EA64 0100007F:2262 01 00000000:00000000\n"  # 60004 established
        "   2: 0100007F:EA65 0100007F:2262 06 00000000:00000000\n"  # 60005 time-wait
        "   3: 0100007F:EA66 0100007F:2262 08 00000000:00000000\n"  # 60006 close-wait
    )
    assert parse_proc_net_tcp(text) == {60001, 60004, 60006}
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            assert client.getsockname()[1] in local_used_ports()


def test_a_port_an_outgoing_connection_holds_is_not_bindable_here():
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        try:
            held = client.getsockname()[1]  # an ephemeral port, as our default ports can be
            assert not bindable_here(held)
            assert not bindable_here(server.getsockname()[1])
        finally:
            client.close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert bindable_here(free)


def test_the_mode_auto_chose_is_remembered_per_host_set(multi_hosts, tmp_path, monkeypatch):
    monkeypatch.setenv("LAZYCLUSTER_CACHE_DIR", str(tmp_path))
    config = str(multi_hosts.ssh_config_path)
    two = RuntimeGroup(hosts=["host1", "host2"], ssh_config_path=config)
    three = RuntimeGroup(hosts=HOSTS, ssh_config_path=config)
    try:
        assert last_mode(two) is None
        remember_mode(two, "tunnelled")
        assert last_mode(two) == "tunnelled" and last_mode(three) is None
        remember_mode(three, "direct")
        remember_mode(two, "direct")
        assert last_mode(two) == "direct" and last_mode(three) == "direct"
        saved = tmp_path / MODES_FILE
        saved.write_text("{not json")  # a broken file is no guess, and the next one mends it
        assert last_mode(two) is None
        remember_mode(two, "tunnelled")
        assert last_mode(two) == "tunnelled"
        assert [p.name for p in tmp_path.iterdir()] == [MODES_FILE]  # no temp file left
    finally:
        two.cleanup()
        three.cleanup()


def test_remembered_modes_are_bounded(multi_hosts, tmp_path, monkeypatch):
    monkeypatch.setenv("LAZYCLUSTER_CACHE_DIR", str(tmp_path))
    saved = tmp_path / MODES_FILE
    saved.write_text(json.dumps({f"old{i}": "direct" for i in range(MODES_KEPT)}))
    group = RuntimeGroup(hosts=["host1"], ssh_config_path=str(multi_hosts.ssh_config_path))
    try:
        remember_mode(group, "tunnelled")
    finally:
        group.cleanup()
    kept = json.loads(saved.read_text())
    assert len(kept) == MODES_KEPT and "old0" not in kept and last_mode(group) == "tunnelled"
