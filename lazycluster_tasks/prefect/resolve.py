"""The one place Prefect blocks become plain data: hosts, ssh config, connection kwargs and a
host group's cluster options, for the cluster (through the integration), the tasks,
``dask_cluster()`` and the CLI alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lazycluster_tasks.integrations import Resolved
from lazycluster_tasks.prefect.blocks import HostGroupBlock, SSHSettingsBlock
from lazycluster_tasks.prefect.records import load_block


def pick_ssh(ssh: SSHSettingsBlock | None, group: HostGroupBlock | None) -> SSHSettingsBlock | None:
    """The rule: an SSH settings block named directly, else the host group's own."""
    if ssh is not None:
        return ssh
    return group.ssh if group is not None else None


def ssh_settings(ssh_block: str | None, host_group: str | None = None) -> SSHSettingsBlock | None:
    """The SSH settings block to use (see :func:`pick_ssh`), loading only the one needed."""
    if ssh_block:
        return pick_ssh(load_block(SSHSettingsBlock, ssh_block), None)
    return pick_ssh(None, load_block(HostGroupBlock, host_group) if host_group else None)


def connection_kwargs(ssh_block: str | None, host_group: str | None = None) -> dict[str, Any]:
    """Secrets and SSH options from the named blocks (never logged, never recorded)."""
    block = ssh_settings(ssh_block, host_group)
    return block.connection_kwargs() if block else {}


def resolve_blocks(
    hosts: Sequence[str] | None,
    host_group: str | None = None,
    ssh_block: str | None = None,
    ssh_config_path: str | None = None,
    connection_kwargs: Mapping[str, Any] | None = None,
) -> Resolved:
    """The host group's hosts (unless ``hosts`` are given) and its cluster options as
    defaults; the SSH settings' connection kwargs (under those given) and ssh config (unless
    one is given), from ``ssh_block`` or else the group's."""
    kwargs = dict(connection_kwargs or {})
    defaults: dict[str, Any] = {}
    if host_group:
        group = load_block(HostGroupBlock, host_group)
        hosts = list(hosts or group.hosts)
        defaults = group.cluster_options()
    settings = ssh_settings(ssh_block, host_group)
    if settings is not None:
        kwargs = {**settings.connection_kwargs(), **kwargs}
        if ssh_config_path is None:
            ssh_config_path = settings.ssh_config_path
    return Resolved(list(hosts or []), ssh_config_path, kwargs, defaults)
