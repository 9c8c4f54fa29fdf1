"""The shared argument checks: what they accept, and refusals that name argument and value."""

from __future__ import annotations

import pytest

from lazycluster_tasks.checks import check_count, check_seconds


@pytest.mark.parametrize("value", [0, 3])
def test_a_count_is_an_integer_at_least_the_minimum(value: int) -> None:
    assert check_count("n", value) == value


@pytest.mark.parametrize("value", [-1, True, 1.0, "2", None])
def test_anything_else_is_refused_naming_it(value: object) -> None:
    with pytest.raises(ValueError, match=rf"n_workers must be an integer >= 0, not {value!r}"):
        check_count("n_workers", value)
    with pytest.raises(ValueError, match="must be an integer >= 1, not 0"):
        check_count("threads", 0, minimum=1)


def test_seconds_are_positive_numbers_or_zero_where_allowed() -> None:
    assert check_seconds("t", 2) == 2.0 and check_seconds("t", 0.5) == 0.5
    assert check_seconds("grace", 0, zero=True) == 0.0
    for value in (0, -1, False, "3", None):
        with pytest.raises(ValueError, match=r"worker_ttl must be a number of seconds > 0"):
            check_seconds("worker_ttl", value)
    with pytest.raises(ValueError, match=r"stop_grace must be a number of seconds >= 0, not -1"):
        check_seconds("stop_grace", -1, zero=True)
