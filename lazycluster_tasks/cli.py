"""The ``lazycluster`` command: ``hosts``, ``envs``, ``up``, ``status``, ``logs``, ``down``,
``attach``, ``exec``, ``sweep``.

Exit codes scripts can rely on: 0 done; 1 something failed on a host or in the cluster (each
failure named on stderr); 2 bad input (an unknown host or cluster id, a bad option).

``up --detach`` leaves a background process that owns the cluster (its connections, tunnels and
the client that keeps the scheduler alive) and writes the cluster's record to the state folder
(``LAZYCLUSTER_STATE_DIR``); ``status``, ``logs`` and ``down`` read it. ``down`` asks that
process to close the cluster and falls back to ``teardown(record)`` when it is gone.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import psutil
import typer
from rich.console import Console
from rich.table import Table

from lazycluster_tasks import __version__, control, processes
from lazycluster_tasks.connection import tail
from lazycluster_tasks.errors import GroupError, LazyclusterError
from lazycluster_tasks.group import run_parallel
from lazycluster_tasks.local import is_local_host
from lazycluster_tasks.manager import config_hosts
from lazycluster_tasks.network import NETWORK_MODES
from lazycluster_tasks.network import network_mode as check_network_mode
from lazycluster_tasks.record import ClusterRecord, HostSpec, teardown
from lazycluster_tasks.runtime import Runtime
from lazycluster_tasks.settings import settings

if TYPE_CHECKING:
    from lazycluster_tasks.environments import Manifest

EXIT_FAILED, EXIT_USAGE = 1, 2
#: Seconds a host may take to answer ``hosts`` and ``exec`` before it counts as unreachable.
CONNECT_TIMEOUT = 5.0
#: Seconds ``up --detach`` waits for the background process to report the cluster running.
DETACH_TIMEOUT = 300.0
#: Seconds ``down`` gives the background process to close the cluster before tearing down.
DOWN_TIMEOUT = 60.0

app = typer.Typer(
    name="lazycluster",
    help="Dask clusters on plain SSH hosts: look at hosts, start, inspect and stop clusters.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

SshConfig = Annotated[
    str | None,
    typer.Option(
        "--ssh-config",
        "-F",
        help="ssh config file (default: LAZYCLUSTER_SSH_CONFIG or ~/.ssh/config)",
    ),
]


def _print_version(given: bool) -> None:
    if given:
        out.print(f"lazycluster-tasks {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    """Dask clusters on plain SSH hosts: look at hosts, start, inspect and stop clusters."""


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def _config(path: str | None) -> str | None:
    return path or settings().ssh_config


def _known(hosts: list[str], config: str | None) -> list[str]:
    """The hosts, each in the ssh config or resolvable; an unknown one is bad input."""
    listed = set(config_hosts(config))
    unknown = []
    for host in hosts:
        if host in listed or host in ("localhost", "127.0.0.1"):
            continue
        name = host.rsplit("@", 1)[-1]
        try:
            socket.getaddrinfo(name, None)
        except (OSError, UnicodeError):
            unknown.append(host)
    if unknown:
        where = config or "~/.ssh/config"
        raise fail(
            f"unknown host(s): {', '.join(unknown)} (not in {where}, not resolvable)", EXIT_USAGE
        )
    return hosts


def _runtime(host: str, config: str | None) -> Runtime:
    """``localhost`` is this machine (no SSH); any other host with a bounded connect."""
    kwargs = {} if is_local_host(host) else {"connect_timeout": CONNECT_TIMEOUT}
    return Runtime(host, None, kwargs, config)


def _on_hosts(
    what: str, runtimes: dict[str, Runtime], fn: Callable[[str, Runtime], Any]
) -> tuple[dict[str, Any], dict[str, BaseException]]:
    """``fn(host, runtime)`` for every host at once: results and errors by host (partial
    failure is data); the runtimes are released either way."""
    try:
        return run_parallel(what, {h: (h, rt) for h, rt in runtimes.items()}, lambda j: fn(*j)), {}
    except GroupError as exc:
        return dict(exc.results), dict(exc.errors)
    finally:
        for rt in runtimes.values():
            rt.cleanup()


# -- hosts --------------------------------------------------------------------------------


def _describe(runtime: Runtime) -> dict[str, Any]:
    info = runtime.info
    return {
        "host": runtime.host,
        "reachable": True,
        "cores": info.get("cpu_cores"),
        "memory_gib": round(int(info.get("memory") or 0) / 2**30, 1),
        "gpus": info.get("gpus") or [],
        "python": info.get("python_version"),
        "distributed": info.get("distributed_version"),
        "error": None,
    }


@app.command()
def hosts(
    names: Annotated[
        list[str] | None, typer.Argument(help="hosts (default: all in the config)")
    ] = None,
    ssh_config: SshConfig = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
) -> None:
    """The hosts with their cores, memory, GPUs, Python and distributed, checked at once.
    Exit 1 when a host does not answer."""
    config = _config(ssh_config)
    chosen = _known(names, config) if names else config_hosts(config)
    if not chosen:
        raise fail(f"no hosts in {config or '~/.ssh/config'}", EXIT_USAGE)
    with err.status(f"checking {len(chosen)} hosts"):
        found, errors = _on_hosts(
            "hosts", {h: _runtime(h, config) for h in chosen}, lambda _, rt: _describe(rt)
        )
    rows = [
        found.get(h)
        or {"host": h, "reachable": False, "error": " ".join(str(errors.get(h)).split())[:200]}
        for h in chosen
    ]
    if as_json:
        out.print_json(json.dumps(rows))
    else:
        table = Table("host", "reachable", "cores", "memory GiB", "GPUs", "python", "distributed")
        for row in rows:
            if row["reachable"]:
                table.add_row(
                    row["host"],
                    "yes",
                    str(row["cores"]),
                    str(row["memory_gib"]),
                    str(len(row["gpus"])),
                    row["python"] or "-",
                    row["distributed"] or "not installed",
                )
            else:
                table.add_row(row["host"], f"[red]no[/red]: {row['error']}", *["-"] * 5)
        out.print(table)
    if errors:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def envs(
    names: Annotated[
        list[str] | None, typer.Argument(help="hosts (default: all in the config)")
    ] = None,
    ssh_config: SshConfig = None,
    prune: Annotated[
        bool,
        typer.Option("--prune", help="remove environments unused for --older days (not in use)"),
    ] = False,
    older: Annotated[
        float, typer.Option(min=0, help="days since last use before --prune removes")
    ] = 7,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
    shipped: Annotated[
        bool,
        typer.Option("--shipped", help="list what a start sends a host from here, by distribution"),
    ] = False,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="with --shipped: a distribution (or pattern) left out"),
    ] = None,
) -> None:
    """The environments clusters made on the hosts (~/.cache/lazycluster there): size, last
    use (each start that uses one notes it) and whether a running cluster uses it; --prune
    removes those whose last use is --older days ago or more (0: all), never one a running
    process uses or a starting cluster holds, and the parts nothing uses. Exit 1 when a host
    does not answer. --shipped lists what this machine's environment is made of (asks no
    host)."""
    from lazycluster_tasks import environments

    if shipped:
        _shipped(environments.current(None, list(exclude or []), None), as_json)
        return
    config = _config(ssh_config)
    chosen = _known(names, config) if names else config_hosts(config)
    if not chosen:
        raise fail(f"no hosts in {config or '~/.ssh/config'}", EXIT_USAGE)
    args = ["prune", "--older", str(older * 86400)] if prune else ["list"]
    line = environments.host_line(*args)

    def ask(_: str, runtime: Runtime) -> dict[str, Any]:
        result = runtime.connection.run(line, timeout=120)
        if not result.ok:
            raise LazyclusterError(tail(result.output, 300).strip() or f"exit {result.exit_code}")
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))

    with err.status(f"asking {len(chosen)} hosts"):
        found, errors = _on_hosts("envs", {h: _runtime(h, config) for h in chosen}, ask)
    if as_json:
        out.print_json(
            json.dumps({"hosts": found, "errors": {h: str(e) for h, e in errors.items()}})
        )
    elif prune:
        for host in chosen:
            if host in found:
                removed, busy = found[host]["removed"], found[host].get("in_use", [])
                held = found[host].get("held", [])
                kept = f" (kept {len(busy)} in use)" if busy else ""
                if held:
                    kept += f" (kept {len(held)} a starting cluster holds)"
                out.print(f"{host}: removed {len(removed)} environments {' '.join(removed)}{kept}")
    else:
        table = Table("host", "environment", "parts", "MiB", "last used", "in use")
        for host in chosen:
            for env in found.get(host, {}).get("envs", []):
                used = time.strftime("%Y-%m-%d %H:%M", time.localtime(env["used"]))
                table.add_row(
                    host,
                    env["key"],
                    str(env["units"]),
                    f"{env['bytes'] / 2**20:.0f}",
                    used,
                    "yes" if env.get("in_use") else "no",
                )
        out.print(table)
    for host, error in errors.items():
        err.print(f"{host}: not answered: {' '.join(str(error).split())[:200]}", highlight=False)
    if errors:
        raise typer.Exit(EXIT_FAILED)


def _shipped(manifest: Manifest, as_json: bool) -> None:
    units = sorted(manifest.units, key=lambda u: (-u.size, u.name))
    if as_json:
        rows = [{"name": u.name, "version": u.version, "bytes": u.size} for u in units]
        out.print_json(json.dumps({"key": manifest.key, "bytes": manifest.size, "units": rows}))
        return
    table = Table("distribution", "version", "MiB", title=f"environment {manifest.key}")
    for unit in units:
        table.add_row(unit.name, unit.version or "(your code)", f"{unit.size / 2**20:.1f}")
    table.add_row("total", "", f"{manifest.size / 2**20:.1f}")
    out.print(table)
    out.print(
        "Leave a distribution out with environment={'exclude': [...]} (or --exclude here to "
        "preview); a host that has a part already is not sent it again."
    )


@app.command()
def sweep(
    names: Annotated[list[str], typer.Argument(help="hosts to sweep")],
    ssh_config: SshConfig = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="list what would be removed, change nothing")
    ] = False,
    folder: Annotated[
        list[str] | None,
        typer.Option("--dir", help="a working dir clusters used besides the temp dir (repeat)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document")] = False,
) -> None:
    """Find and remove what lazycluster left on hosts: cluster folders (their processes are
    stopped first, by their pid files), and the links' keys in ~/.ssh/authorized_keys. For a
    controller that died and left no record; a cluster that runs there is stopped too. Exit 1
    when a host does not answer or cannot be swept."""
    from lazycluster_tasks import commands, hostside, link_commands
    from lazycluster_tasks.processes import Revoke, revoke, stop_folder

    config = _config(ssh_config)
    chosen = _known(list(names), config)
    program = shlex.join(["-c", hostside.source("sweep"), *(folder or [])])
    line = commands.any_python(program)  # the host's python3, or a python3.X

    def clean(host: str, runtime: Runtime) -> dict[str, Any]:
        result = runtime.connection.run(line, timeout=60)
        if not result.ok:
            raise LazyclusterError(tail(result.output, 300).strip() or f"exit {result.exit_code}")
        found = dict(json.loads(result.stdout.strip().splitlines()[-1]))
        if dry_run:
            return found
        python = str(found.get("python") or "python3")
        markers = set(found["markers"])
        for entry in found["folders"]:
            path = str(entry["path"])
            marker = link_commands.peer_marker(path.rsplit("lazycluster-", 1)[1])
            markers.discard(marker)
            stop_folder(runtime, path, 1.0, path, Revoke(python, marker))
            parent = path.rsplit("/", 1)[0]
            if parent.rsplit("/", 1)[-1].startswith("lazycluster-"):  # our working dir
                runtime.connection.run(f"rmdir -- {commands.q(parent)} 2>/dev/null; true")
        for marker in sorted(markers):
            revoke(runtime, Revoke(python, marker))
        return found

    with err.status(f"sweeping {len(chosen)} hosts"):
        found, errors = _on_hosts("sweep", {h: _runtime(h, config) for h in chosen}, clean)
    if as_json:
        payload = {"hosts": found, "errors": {h: str(e) for h, e in errors.items()}}
        out.print_json(json.dumps({"dry_run": dry_run, **payload}))
    else:
        verb = "would remove" if dry_run else "removed"
        for host in chosen:
            if host not in found:
                continue
            folders, keys = found[host]["folders"], found[host]["markers"]
            running = sum(1 for f in folders for alive in f["pids"].values() if alive)
            out.print(
                f"{host}: {verb} {len(folders)} cluster folders ({running} processes running)"
                f" and the keys of {len(keys)} clusters",
                highlight=False,
            )
            for entry in folders:
                out.print(f"  {entry['path']}", highlight=False)
    for host, error in errors.items():
        err.print(f"{host}: not swept: {' '.join(str(error).split())[:200]}", highlight=False)
    if errors:
        raise typer.Exit(EXIT_FAILED)


# -- state of clusters started here ---------------------------------------------------------


def _state_dir() -> Path:
    folder = Path(settings().state_directory)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def _state_file(cluster_id: str) -> Path:
    return _state_dir() / f"{cluster_id}.json"


def _write_state(cluster: Any, pid: int, blocks: Blocks) -> None:
    record: ClusterRecord = cluster.record()
    state = {
        "pid": pid,
        # the pid alone could name another process after a reboot or a long wait
        "started": psutil.Process(pid).create_time(),
        "record": record.model_dump(mode="json"),
        "host_group": blocks[0],
        "ssh_block": blocks[1],
    }
    path = _state_file(record.cluster_id)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


def _read_state(cluster_id: str) -> dict[str, Any]:
    path = _state_file(cluster_id)
    if not path.exists():
        known = sorted(p.stem for p in _state_dir().glob("*.json"))
        raise fail(f"no cluster {cluster_id!r} (known: {', '.join(known) or 'none'})", EXIT_USAGE)
    return dict(json.loads(path.read_text()))


def _owner(state: dict[str, Any]) -> psutil.Process | None:
    """The process that owns the cluster, if it still runs: its pid and the time it started
    (a pid reused since, by a process of the user's, is not it)."""
    try:
        proc = psutil.Process(int(state["pid"]))
        same = abs(proc.create_time() - float(state["started"])) < 0.01
        if same and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except (psutil.Error, KeyError, ValueError, TypeError):
        pass
    return None


def _owner_alive(state: dict[str, Any]) -> bool:
    return _owner(state) is not None


# -- up -------------------------------------------------------------------------------------


Blocks = tuple[str | None, str | None]  # (host group, ssh settings) block names


@app.command()
def up(
    names: Annotated[
        list[str] | None, typer.Argument(help="hosts to run workers on (or --host-group)")
    ] = None,
    ssh_config: SshConfig = None,
    host_group: Annotated[
        str | None, typer.Option(help="a Prefect host group block: its hosts and options")
    ] = None,
    ssh_block: Annotated[
        str | None, typer.Option(help="a Prefect SSH settings block: how to log in")
    ] = None,
    workers_per_host: Annotated[
        list[str] | None,
        typer.Option(
            metavar="N|HOST=N",
            help="workers on each host: one count (`--workers-per-host 2`), or a count per host, "
            "repeated (`--workers-per-host gpu1=4 --workers-per-host cpu1=1`; hosts not named "
            "get 1); default: the host group's, else 1",
        ),
    ] = None,
    network_mode: Annotated[
        str | None,
        typer.Option(
            metavar="|".join(NETWORK_MODES),
            help="how workers reach each other (default: the host group's, else auto)",
        ),
    ] = None,
    host_links: Annotated[
        bool | None,
        typer.Option(
            "--host-links/--no-host-links",
            help="tunnelled: let a key per host into the others' ~/.ssh/authorized_keys, so "
            "worker traffic takes host-to-host SSH links (default: the host group's, else on)",
        ),
    ] = None,
    threads_per_worker: Annotated[
        int | None, typer.Option(min=1, help="threads of each worker (default: its cores)")
    ] = None,
    memory_limit: Annotated[
        str | None, typer.Option(help='memory of each worker, e.g. "4GiB" (default: auto)')
    ] = None,
    python: Annotated[
        list[str] | None,
        typer.Option(
            metavar="PATH|HOST=PATH",
            help="the hosts' interpreter (yours: no environment sent), one for all or per "
            "host, repeated",
        ),
    ] = None,
    scheduler_host: Annotated[
        str | None, typer.Option(help="run the scheduler on this host (default: here)")
    ] = None,
    ports: Annotated[
        str | None,
        typer.Option(metavar="FIRST-LAST", help="ports the cluster may use (default 60001-60199)"),
    ] = None,
    worker_class: Annotated[
        str | None, typer.Option(help='the workers\' class, e.g. "dask_cuda.CUDAWorker"')
    ] = None,
    gpus: Annotated[
        bool, typer.Option("--gpus", help="one worker per GPU of each host (nvidia-smi)")
    ] = False,
    setup: Annotated[
        list[str] | None,
        typer.Option(help='a shell line before each process, e.g. "module load cuda/12" (repeat)'),
    ] = None,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls/--no-tls", help="TLS between all processes (on; --no-tls: plain TCP, warned)"
        ),
    ] = True,
    detach: Annotated[bool, typer.Option(help="return once running; `down ID` stops it")] = False,
) -> None:
    """Start a cluster: the scheduler here, workers on the hosts. Prints its id, the scheduler
    address and the dashboard; stays until Ctrl-C (or returns with --detach)."""
    if network_mode is not None:
        try:
            check_network_mode(network_mode, "--network-mode")
        except ValueError as exc:
            raise fail(str(exc), EXIT_USAGE) from None
    try:
        per_host = parse_workers_per_host(workers_per_host)
    except ValueError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    if not names and not host_group:
        raise fail("give the hosts, or --host-group with a host group block", EXIT_USAGE)
    # --ssh-config, else the blocks' ssh config, else LAZYCLUSTER_SSH_CONFIG
    from_blocks, group_hosts = _check_blocks(host_group, ssh_block)
    config = ssh_config or from_blocks or _config(None)
    if names:
        _known(names, config)
    hosts = names or group_hosts
    if isinstance(per_host, dict) and hosts:
        unknown = [host for host in per_host if host not in hosts]
        if unknown:
            raise fail(
                f"--workers-per-host names {', '.join(unknown)}, not among the hosts "
                f"({', '.join(hosts)})",
                EXIT_USAGE,
            )
    options = _cluster_options(names, config, (host_group, ssh_block), per_host)
    if network_mode is not None:
        options["network_mode"] = network_mode
    if host_links is not None:
        options["host_links"] = host_links
    try:
        options.update(
            _process_options(
                threads_per_worker, memory_limit, python, scheduler_host, ports, worker_class, gpus
            )
        )
    except ValueError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    if setup:
        options["setup"] = list(setup)
    if not tls:
        err.print(
            "[yellow]warning:[/yellow] --no-tls: the cluster's traffic is plain TCP, readable "
            "and open to anyone who reaches its ports",
            highlight=False,
        )
        options["security"] = False
    if detach:
        _detach(options)
        return
    _serve(options, announce=True)


