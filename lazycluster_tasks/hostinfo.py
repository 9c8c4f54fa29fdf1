"""Host facts in one round trip, installing nothing: a POSIX sh probe and its parser."""

from __future__ import annotations

import math
from collections.abc import Iterable

from lazycluster_tasks.commands import q


def probe_script(python: str) -> str:
    """Shell that prints ``key=value`` lines about the host (see :func:`parse_probe`)."""
    return "\n".join(
        [
            f"PY={q(python)}",
            'echo "hostname=$(hostname 2>/dev/null || uname -n)"',
            'echo "kernel=$(uname -sr)"',
            'echo "arch=$(uname -m)"',
            '[ -r /etc/os-release ] && . /etc/os-release && echo "os_release=$PRETTY_NAME"',
            'echo "home=$HOME"',
            'echo "cpu_online=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null)"',
            "cg=/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup 2>/dev/null)",
            'for f in "$cg/cpu.max" /sys/fs/cgroup/cpu.max; do',
            '  [ -r "$f" ] && echo "cpu_max=$(cat "$f")" && break; done',
            "f=/sys/fs/cgroup/cpu/cpu.cfs_quota_us; [ -r $f ] && "
            'echo "cpu_max=$(cat $f) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)"',
            "echo \"mem_total_kb=$(sed -n 's/^MemTotal: *\\([0-9]*\\).*/\\1/p' /proc/meminfo)\"",
            'for f in "$cg/memory.max" /sys/fs/cgroup/memory.max '
            "/sys/fs/cgroup/memory/memory.limit_in_bytes; do",
            '  [ -r "$f" ] && echo "mem_limit=$(cat "$f")" && break; done',
            'if command -v "$PY" >/dev/null 2>&1; then',
            '  echo "python_path=$(command -v "$PY")"',
            '  echo "python=$("$PY" --version 2>&1)"',
            # the version without importing distributed (that takes a second)
            '  "$PY" -c \'from importlib.metadata import version as v; '
            'print("distributed=" + v("distributed"))\' 2>/dev/null; fi',
            "if command -v nvidia-smi >/dev/null 2>&1; then",
            "  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sed 's/^/gpu=/'; fi",
            "true",
        ]
    )


def _cpu_limit(cpu_max: str | None) -> int | None:
    """``"200000 100000"`` (cgroup v2 cpu.max or v1 quota/period) -> 2; "max" or -1 -> None."""
    if not cpu_max:
        return None
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] in ("max", "-1"):
        return None
    quota, period = int(parts[0]), int(parts[1])
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def parse_probe(output: str) -> dict[str, object]:
    """Turn the probe's lines into the ``Runtime.info`` dict."""
    values: dict[str, str] = {}
    gpus: list[str] = []
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "gpu":
            if value.strip():
                gpus.append(value.strip())
        else:
            values[key] = value.strip()
    cpus = int(values["cpu_online"]) if values.get("cpu_online", "").isdigit() else 1
    limit = _cpu_limit(values.get("cpu_max"))
    if limit is not None:
        cpus = min(cpus, limit)
    memory = int(values["mem_total_kb"]) * 1024 if values.get("mem_total_kb", "").isdigit() else 0
    mem_limit = values.get("mem_limit", "")
    if mem_limit.isdigit() and 0 < int(mem_limit) < memory:
        memory = int(mem_limit)
    python = values.get("python", "")
    version = python.split()[1] if python.startswith("Python ") and " " in python else None
    kernel = values.get("kernel", "")
    return {
        "hostname": values.get("hostname", ""),
        "os": values.get("os_release") or kernel,
        "kernel": kernel,
        "arch": values.get("arch", ""),
        "home": values.get("home", ""),
        "cpu_cores": cpus,
        "memory": memory,
        "python_version": version,
        "python_executable": values.get("python_path"),
        "distributed_version": values.get("distributed") or None,
        "gpus": gpus,
    }


FILTER_TRUE = "true"


def filter_script(installed_executables: Iterable[str], filter_commands: Iterable[str]) -> str:
    """One script for ``check_filter``: executables found, and each command's last line.

    Prints ``exe:<name>=1|0`` lines, then ``cmd:<i>=<last output line>`` per filter command.
    """
    lines = [
        f"if command -v {q(e)} >/dev/null 2>&1; then echo {q('exe:' + e + '=1')}; "
        f"else echo {q('exe:' + e + '=0')}; fi"
        for e in installed_executables
    ]
    for i, cmd in enumerate(filter_commands):
        if not cmd or not cmd.strip():
            raise ValueError("filter commands must be non-empty")
        lines.append(f'r=$(sh -c {q(cmd)} 2>/dev/null | tail -n 1); echo "cmd:{i}=$r"')
    return "\n".join(lines) or "true"
