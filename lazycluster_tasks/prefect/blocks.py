"""Prefect blocks for SSH settings and host groups, usable as flow parameters by block name.

Secrets are ``SecretStr``: hidden in ``repr``/``str``/``model_dump`` and in validation errors,
stored encrypted by the Prefect API, revealed only by ``SSHSettingsBlock.connection_kwargs()``.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect.blocks.core import Block
from pydantic import (
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lazycluster_tasks.deprecation import renamed
from lazycluster_tasks.network import NetworkMode

__all__ = ["DOCUMENTATION_URL", "LOGO_URL", "HostGroupBlock", "SSHSettingsBlock"]

#: The project's home (also ``[project.urls]`` in pyproject.toml; a test keeps them equal).
PROJECT_URL = "https://github.com/lazycluster-tasks/lazycluster-tasks"
DOCUMENTATION_URL = f"{PROJECT_URL}#readme"
#: ``docs/logo.png`` of the repository: square, 256 px.
LOGO_URL = f"{PROJECT_URL}/raw/main/docs/logo.png"


class SSHSettingsBlock(Block):
    """How to reach SSH hosts: user, key or password, known_hosts policy, jump host."""

    _block_type_name = "Lazycluster SSH Settings"
    _block_type_slug = "lazycluster-ssh-settings"
    _description = "SSH credentials and connection options for lazycluster_tasks hosts."
    _documentation_url = DOCUMENTATION_URL  # type: ignore[assignment]
    _logo_url = LOGO_URL  # type: ignore[assignment]

    # Never echo inputs (possibly secrets) in validation errors.
    model_config = ConfigDict(hide_input_in_errors=True)

    user: str | None = Field(default=None, description="Login user (default: from ssh config).")
    private_key: SecretStr | None = Field(default=None, description="Private key text.")
    private_key_path: str | None = Field(default=None, description="Path to a private key file.")
    password: SecretStr | None = Field(default=None, description="Login password.")
    key_passphrase: SecretStr | None = Field(default=None, description="Private key passphrase.")
    known_hosts_policy: Literal["reject", "auto-add"] = Field(
        default="reject", description="What to do with hosts missing from known_hosts."
    )
    known_hosts_path: str | None = Field(default=None, description="known_hosts file to use.")
    ssh_config_path: str | None = Field(default=None, description="OpenSSH config file to read.")
    jump_host: str | None = Field(
        default=None, description="ProxyJump spec, e.g. 'user@bastion:22'."
    )
    connect_timeout: float | None = Field(default=None, gt=0, description="Seconds to connect.")

    def connection_kwargs(self) -> dict[str, Any]:
        """The library's ``connection_kwargs`` for the fields that are set (secrets in plain)."""
        values: dict[str, Any] = {
            "username": self.user,
            "private_key": _plain(self.private_key),
            "key_filename": self.private_key_path,
            "password": _plain(self.password),
            "passphrase": _plain(self.key_passphrase),
            # Always set: the block's default "reject" overrides StrictHostKeyChecking.
            "host_key_policy": self.known_hosts_policy,
            "known_hosts": self.known_hosts_path,
            "proxy_jump": self.jump_host,
            "connect_timeout": self.connect_timeout,
        }
        return {key: value for key, value in values.items() if value is not None}