def _process_options(
    threads_per_worker: int | None,
    memory_limit: str | None,
    python: Sequence[str] | None,
    scheduler_host: str | None,
    ports: str | None,
    worker_class: str | None,
    gpus: bool,
) -> dict[str, Any]:
    """``up``'s options for the processes as LazySSHCluster's (plain data, JSON-ready)."""
    given: dict[str, Any] = {
        "threads_per_worker": threads_per_worker,
        "memory_limit": memory_limit,
        "scheduler_host": scheduler_host,
        "worker_class": worker_class,
        "gpus": "auto" if gpus else None,
    }
    if python:
        pairs = [v.partition("=") for v in python]
        if len(python) == 1 and not pairs[0][1]:
            given["python"] = python[0]
        elif all(sep and host and path for host, sep, path in pairs):
            given["python"] = {host: path for host, _, path in pairs}
        else:
            raise ValueError("--python: give one PATH for every host, or HOST=PATH entries")
    if ports is not None:
        first, sep, last = ports.partition("-")
        if not (sep and first.isdigit() and last.isdigit() and 0 < int(first) <= int(last)):
            raise ValueError(f"--ports must be FIRST-LAST (e.g. 60001-60199), not {ports!r}")
        given["ports"] = list(range(int(first), int(last) + 1))
    return {key: value for key, value in given.items() if value is not None}


