"""What an orchestrator adds to a cluster, without the cluster naming it.

An integration resolves settings kept by name (a host group, SSH settings) into hosts and
options, gives the workers the orchestrator's environment while one of its runs starts the
cluster, and collects what the workers hold before they stop. The Prefect layer is one: its
package registers it under the entry point group ``lazycluster_tasks.integrations``, named
after the orchestrator's module (``prefect``). An integration is loaded once that module is
imported in this process (its runs can only start clusters then), or when settings by name
are asked for. The core works without any.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from lazycluster_tasks.engine import Engine

logger = logging.getLogger(__name__)

GROUP = "lazycluster_tasks.integrations"


@dataclass(frozen=True)
class Resolved:
    """Where a cluster runs and how it is reached, its settings by name made plain."""

    hosts: list[str]
    ssh_config_path: str | None = None
    connection_kwargs: dict[str, Any] = field(default_factory=dict)
    #: options the named settings give (a host group's workers_per_host, network_mode, ...)
    defaults: dict[str, Any] = field(default_factory=dict)


class Integration(Protocol):
    def resolve(
        self,
        hosts: Sequence[str] | None,
        host_group: str | None,
        ssh_block: str | None,
        ssh_config_path: str | None,
        connection_kwargs: Mapping[str, Any] | None,
    ) -> Resolved:
        """The settings by name made plain (arguments given win over them)."""
        ...

    def active(self) -> bool:
        """One of the orchestrator's runs is running in this context."""
        ...

    def worker_env(self) -> tuple[dict[str, str], list[int]]:
        """The workers' environment for the run, and ports of this machine they need."""
        ...

    def before_close(self, engine: Engine, log: logging.Logger) -> None:
        """The workers are about to stop: collect what they hold (logs, say)."""
        ...


@functools.cache
def _entry_points() -> tuple[metadata.EntryPoint, ...]:
    return tuple(metadata.entry_points(group=GROUP))


@functools.cache
def _load(name: str) -> Integration:
    (point,) = [p for p in _entry_points() if p.name == name]
    return point.load()()


def loaded() -> list[Integration]:
    """The integrations whose orchestrator is imported in this process."""
    return [_load(p.name) for p in _entry_points() if p.name in sys.modules]


def active() -> Integration | None:
    """The integration one of whose runs is running here, if any."""
    return next((i for i in loaded() if i.active()), None)


def resolve(
    hosts: Sequence[str] | None,
    host_group: str | None = None,
    ssh_block: str | None = None,
    ssh_config_path: str | None = None,
    connection_kwargs: Mapping[str, Any] | None = None,
) -> Resolved:
    """Hosts, ssh config, connection kwargs and option defaults, from the arguments or, for
    settings by name, from the integration that keeps them."""
    if host_group or ssh_block:
        points = _entry_points()
        if not points:
            raise ValueError(
                "host_group= and ssh_block= name settings an orchestrator keeps (Prefect "
                "blocks): none is installed; give hosts= and ssh_config_path= instead"
            )
        found = _load(points[0].name).resolve(
            hosts, host_group, ssh_block, ssh_config_path, connection_kwargs
        )
        hosts, ssh_config_path = found.hosts, found.ssh_config_path
        connection_kwargs, defaults = found.connection_kwargs, found.defaults
    else:
        defaults = {}
    if isinstance(hosts, str):
        raise ValueError(f"hosts must be a list of host names, not the string {hosts!r}")
    if not hosts:
        raise ValueError("give hosts=[...] (SSH aliases or names) or host_group='block name'")
    return Resolved(list(hosts), ssh_config_path, dict(connection_kwargs or {}), dict(defaults))
