"""RuntimeManager: find the usable hosts of an OpenSSH config and build groups from them."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from lazycluster_tasks import sshconfig
from lazycluster_tasks.errors import GroupError, NoRuntimesDetectedError
from lazycluster_tasks.group import RuntimeGroup, destination, fan_out
from lazycluster_tasks.runtime import Runtime

logger = logging.getLogger(__name__)

#: Connect timeout (s) while probing hosts: a dead host must not hold up discovery.
DISCOVERY_TIMEOUT = 5.0


def config_hosts(ssh_config_path: str | None = None) -> list[str]:
    """The hosts of an OpenSSH config, in file order, each once.

    Included files are followed; a ``Host`` line with several names is one host, named
    by its first pattern without wildcards or negation (see :mod:`lazycluster_tasks.sshconfig`).
    """
    return sshconfig.config_hosts(ssh_config_path)


class RuntimeManager:
    """Checks every host of the SSH config concurrently; keeps the active ones."""

    def __init__(
        self,
        ssh_config_path: str | None = None,
        *,
        connection_kwargs: Mapping[str, Any] | None = None,
        python_executable: str | None = None,
        connect_timeout: float = DISCOVERY_TIMEOUT,
    ) -> None:
        self.ssh_config_path = ssh_config_path
        kwargs = {"connect_timeout": connect_timeout, **dict(connection_kwargs or {})}
        candidates: list[Runtime] = []
        seen: dict[str, str] = {}  # destination -> alias
        for h in config_hosts(ssh_config_path):
            rt = Runtime(h, None, kwargs, ssh_config_path, python_executable=python_executable)
            where = destination(rt)
            if where in seen:  # two Host blocks for one machine: probe and use it once
                logger.warning(
                    "%s and %s are the same host (%s): keeping %s, dropping %s",
                    seen[where],
                    h,
                    where,
                    seen[where],
                    h,
                )
                rt.cleanup()
                continue
            seen[where] = h
            candidates.append(rt)
        try:
            valid = fan_out("discovery", candidates, lambda rt: rt.is_valid_runtime())
        except GroupError as exc:  # is_valid_runtime does not raise; keep this honest anyway
            valid = {h: False for h in exc.errors} | dict(exc.results)
        self._runtimes = {rt.host: rt for rt in candidates if valid.get(rt.host)}
        self.inactive_hosts = [rt.host for rt in candidates if not valid.get(rt.host)]
        for rt in candidates:
            if rt.host in self.inactive_hosts:
                rt.cleanup()
        logger.info(
            "active hosts: %s; inactive: %s",
            ", ".join(self._runtimes) or "none",
            ", ".join(self.inactive_hosts) or "none",
        )

    @property
    def hosts(self) -> list[str]:
        return list(self._runtimes)

    def create_group(
        self,
        include_hosts: Iterable[str] | str | None = None,
        exclude_hosts: Iterable[str] | str | None = None,
        gpu_required: bool = False,
        min_memory: int | None = None,
        min_cpu_cores: int | None = None,
        installed_executables: str | Iterable[str] | None = None,
        filter_commands: str | Iterable[str] | None = None,
        working_dir: str | None = None,
    ) -> RuntimeGroup:
        """A group of the active hosts that pass every filter; NoRuntimesDetectedError if none."""
        include = {include_hosts} if isinstance(include_hosts, str) else include_hosts
        exclude = {exclude_hosts} if isinstance(exclude_hosts, str) else set(exclude_hosts or ())
        chosen = [
            rt
            for h, rt in self._runtimes.items()
            if (include is None or h in include) and h not in exclude
        ]
        try:
            passed = fan_out(
                "host filter",
                chosen,
                lambda rt: rt.check_filter(
                    gpu_required, min_memory, min_cpu_cores, installed_executables, filter_commands
                ),
            )
        except GroupError as exc:
            logger.warning("%s", exc)
            passed = {h: bool(v) for h, v in exc.results.items()}
        runtimes = [rt for rt in chosen if passed.get(rt.host)]
        if not runtimes:
            raise NoRuntimesDetectedError(
                f"no active host qualifies (active: {', '.join(self._runtimes) or 'none'}; "
                f"inactive: {', '.join(self.inactive_hosts) or 'none'})"
            )
        return RuntimeGroup(runtimes=runtimes, working_dir=working_dir)

    def print_hosts(self) -> None:
        for host in self._runtimes:
            print(host)

    def print_inactive_hosts(self) -> None:
        for host in self.inactive_hosts:
            print(host)

    def print_runtime_info(self) -> None:
        for runtime in self._runtimes.values():
            runtime.print_info()