def parse_workers_per_host(values: Sequence[str] | None) -> int | dict[str, int] | None:
    """``--workers-per-host``: one ``N`` (every host), or ``HOST=N`` entries (hosts not named
    get 1); None when not given. Anything else is a ValueError that says what is wrong."""
    if not values:
        return None
    counts: dict[str, int] = {}
    single: int | None = None
    for value in values:
        host, is_pair, number = value.rpartition("=")
        host = host.strip()
        what = f"--workers-per-host {value!r}"
        if is_pair and (not host or any(c.isspace() for c in host)):
            raise ValueError(f"{what}: give HOST=N with a host name (no spaces) before '='")
        try:
            count = int(number.strip())
        except ValueError:
            raise ValueError(f"{what}: the count must be an integer >= 1 (N or HOST=N)") from None
        if count < 1:
            raise ValueError(f"{what}: the count must be an integer >= 1, not {count}")
        if not is_pair:
            if single is not None or counts:
                raise ValueError(
                    "--workers-per-host: give one count N for every host, or HOST=N "
                    "entries, not both (nor N twice)"
                )
            single = count
            continue
        if single is not None:
            raise ValueError(
                "--workers-per-host: give one count N for every host, or HOST=N entries, not both"
            )
        if host in counts:
            raise ValueError(f"--workers-per-host: {host} given twice")
        counts[host] = count
    return single if single is not None else counts