class HostGroupBlock(Block):
    """A named set of hosts to run a Dask cluster on, with optional SSH settings."""

    _block_type_name = "Lazycluster Host Group"
    _block_type_slug = "lazycluster-host-group"
    _description = "Hosts (SSH aliases) and worker options for a lazycluster_tasks Dask cluster."
    _documentation_url = DOCUMENTATION_URL  # type: ignore[assignment]
    _logo_url = LOGO_URL  # type: ignore[assignment]

    model_config = ConfigDict(hide_input_in_errors=True)

    hosts: list[str] = Field(description="SSH host aliases or names, one per entry.")
    python: str | dict[str, str] | None = Field(
        default=None, description="Remote Python, for all hosts or per host name."
    )
    workers_per_host: int | dict[str, int] = Field(
        default=1,
        description=(
            "Dask workers on each host: one count for every host, or host -> count "
            '(e.g. {"gpu1": 4, "cpu1": 1}; hosts not named get 1).'
        ),
    )
    network_mode: NetworkMode = Field(
        default="auto", description="How workers reach the scheduler."
    )
    host_links: bool = Field(
        default=True,
        description=(
            "Tunnelled mode: let a key per host into the other hosts' ~/.ssh/authorized_keys "
            "(only their cluster ports, from that host, expiring; removed after) so worker "
            "traffic takes host-to-host SSH links; off: it all goes through this machine."
        ),
    )
    ssh: SSHSettingsBlock | None = Field(default=None, description="SSH settings for all hosts.")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        """``python_executable`` (a document saved before the rename too) is ``python``."""
        if isinstance(data, dict) and "python_executable" in data:
            data = dict(data)
            renamed(data, "python_executable", "python", stacklevel=4)
        return data

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, hosts: list[str]) -> list[str]:
        if not hosts:
            raise ValueError("hosts must list at least one host")
        for host in hosts:
            if not host or any(c.isspace() for c in host):
                raise ValueError(f"invalid host entry {host!r}: must be non-empty, no whitespace")
        return hosts

    @field_validator("workers_per_host")
    @classmethod
    def _check_workers_per_host(
        cls, counts: int | dict[str, int], info: ValidationInfo
    ) -> int | dict[str, int]:
        if not isinstance(counts, dict):
            if counts < 1:
                raise ValueError(f"workers_per_host must be >= 1, not {counts}")
            return counts
        hosts = info.data.get("hosts")  # absent when the hosts were refused already
        for host, count in counts.items():
            if hosts is not None and host not in hosts:
                raise ValueError(
                    f"workers_per_host names host {host!r}, which is not one of the hosts "
                    f"({', '.join(hosts)})"
                )
            if count < 1:
                raise ValueError(f"workers_per_host[{host!r}] must be >= 1, not {count}")
        return counts

    def cluster_options(self) -> dict[str, Any]:
        """Options for the cluster: workers per host (a count, or host -> count, as given),
        network mode, host links, python if set."""
        options: dict[str, Any] = {
            "workers_per_host": self.workers_per_host,
            "network_mode": self.network_mode,
            "host_links": self.host_links,
            "python": self.python,
        }
        return {key: value for key, value in options.items() if value is not None}

    def task_runner(self, **kwargs: Any) -> Any:
        """A ``prefect_dask.DaskTaskRunner`` that starts a LazySSHCluster on this group for
        the flow run and closes it after (prefect#12980: a task runner kept as a block).
        ``kwargs`` go to the cluster (``n_workers``, ``threads_per_worker``, ...) except
        ``adapt_kwargs`` and ``client_kwargs``, which go to the runner. A saved group is passed
        by name (its SSH secrets are read in the run's process); an unsaved one by value."""
        from prefect_dask import DaskTaskRunner

        adapt = kwargs.pop("adapt_kwargs", None)
        client = kwargs.pop("client_kwargs", None)
        name = getattr(self, "_block_document_name", None)
        if name:
            cluster: dict[str, Any] = {"host_group": name}
        else:
            cluster = {"hosts": list(self.hosts), **self.cluster_options()}
            if self.ssh is not None:
                cluster["connection_kwargs"] = self.ssh.connection_kwargs()
                if self.ssh.ssh_config_path:
                    cluster["ssh_config_path"] = self.ssh.ssh_config_path
        return DaskTaskRunner(
            cluster_class="lazycluster_tasks.LazySSHCluster",
            cluster_kwargs={**cluster, **kwargs},
            adapt_kwargs=adapt,
            client_kwargs=client,
        )


def _plain(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret is not None else None
