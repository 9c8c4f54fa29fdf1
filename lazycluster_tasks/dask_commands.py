"""What Dask's own commands, ``dask worker`` and ``dask scheduler``, accept (read from this
machine's Dask), which of their options lazycluster sets itself, and the user's options in
SSHCluster's forms checked against them."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

#: Options lazycluster sets itself on ``dask worker`` -> what the user sets instead.
WORKER_OWNED = {
    "scheduler": "the cluster's scheduler",
    "host": "network_mode",
    "interface": "network_mode",
    "listen_address": "network_mode",
    "contact_address": "network_mode",
    "worker_port": "ports",
    "nanny_port": "ports",
    "name": "nothing: workers are named <host>-<n>",
    "local_directory": "nothing: the cluster folder",
    "protocol": "security",
    "tls_ca_file": "security",
    "tls_cert": "security",
    "tls_key": "security",
    "scheduler_file": "nothing: the scheduler is given",
    "pid_file": "nothing: the cluster folder holds it",
    "n_workers": "workers_per_host",
    "preload_argv": "the list form",
    "version": "nothing",
}
#: Options lazycluster sets itself on ``dask scheduler`` -> what the user sets instead.
SCHEDULER_OWNED = {
    "host": "scheduler_host and network_mode",
    "interface": "network_mode",
    "port": "ports",
    "protocol": "security",
    "tls_ca_file": "security",
    "tls_cert": "security",
    "tls_key": "security",
    "scheduler_file": "nothing: the cluster folder holds it",
    "pid_file": "nothing: the cluster folder holds it",
    "preload_argv": "the list form",
    "version": "nothing",
}


def parameters(role: str) -> dict[str, Any]:
    """The click parameters of ``dask worker`` or ``dask scheduler`` (this machine's Dask), by
    their Python names."""
    if role == "worker":
        from distributed.cli.dask_worker import main
    else:
        from distributed.cli.dask_scheduler import main
    return {p.name: p for p in main.params if p.name}


def check_options(role: str, given: object) -> None:
    """``given`` is a list of arguments or a mapping of keyword options Dask's command takes
    (and lazycluster does not set itself): TypeError for another kind, ValueError naming a
    key that is unknown or ours."""
    what = f"{role}_options"
    if isinstance(given, Mapping):
        known, owned = parameters(role), WORKER_OWNED if role == "worker" else SCHEDULER_OWNED
        for key in given:
            if not isinstance(key, str):
                raise TypeError(f"{what}: keys are option names, not {key!r}")
            name = key.replace("-", "_")
            if name in owned:
                raise ValueError(f"{what}: {key!r} is set by lazycluster; use {owned[name]}")
            if name not in known:
                close = difflib.get_close_matches(name, list(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{what}: dask {role} has no option {key!r}{hint}")
        return
    if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
        raise TypeError(
            f"{what} must be a dict of keyword options ({{'nthreads': 2}}) or a list of "
            f"command-line arguments (['--nthreads', '2']), not {type(given).__name__} "
            f"{given!r}"
        )
    bad = [
        item for item in given if isinstance(item, bool) or not isinstance(item, (str, int, float))
    ]
    if bad:
        raise TypeError(f"{what}: the list form takes strings, not {bad[0]!r}")