def _cluster_options(
    names: list[str] | None,
    config: str | None,
    blocks: Blocks,
    per_host: int | dict[str, int] | None,
) -> dict[str, Any]:
    """LazySSHCluster's arguments; what is not given comes from the blocks or defaults."""
    given = {
        "hosts": names or None,
        "ssh_config_path": config,
        "host_group": blocks[0],
        "ssh_block": blocks[1],
        "workers_per_host": per_host,
    }
    return {key: value for key, value in given.items() if value is not None}


def _check_blocks(
    host_group: str | None, ssh_block: str | None
) -> tuple[str | None, list[str] | None]:
    """Named blocks must exist (bad input, exit 2) and the Prefect API must answer (exit 1).
    Returns the ssh config path their SSH settings name, if any, and the host group's hosts."""
    if not (host_group or ssh_block):
        return None, None
    from lazycluster_tasks.prefect.blocks import HostGroupBlock, SSHSettingsBlock
    from lazycluster_tasks.prefect.records import load_block
    from lazycluster_tasks.prefect.resolve import pick_ssh

    found: dict[type[Any], Any] = {}
    for cls, name in ((HostGroupBlock, host_group), (SSHSettingsBlock, ssh_block)):
        if not name:
            continue
        try:
            found[cls] = load_block(cls, name)
        except ValueError as exc:
            raise fail(f"no {cls._block_type_name} block {name!r}: {exc}", EXIT_USAGE) from None
        except Exception as exc:
            raise fail(f"{cls._block_type_name} block {name!r} not read: {exc}") from None
    group = found.get(HostGroupBlock)
    ssh = pick_ssh(found.get(SSHSettingsBlock), group)
    hosts = list(group.hosts) if group is not None else None
    return (ssh.ssh_config_path if ssh is not None else None), hosts


