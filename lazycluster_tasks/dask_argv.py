"""The Dask processes' command lines: ``dask scheduler`` and ``dask worker`` as argv, with our
options, the user's (in Dask's list or keyword form) and TLS. Pure: nothing here does I/O."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lazycluster_tasks.dask_options import DaskOptions
    from lazycluster_tasks.security import TLSPaths

SCHEDULER_MODULE = "distributed.cli.dask_scheduler"
WORKER_MODULE = "distributed.cli.dask_worker"
#: Seconds the scheduler lives on after its last client left (read by WATCH_PRELOAD).
CLIENT_TIMEOUT_ENV = "LAZYCLUSTER_CLIENT_TIMEOUT"


def server_env(folder: str, env: Mapping[str, str]) -> dict[str, str]:
    """Environment of a scheduler or worker: its temp files (a text preload becomes a .py file
    and a __pycache__, Dask's scratch space) go in the cluster folder and leave with it, never
    in the host's /tmp. The user's ``env`` comes last and wins."""
    return {"TMPDIR": folder, "DASK_TEMPORARY_DIRECTORY": folder, **env}


#: Scheduler preload (given as text): close the scheduler once no client has been connected for
#: $LAZYCLUSTER_CLIENT_TIMEOUT seconds — the controller holds one for the cluster's lifetime, so
#: a controller that died takes its scheduler with it; workers follow by their death timeout.
#: Until the controller's first client arrives the wait is at least
#: $LAZYCLUSTER_FIRST_CLIENT_GRACE seconds (30): a loaded controller may take longer than a short
#: idle timeout to connect, and a scheduler that closed before then failed the whole start.
WATCH_PRELOAD = """
import asyncio, os, time

def dask_setup(scheduler):
    limit = float(os.environ.get("LAZYCLUSTER_CLIENT_TIMEOUT", "60"))
    first = max(limit, float(os.environ.get("LAZYCLUSTER_FIRST_CLIENT_GRACE", "30")))

    async def watch():
        last, seen = time.monotonic(), False
        while scheduler.status.name not in ("closing", "closed"):
            await asyncio.sleep(0.5)
            if any(c != "fire-and-forget" for c in scheduler.clients):
                last, seen = time.monotonic(), True
            elif time.monotonic() - last > (limit if seen else first):
                await scheduler.close(reason="lazycluster: no client connected")
                return

    scheduler._lazycluster_watch = asyncio.ensure_future(watch())
"""


# -- the user's options, in SSHCluster's forms ----------------------------------------------

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


def _parameters(role: str) -> dict[str, Any]:
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
        known, owned = _parameters(role), WORKER_OWNED if role == "worker" else SCHEDULER_OWNED
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


def option_flags(role: str, given: Mapping[str, Any] | Sequence[Any]) -> list[str]:
    """The command-line arguments of ``given`` (checked by :func:`check_options`): a list as it
    is; each keyword option as its flag — ``True``/``False`` for on/off flags, a mapping as
    ``k=v`` pairs (resources), a list repeated for options taken many times (preload)."""
    if not isinstance(given, Mapping):
        return [str(item) for item in given]
    parameters = _parameters(role)
    argv: list[str] = []
    for key, value in given.items():
        parameter = parameters[key.replace("-", "_")]
        flag = parameter.opts[0]
        if getattr(parameter, "is_flag", False) and parameter.secondary_opts:
            argv.append(flag if value else parameter.secondary_opts[0])
        elif isinstance(value, Mapping):
            argv += [flag, " ".join(f"{k}={v}" for k, v in value.items())]
        elif getattr(parameter, "multiple", False) and not isinstance(value, str):
            for item in value if isinstance(value, Sequence) else [value]:
                argv += [flag, str(item)]
        elif parameter.name == "dashboard_address" and str(value).startswith(":"):
            argv += [flag, f"127.0.0.1{value}"]  # a port only: still this host's own loopback
        else:
            argv += [flag, str(value)]
    return argv


def scheduler_argv(
    python: str,
    address: str,
    port: int,
    folder: str,
    options: DaskOptions,
    tls: TLSPaths | None = None,
) -> list[str]:
    """``dask scheduler`` bound to ``address:port``, dashboard pinned to 127.0.0.1; with
    ``tls`` it speaks only ``tls://`` and requires client certificates."""
    argv = [
        python,
        "-m",
        SCHEDULER_MODULE,
        "--host",
        address,
        "--port",
        str(port),
        "--dashboard-address",
        "127.0.0.1:0",
        "--scheduler-file",  # written once the scheduler listens: our readiness signal
        f"{folder}/scheduler.json",
        "--preload",
        WATCH_PRELOAD,
    ]
    if not options.dashboard:
        argv.append("--no-dashboard")
    return argv + tls_args(tls) + option_flags("scheduler", options.scheduler_options)


def tls_args(tls: TLSPaths | None) -> list[str]:
    """Dask's TLS flags: file paths only, never their contents."""
    if tls is None:
        return []
    return [
        "--protocol",
        "tls",
        "--tls-ca-file",
        tls.ca,
        "--tls-cert",
        tls.cert,
        "--tls-key",
        tls.key,
    ]


def worker_argv(
    python: str,
    scheduler_address: str,
    name: str,
    folder: str,
    options: DaskOptions,
    *,
    address: str,
    port: int,
    nanny_port: int | None,
    loopback: bool,
    resources: Mapping[str, float] | None = None,
    tls: TLSPaths | None = None,
) -> list[str]:
    """``dask worker`` with explicit addresses: the host's own address (direct) or 127.0.0.1 with
    the same port on every node (``loopback``: tunnelled)."""
    argv = [python, "-m", WORKER_MODULE, scheduler_address, "--name", name]
    if loopback:
        contact = f"{'tls' if tls else 'tcp'}://127.0.0.1:{port}"
        argv += ["--listen-address", contact, "--contact-address", contact]
    else:
        argv += ["--host", address, "--worker-port", str(port)]
    if options.nanny:
        argv += ["--nanny", "--nanny-port", str(nanny_port)]
    else:
        argv.append("--no-nanny")
    argv += [
        "--no-dashboard",
        "--death-timeout",
        str(options.death_timeout),
        "--local-directory",
        f"{folder}/{name}",
    ]
    if options.threads_per_worker:
        argv += ["--nthreads", str(options.threads_per_worker)]
    if options.memory_limit is not None:
        argv += ["--memory-limit", str(options.memory_limit)]
    if resources:
        argv += ["--resources", " ".join(f"{k}={v}" for k, v in resources.items())]
    if options.worker_class:
        argv += ["--worker-class", options.worker_class]
    return argv + tls_args(tls) + option_flags("worker", options.worker_options)
