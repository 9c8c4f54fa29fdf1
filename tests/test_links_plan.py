"""links.link_plan: which host dials which host-to-host link. Pure: no host is needed.

One link per pair of hosts; each host dials the hosts that follow it in the ring of ``hosts``,
about half of them (so no sshd gets every handshake at once); a host that cannot be dialled
(not in ``targets``: reached through a jump host, say) dials its pairs itself, and two such
hosts have no link."""

from __future__ import annotations

from itertools import combinations

import pytest

from lazycluster_tasks.links import link_plan


def links_of(plan: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(dialling host, dialled host) of every link of ``plan``."""
    return [(a, b) for a, fars in plan.items() for b in fars]


def ring(n: int) -> list[str]:
    return [f"h{i}" for i in range(n)]


def test_four_hosts_each_dial_the_next_and_the_opposite_one_is_dialled_once():
    hosts = ["a", "b", "c", "d"]
    # a-c and b-d are opposite in the ring: the first of the two in ``hosts`` dials
    assert link_plan(hosts, set(hosts)) == {
        "a": ["b", "c"],
        "b": ["c", "d"],
        "c": ["d"],
        "d": ["a"],
    }


def test_an_odd_ring_splits_into_equal_halves_wrapping_around():
    hosts = ["a", "b", "c", "d", "e"]
    assert link_plan(hosts, set(hosts)) == {
        "a": ["b", "c"],
        "b": ["c", "d"],
        "c": ["d", "e"],
        "d": ["e", "a"],
        "e": ["a", "b"],
    }


def test_two_hosts_have_one_link_dialled_by_the_first():
    assert link_plan(["a", "b"], {"a", "b"}) == {"a": ["b"], "b": []}
    assert link_plan(["b", "a"], {"a", "b"}) == {"b": ["a"], "a": []}


def test_one_host_or_none_have_no_link():
    assert link_plan(["a"], {"a"}) == {"a": []}
    assert link_plan([], set()) == {}


def test_the_ring_is_the_order_of_hosts_not_of_their_names():
    assert link_plan(["c", "a", "b"], {"a", "b", "c"}) == {"c": ["a"], "a": ["b"], "b": ["c"]}


def test_one_link_per_pair_of_hosts_each_host_dialling_half_of_the_others():
    for n in (2, 3, 4, 7, 16):
        hosts = [f"h{i}" for i in range(n)]
        plan = link_plan(hosts, set(hosts))
        links = [(a, b) for a, fars in plan.items() for b in fars]
        every = [(a, b) for i, a in enumerate(hosts) for b in hosts[i + 1 :]]
        pairs = sorted(tuple(sorted(x)) for x in links)
        assert pairs == sorted(tuple(sorted(x)) for x in every), n  # each pair once
        assert {len(f) for f in plan.values()} <= {(n - 1) // 2, n // 2}, (n, plan)
        # each dials the hosts that follow it in the ring, nearest first
        assert all(f == [hosts[(i + k) % n] for k in range(1, len(f) + 1)]
                   for i, f in enumerate(plan.values()))  # fmt: skip
    # a host that cannot be dialled dials all its pairs itself; two such hosts have no link
    plan = link_plan(["a", "b", "c", "d"], {"a", "b"})
    assert sorted((x, y) for x, f in plan.items() for y in f) == [
        ("a", "b"), ("c", "a"), ("c", "b"), ("d", "a"), ("d", "b"),
    ]  # fmt: skip


@pytest.mark.parametrize("n", range(2, 17))
def test_the_halves_are_equal_in_an_odd_ring_and_the_first_half_dials_the_opposite_host(n):
    hosts = ring(n)
    counts = [len(fars) for fars in link_plan(hosts, set(hosts)).values()]
    if n % 2:
        assert counts == [(n - 1) // 2] * n
    else:  # the host opposite in the ring: dialled by the one that comes first in ``hosts``
        assert counts == [n // 2] * (n // 2) + [n // 2 - 1] * (n // 2)


def test_a_host_that_cannot_be_dialled_dials_all_its_pairs_itself():
    hosts = ["a", "b", "c", "d"]
    full = link_plan(hosts, set(hosts))
    plan = link_plan(hosts, {"a", "b", "d"})  # c cannot be dialled
    assert sorted(plan["c"]) == ["a", "b", "d"]
    assert all("c" not in fars for fars in plan.values())
    # the pairs without c are dialled as in the full ring
    assert [link for link in links_of(plan) if "c" not in link] == [
        link for link in links_of(full) if "c" not in link
    ]


def test_no_link_where_no_host_can_be_dialled():
    assert link_plan(["a", "b", "c"], set()) == {"a": [], "b": [], "c": []}


@pytest.mark.parametrize("n", range(1, 8))
def test_every_choice_of_hosts_that_can_be_dialled(n):
    hosts = ring(n)
    full = set(links_of(link_plan(hosts, set(hosts))))
    for size in range(n + 1):
        for chosen in combinations(hosts, size):
            targets = set(chosen)
            plan = link_plan(hosts, targets)
            links = links_of(plan)
            assert list(plan) == hosts
            assert all(a != b and b in targets for a, b in links)  # only targets are dialled
            assert len(set(map(frozenset, links))) == len(links)  # a pair has one link at most
            expected = {frozenset(p) for p in combinations(hosts, 2) if set(p) & targets}
            assert set(map(frozenset, links)) == expected  # and has one if it can be dialled
            # a pair of two targets is dialled as in the full ring; of one, by the other host
            assert all((a, b) in full for a, b in links if a in targets)