def _block_kwargs(state: dict[str, Any]) -> dict[str, Any]:
    """Login secrets from the blocks a cluster was started with (never in the state file)."""
    host_group, ssh_block = state.get("host_group"), state.get("ssh_block")
    if not (host_group or ssh_block):
        return {}
    from lazycluster_tasks.prefect.resolve import connection_kwargs

    try:
        return connection_kwargs(ssh_block, host_group)
    except Exception as exc:
        err.print(f"SSH settings of blocks not read ({exc}); trying without them")
        return {}


def _serve(options: dict[str, Any], announce: bool) -> None:
    """Run the cluster in this process until SIGINT or SIGTERM, then close it."""
    from lazycluster_tasks.ssh_cluster import LazySSHCluster

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    where = f"{len(options['hosts'])} hosts" if "hosts" in options else options.get("host_group")
    with err.status(f"starting workers on {where}"):
        try:
            cluster = LazySSHCluster(
                **options,
                idle_timeout=24 * 3600.0,  # this process is the cluster's client while it runs
            )
        except Exception as exc:
            raise fail(f"the cluster did not start: {exc}") from None
    blocks = (options.get("host_group"), options.get("ssh_block"))
    try:
        _write_state(cluster, os.getpid(), blocks)
        record = cluster.record()
        if announce:
            out.print(_running(record))
            out.print(f"scheduler {record.scheduler_address}")
            out.print(f"dashboard {cluster.dashboard_link}")
            out.print("Ctrl-C stops it")
        while not stop.wait(5):
            if cluster.status.name in ("closed", "failed"):
                break
            _write_state(cluster, os.getpid(), blocks)  # workers added or replaced since
    finally:
        with err.status("stopping the cluster"):
            cluster.close()
        _state_file(cluster.engine.cluster_id).unlink(missing_ok=True)
        if announce:
            out.print(f"cluster {cluster.engine.cluster_id} stopped")


