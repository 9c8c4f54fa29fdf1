"""The engine's bookkeeping, on its own: the process table (owners, GPU pins) and the ports our
processes hold."""

from __future__ import annotations

import threading

import pytest

from lazycluster_tasks.ports import PortPool, Reservations
from lazycluster_tasks.process_table import ProcessTable
from lazycluster_tasks.processes import ProcessInfo
from lazycluster_tasks.record import ClusterRecord, ClusterState
from lazycluster_tasks.runtime import Runtime


def _info(name: str, host: str = "h1", role: str = "worker") -> ProcessInfo:
    return ProcessInfo(host, name, role, 100, f"/f/{name}.pid", f"/f/{name}.log", [1, 2])


def test_the_process_table_keeps_owners_and_pins_each_gpu_once() -> None:
    table, here = ProcessTable(), Runtime("localhost")
    table.add(here, _info("scheduler", role="master"))
    for name in ("h1-0", "h1-1", "h2-2"):
        table.add(here, _info(name, host=name.split("-")[0]))
    assert [i.name for i in table.workers()] == ["h1-0", "h1-1", "h2-2"]
    assert table.owner("h1-0") is here and "scheduler" in table and "nope" not in table
    assert [i.name for i in table.known(["h2-2", "gone", "h1-0"])] == ["h2-2", "h1-0"]
    assert table.pin("h1", ["h1-0", "h1-1"], [0, 1]) == {"h1-0": 0, "h1-1": 1}
    with pytest.raises(ValueError, match="h1: 1 workers to start, 0 GPUs free"):
        table.pin("h1", ["h1-3"], [0, 1])
    assert table.remove("h1-1") is not None and table.owner("h1-1") is None
    assert table.pin("h1", ["h1-3"], [0, 1]) == {"h1-3": 1}  # the one the lost worker held
    assert table.pin("h2", ["h2-2"], [0]) == {"h2-2": 0}  # another host's GPUs are its own
    assert table.remove("gone") is None


def test_the_process_table_groups_processes_by_the_runtime_that_owns_them() -> None:
    here, other = Runtime("localhost"), Runtime("localhost")
    keys = {id(here): "", id(other): "h2"}
    table = ProcessTable(lambda runtime: keys[id(runtime)])
    table.add(here, _info("scheduler", role="master"))
    table.add(other, _info("h2-0", host="h2"))
    table.add(other, _info("h2-1", host="h2"))
    assert table.key_of("scheduler") == "" and table.key_of("h2-1") == "h2"
    assert table.key_of("gone") is None
    jobs = table.by_owner([*table.known(["h2-1", "scheduler", "h2-0"]), _info("stranger")])
    assert {k: (rt, [i.name for i in infos]) for k, (rt, infos) in jobs.items()} == {
        "h2": (other, ["h2-1", "h2-0"]),
        "": (here, ["scheduler"]),
    }  # a process not in the table belongs to no runtime
    assert table.liveness(["gone"], timeout=1) == {"gone": "gone"}  # asks no host


def test_reservations_by_host_and_released_everywhere() -> None:
    held = Reservations()
    held.hold(["h1", ""], [60001, 60002])
    held.hold(["h2"], [60003])
    assert held.held(["h1"]) == {60001, 60002} and held.held(["h3"]) == set()
    assert held.held() == {60001, 60002, 60003}
    held.release([60002, 60003])
    assert held.held() == {60001} and held.held([""]) == {60001}

    def hold_many(first: int) -> None:
        for port in range(first, first + 500):
            held.hold(["h1"], [port])

    threads = [threading.Thread(target=hold_many, args=(p,)) for p in (1000, 2000, 3000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(held.held(["h1"])) == 1501


def test_the_port_pool_takes_what_processes_bind_and_gets_stopped_ones_back() -> None:
    pool = PortPool([60001, 60002, 60003, 60004])
    pool.hold(["h1", ""], [60001, 60002])
    pool.take([60001, 60002])
    assert pool.candidates == [60003, 60004] and pool.held(["h1"]) == {60001, 60002}
    pool.candidates.append(1)  # a copy: the pool is changed through its methods only
    assert pool.candidates == [60003, 60004]
    pool.give_back([60002])
    assert pool.candidates == [60003, 60004, 60002] and pool.held() == {60001}
    pool.give_back([60002])  # twice is once
    assert pool.candidates.count(60002) == 1


def test_a_cluster_state_is_typed_shows_as_its_text_and_survives_the_record() -> None:
    state = ClusterState.cleanup_failed
    assert (
        state == "cleanup failed" and f"{state}" == "cleanup failed" and str(state) == state.value
    )
    record = ClusterRecord(
        cluster_id="c1", state=ClusterState.running, network_mode="direct", hosts=[]
    )
    assert record.core()["state"] == "running"
    again = ClusterRecord.model_validate(record.core())
    assert again.state is ClusterState.running
    assert record.replace(state="stopped").state is ClusterState.stopped
    with pytest.raises(ValueError):
        ClusterRecord(cluster_id="c1", state="halfway", network_mode="direct", hosts=[])
    with pytest.raises(ValueError, match="'halfway' is not a valid ClusterState"):
        ClusterState("halfway")
