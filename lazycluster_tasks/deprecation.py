"""Renamed keywords: the old name keeps working for one release, with a DeprecationWarning.

Plain Python (no Prefect import): every entry point — functions, Prefect tasks and flows, the
CLI — maps its old keywords with :func:`renamed`, so the words, the warning and the error are
the same everywhere. The reference vocabulary is :class:`~lazycluster_tasks.LazySSHCluster`'s:
``scheduler_host``, ``scheduler_timeout``, ``n_workers``, ``workers_per_host``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["deprecated_message", "renamed", "renamed_all"]


def deprecated_message(old: str, new: str) -> str:
    """What the warning says (also what flows log for deployments' users)."""
    return f"{old} is deprecated: use {new} (same meaning); {old} goes in the next release"


def renamed(kwargs: MutableMapping[str, Any], old: str, new: str, *, stacklevel: int = 3) -> Any:
    """Map the deprecated keyword ``old`` in ``kwargs`` to ``new``; returns ``new``'s value.

    ``old`` given: it is removed from ``kwargs``, its value stored under ``new`` and a
    ``DeprecationWarning`` naming both is issued (``stacklevel`` 3: the line that called the
    function whose keyword this is). ``old`` and ``new`` both given is a ``TypeError`` naming
    both. A value of None counts as not given (the default of every renamed parameter: so a
    Prefect flow, which receives all its parameters, is handled like a function).
    """
    value = kwargs.pop(old, None)
    if value is None:
        return kwargs.get(new)
    if kwargs.get(new) is not None:
        raise TypeError(
            f"got both {old}= and {new}=: {old} is the deprecated name of {new}; give {new} only"
        )
    warnings.warn(deprecated_message(old, new), DeprecationWarning, stacklevel=stacklevel)
    kwargs[new] = value
    return value


def renamed_all(
    kwargs: MutableMapping[str, Any], names: Mapping[str, str], *, stacklevel: int = 4
) -> MutableMapping[str, Any]:
    """:func:`renamed` for each ``old -> new`` of ``names``; returns ``kwargs``."""
    for old, new in names.items():
        renamed(kwargs, old, new, stacklevel=stacklevel)
    return kwargs