def _running(record: ClusterRecord) -> str:
    return (
        f"cluster {record.cluster_id} running ({record.network_mode}): "
        f"{len(record.workers)} workers on {len(record.hosts)} hosts"
    )


def _detach(options: dict[str, Any]) -> None:
    folder = _state_dir()
    log = folder / f"up-{os.getpid()}-{int(time.time())}.log"
    # the options travel as they are, plain data on the child's stdin (no flags to parse back)
    argv = [sys.executable, "-m", "lazycluster_tasks.cli", "_serve"]
    before = {p.name for p in folder.glob("*.json")}
    with open(log, "wb") as handle:
        child = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=handle, stderr=handle, start_new_session=True
        )
        assert child.stdin is not None
        child.stdin.write(json.dumps(options).encode())
        child.stdin.close()
    deadline = time.monotonic() + DETACH_TIMEOUT
    with err.status("starting the cluster (in the background)"):
        while True:
            new = [p for p in folder.glob("*.json") if p.name not in before]
            mine = [p for p in new if json.loads(p.read_text()).get("pid") == child.pid]
            if mine:
                break
            if child.poll() is not None or time.monotonic() > deadline:
                if child.poll() is None:
                    child.terminate()
                    child.wait(30)
                text = log.read_text(errors="replace")
                log.unlink(missing_ok=True)
                raise fail(f"the cluster did not start:\n{tail(text, 2000)}")
            time.sleep(0.2)
    log.unlink(missing_ok=True)
    record = ClusterRecord.model_validate(json.loads(mine[0].read_text())["record"])
    out.print(_running(record))
    out.print(f"scheduler {record.scheduler_address}")
    out.print(f"dashboard {record.dashboard_link}")
    out.print(f"`lazycluster down {record.cluster_id}` stops it")


