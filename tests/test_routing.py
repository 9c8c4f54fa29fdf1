"""routing: what each routing decides from the network plan alone — where processes bind and
are contacted, where a port must be free, which routing a plan makes. No host is reached: the
runtimes are SSH aliases of an SSH config that no test connects to (TEST-NET addresses)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lazycluster_tasks.group import RuntimeGroup
from lazycluster_tasks.network import NetworkPlan
from lazycluster_tasks.processes import ProcessInfo
from lazycluster_tasks.routing import (
    LOOPBACK,
    DirectRouting,
    TunnelledRouting,
    make_routing,
)
from lazycluster_tasks.runtime import Runtime

HOSTS = ["h1", "h2", "h3"]
ADDRESSES = {"h1": "192.0.2.11", "h2": "192.0.2.12", "h3": "192.0.2.13"}


@pytest.fixture
def offline_group(tmp_path: Path) -> Iterator[RuntimeGroup]:
    """Runtimes of three hosts, never connected (were one asked, it would fail in 1 s)."""
    config = tmp_path / "ssh_config"
    config.write_text(
        "".join(f"Host {h}\n  HostName {a}\n  ConnectTimeout 1\n" for h, a in ADDRESSES.items())
    )
    group = RuntimeGroup(hosts=HOSTS, ssh_config_path=str(config))
    try:
        yield group
    finally:
        group.cleanup()


@pytest.fixture
def controller() -> Iterator[Runtime]:
    """This machine."""
    runtime = Runtime("localhost")
    try:
        yield runtime
    finally:
        runtime.cleanup()


def plan(mode: str) -> NetworkPlan:
    return NetworkPlan(
        mode=mode,
        controller_address="192.0.2.1",
        addresses=dict(ADDRESSES),
        used_ports={"h1": {40001}, "h2": {40002}, "h3": {40003}},
        local_used={40000},
    )


def worker(host: str, *ports: int) -> ProcessInfo:
    return ProcessInfo(host, f"{host}-0", "worker", 1, "w.pid", "w.log", list(ports))


def test_the_plan_picks_the_routing(offline_group, controller):
    assert type(make_routing(plan("direct"), offline_group, controller)) is DirectRouting
    assert type(make_routing(plan("tunnelled"), offline_group, controller)) is TunnelledRouting
    assert make_routing(plan("direct"), offline_group, controller).name == "direct"
    assert make_routing(plan("tunnelled"), offline_group, controller).name == "tunnelled"


def test_direct_processes_bind_and_are_reached_at_their_hosts_addresses(offline_group, controller):
    routing = make_routing(plan("direct"), offline_group, controller)
    assert not routing.loopback
    assert routing.bind_address(controller) == "192.0.2.1"  # where the hosts reach this machine
    for host, address in ADDRESSES.items():
        assert routing.bind_address(offline_group.get_runtime(host)) == address
    assert routing.contact_host("192.0.2.12") == "192.0.2.12"  # reached where it binds


def test_tunnelled_processes_bind_and_are_reached_at_loopback_everywhere(offline_group, controller):
    routing = make_routing(plan("tunnelled"), offline_group, controller)
    assert routing.loopback and LOOPBACK == "127.0.0.1"
    assert {routing.bind_address(rt) for rt in [controller, *offline_group.runtimes]} == {LOOPBACK}
    assert routing.contact_host("192.0.2.12") == LOOPBACK


def test_direct_a_port_must_be_free_on_its_own_host_only(offline_group, controller):
    direct = plan("direct")
    routing = make_routing(direct, offline_group, controller)
    h2 = offline_group.get_runtime("h2")
    assert routing.port_scope(h2) == ["h2"] and not routing.needs_local_port(h2)
    # this machine is not a host of the group: its ports are its own
    assert routing.port_scope(controller) == [] and routing.needs_local_port(controller)
    # the ports to avoid, as the engine asks the plan for them
    taken = {
        rt.host: direct.taken(routing.port_scope(rt), routing.needs_local_port(rt))
        for rt in [controller, h2]
    }
    assert taken == {"localhost": {40000}, "h2": {40002}}


def test_direct_a_local_runtime_of_the_group_needs_the_port_here_too(tmp_path, controller):
    config = tmp_path / "ssh_config"
    config.write_text("Host h1\n  HostName 192.0.2.11\n")
    local = Runtime("127.0.0.1")  # runs here, without SSH
    mixed = RuntimeGroup(runtimes=[local, Runtime("h1", ssh_config_path=str(config))])
    try:
        routing = make_routing(plan("direct"), mixed, controller)
        assert routing.port_scope(local) == ["127.0.0.1"] and routing.needs_local_port(local)
        assert not routing.needs_local_port(mixed.get_runtime("h1"))
    finally:
        mixed.cleanup()


def test_tunnelled_a_port_must_be_free_on_every_host_and_here(offline_group, controller):
    tunnelled = plan("tunnelled")
    routing = make_routing(tunnelled, offline_group, controller)
    for runtime in [controller, *offline_group.runtimes]:  # forwarded to every node
        assert routing.port_scope(runtime) == HOSTS and routing.needs_local_port(runtime)
        taken = tunnelled.taken(routing.port_scope(runtime), routing.needs_local_port(runtime))
        assert taken == {40000, 40001, 40002, 40003}


@pytest.mark.parametrize("mode", ["direct", "tunnelled"])
def test_a_stopped_process_is_forgotten_and_no_route_means_nothing_to_close(
    offline_group, controller, mode
):
    routing = make_routing(plan(mode), offline_group, controller)
    routing.routed = {("h1", 40101), ("h1", 40102), ("h2", 40201), ("", 40000)}
    routing.forget(worker("h1", 40101, 40102))  # its routes are no longer ours to close
    assert routing.routed == {("h2", 40201), ("", 40000)}
    routing.unroute([worker("h3", 40301)])  # never routed: no host is asked
    assert routing.routed == {("h2", 40201), ("", 40000)}
    routing.forward_to_hosts([40000])  # forwarded already: no host is asked again
    assert routing.routed == {("h2", 40201), ("", 40000)}


def test_tunnelled_workers_routed_already_are_not_routed_again(offline_group, controller):
    routing = make_routing(plan("tunnelled"), offline_group, controller)
    assert isinstance(routing, TunnelledRouting) and routing.links is None
    routing.routed = {("h1", 40101), ("h2", 40201)}
    routing.route_workers([worker("h1", 40101), worker("h2", 40201)])  # no host is asked
    routing.workers_up()  # no links to set up
    routing.close()
    assert routing.routed == {("h1", 40101), ("h2", 40201)}
