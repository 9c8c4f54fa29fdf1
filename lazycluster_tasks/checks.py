"""Argument checks shared by every entry point: each refusal names the argument and its value."""

from __future__ import annotations


def check_count(name: str, value: object, minimum: int = 0) -> int:
    """``value`` if it is an integer >= ``minimum`` (a bool is not), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, not {value!r}")
    return value


def check_seconds(name: str, value: object, zero: bool = False) -> float:
    """``value`` if it is a number of seconds > 0 (>= 0 with ``zero``), else a ValueError."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (value >= 0 if zero else value > 0):  # type: ignore[operator]
        bound = ">= 0" if zero else "> 0"
        raise ValueError(f"{name} must be a number of seconds {bound}, not {value!r}")
    return float(value)  # type: ignore[arg-type]