@app.command("_serve", hidden=True)
def serve_detached() -> None:
    """The background process of ``up --detach``: the cluster's options, as JSON, on stdin."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    options = json.loads(sys.stdin.read())
    sys.stdin.close()
    _serve(options, announce=False)


# -- status, logs, down -----------------------------------------------------------------------


@app.command()
def status(
    cluster_id: Annotated[str | None, typer.Argument(help="one cluster (default: all)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Clusters started with `up`: their hosts, workers, scheduler and whether their process
    still runs. Exit 1 when a cluster's process is gone (`down ID` cleans up after it)."""
    ids = [cluster_id] if cluster_id else sorted(p.stem for p in _state_dir().glob("*.json"))
    rows = []
    for cid in ids:
        state = _read_state(cid)
        record = ClusterRecord.model_validate(state["record"])
        rows.append(
            {
                "cluster_id": cid,
                "state": "running" if _owner_alive(state) else "owner gone",
                "network_mode": record.network_mode,
                "hosts": [h.name for h in record.hosts],
                "workers": len(record.workers),
                "scheduler": record.scheduler_address,
                "dashboard": record.dashboard_link,
                "pid": state["pid"],
            }
        )
    if as_json:
        out.print_json(json.dumps(rows))
    elif not rows:
        out.print("no clusters")
    else:
        table = Table("cluster", "state", "mode", "hosts", "workers", "scheduler", "dashboard")
        for r in rows:
            table.add_row(
                r["cluster_id"],
                r["state"],
                r["network_mode"],
                ",".join(r["hosts"]),
                str(r["workers"]),
                r["scheduler"] or "-",
                r["dashboard"] or "-",
            )
        out.print(table)
    if any(r["state"] != "running" for r in rows):
        raise typer.Exit(EXIT_FAILED)


@app.command()
def logs(
    cluster_id: str,
    lines: Annotated[int, typer.Option(min=1, help="last lines per process")] = 50,
) -> None:
    """The last lines of every process of a cluster, read from its hosts."""
    state = _read_state(cluster_id)
    record = ClusterRecord.model_validate(state["record"])
    specs = {h.name: h for h in record.hosts}
    by_host: dict[str, list[processes.ProcessInfo]] = {}
    for info in record.processes:
        by_host.setdefault(info.host, []).append(info)

    secrets = _block_kwargs(state)

    def runtime(host: str) -> Runtime:
        if host in ("localhost", "127.0.0.1"):
            return Runtime("localhost")
        spec = specs.get(host, HostSpec(name=host))
        kwargs = {**spec.connection_kwargs, **secrets}
        return Runtime(host, None, kwargs, spec.ssh_config_path)

    found, errors = _on_hosts(
        "logs",
        {h: runtime(h) for h in by_host},
        lambda host, rt: processes.read_logs(rt, by_host[host], lines),
    )
    for host in sorted(by_host):
        for name, text in sorted(found.get(host, {}).items()):
            out.print(f"--- {host} {name}", style="bold", highlight=False)
            out.print(text.rstrip(), highlight=False, markup=False)
        if host in errors:
            err.print(f"--- {host}: logs not read: {errors[host]}", highlight=False)
    if errors:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def down(cluster_id: str) -> None:
    """Stop a cluster started with `up`: its process closes it; when that process is gone, the
    record alone stops everything on the hosts. Exit 1 when a host could not be cleaned."""
    state = _read_state(cluster_id)
    proc = _owner(state)
    if proc is not None:
        with err.status(f"stopping cluster {cluster_id}"):
            proc.terminate()
            try:
                proc.wait(DOWN_TIMEOUT)
            except psutil.TimeoutExpired:
                err.print(
                    f"its process {proc.pid} did not stop in {DOWN_TIMEOUT:.0f} s; "
                    "tearing down from the record"
                )
                proc.kill()
    path = _state_file(cluster_id)
    if path.exists():  # the process did not finish its cleanup (or was gone): the record's turn
        try:
            with err.status(f"tearing down cluster {cluster_id} from its record"):
                for line in teardown(state["record"], _block_kwargs(state)).values():
                    out.print(line)
        except GroupError as exc:
            raise fail(f"teardown incomplete: {exc}") from None
        path.unlink(missing_ok=True)
    control.entries()  # the owner's entry (its client certificate), if the owner was killed
    out.print(f"cluster {cluster_id} stopped")


@app.command()
def attach(
    cluster_id: Annotated[
        str | None, typer.Argument(help="a running cluster (default: list them)")
    ] = None,
) -> None:
    """How to use a running cluster from Python or a Prefect flow (on this machine, as this
    user): the snippet to paste. Without an id: the clusters any process of yours runs here
    (`up`, a flow run, a notebook). Exit 2 when no such cluster runs."""
    from lazycluster_tasks.attached import ClusterNotFoundError, find

    if cluster_id is None:
        running = control.entries()
        if not running:
            out.print("no running clusters")
        table = Table("cluster", "owner pid", "mode", "scheduler", "dashboard")
        for entry in running.values():
            table.add_row(
                entry.cluster_id,
                str(entry.pid),
                str(entry.info.get("network_mode")),
                str(entry.info.get("scheduler_address")),
                str(entry.info.get("dashboard_link") or "-"),
            )
        if running:
            out.print(table)
        return
    try:
        entry = find(cluster_id)
    except ClusterNotFoundError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    info = entry.info
    out.print(
        f"cluster {entry.cluster_id} ({info.get('network_mode')}), owned by process "
        f"{entry.pid}\nscheduler {info.get('scheduler_address')}\n"
        f"dashboard {info.get('dashboard_link') or '-'}\n\n"
        "In Python (a notebook, a script):\n"
        "```python\n"
        "from distributed import Client\n"
        "from lazycluster_tasks import LazySSHCluster\n\n"
        f'cluster = LazySSHCluster.from_name("{entry.cluster_id}")\n'
        "client = Client(cluster)\n"
        "```\n"
        "In a Prefect flow:\n"
        "```python\n"
        "from prefect_dask import DaskTaskRunner\n\n"
        "runner = DaskTaskRunner(\n"
        '    address=cluster.scheduler_address, client_kwargs={"security": cluster.security}\n'
        ")\n"
        "```\n"
        "cluster.scale(n) and cluster.adapt(...) are done by its owner; cluster.close() leaves "
        f"it running (LazySSHCluster.from_name(..., shutdown_on_close=True) stops it, as does "
        f"`lazycluster down {entry.cluster_id}`).",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


# -- exec -------------------------------------------------------------------------------------


@app.command("exec")
def exec_(
    command: Annotated[str, typer.Argument(help="shell command run on each host")],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", "-H", help="a host (repeat); default: every host in the config"),
    ] = None,
    ssh_config: SshConfig = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="seconds per host")] = 300.0,
) -> None:
    """Run a command on hosts at once; each host's output and exit status. Exit 1 when it
    failed (or could not run) on any host."""
    config = _config(ssh_config)
    chosen = _known(host, config) if host else config_hosts(config)
    if not chosen:
        raise fail(f"no hosts in {config or '~/.ssh/config'}", EXIT_USAGE)
    found, errors = _on_hosts(
        "exec",
        {h: _runtime(h, config) for h in chosen},
        lambda _, rt: rt.connection.run(command, timeout=timeout),
    )
    failed = bool(errors)
    for h in chosen:
        if h in errors:
            err.print(
                f"--- {h}: could not run: {' '.join(str(errors[h]).split())}", highlight=False
            )
            continue
        result = found[h]
        failed = failed or not result.ok
        style = "bold" if result.ok else "bold red"
        out.print(f"--- {h} (exit {result.exit_code})", style=style, highlight=False)
        if result.output.strip():
            out.print(result.output.rstrip(), highlight=False, markup=False)
    if failed:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def version() -> None:
    """The installed version."""
    out.print(f"lazycluster-tasks {__version__}")


def main() -> None:
    """The console script: bad input from the library (a missing ssh config, a bad value) is
    a clear error with exit 2, a failure on a host exit 1 — no traceback either way."""
    try:
        app()
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(EXIT_USAGE)
    except LazyclusterError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
