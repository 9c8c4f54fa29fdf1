"""Settings from the environment, in one model: every variable starts with ``LAZYCLUSTER_``.

- ``LAZYCLUSTER_MAIN_DIR``: execution logs (lazycluster's ``Environment``); ``~/.lazycluster``
- ``LAZYCLUSTER_SSH_CONFIG``: the ssh config when none is given, for the CLI and the Python API
  alike (``~/.ssh/config``)
- ``LAZYCLUSTER_SSH_CONFIG_RESOLVER``: ``openssh`` (``ssh -G``) or ``paramiko``; default:
  openssh when an ``ssh`` binary is installed
- ``LAZYCLUSTER_STATE_DIR``: records of clusters the CLI started; ``<main dir>/clusters``
- ``LAZYCLUSTER_PORTS``: the ports a cluster uses when it is given none, ``first-last``
  (default 60001-60199; e.g. what a site's firewall opens, or one range per user)
- ``LAZYCLUSTER_DASHBOARD``: start the scheduler's dashboard unless a cluster says otherwise
  (``true``; ``false`` saves bokeh's import, about 1 s of CPU, at every start)
- ``LAZYCLUSTER_CACHE_DIR``: what this machine keeps between runs (the packed parts of the
  environments it sends to hosts); ``$XDG_CACHE_HOME/lazycluster`` (``~/.cache/lazycluster``)

Read when asked (:func:`settings`), so a changed environment is seen by the next call. The
variables the cluster's own processes read on the hosts (``LAZYCLUSTER_CLIENT_TIMEOUT``) are set
by us for them, not settings.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LAZYCLUSTER_", extra="ignore")

    main_dir: str = "~/.lazycluster"
    ssh_config: str | None = None
    ssh_config_resolver: Literal["openssh", "paramiko"] | None = None
    state_dir: str | None = None
    dashboard: bool = True
    ports: str | None = None
    cache_dir: str | None = None
    #: a tunnelled cluster's forwards on an OpenSSH master per host (see ssh_master.py);
    #: off: paramiko carries them all
    openssh_forwards: bool = True

    @field_validator("ports")
    @classmethod
    def _port_range(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        first, sep, last = value.strip().partition("-")
        if not (sep and first.isdigit() and last.isdigit()):
            raise ValueError(f"must be first-last, e.g. 60001-60199, not {value!r}")
        if not 1 <= int(first) <= int(last) <= 65535:
            raise ValueError(f"must be a range within 1-65535, not {value!r}")
        return f"{int(first)}-{int(last)}"

    def port_list(self, default: range) -> list[int]:
        """The ports of ``LAZYCLUSTER_PORTS`` (inclusive), else ``default``."""
        if self.ports is None:
            return list(default)
        first, last = map(int, self.ports.split("-"))
        return list(range(first, last + 1))

    @field_validator("ssh_config_resolver", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            return value or None
        return value

    @property
    def main_directory(self) -> str:
        return os.path.abspath(os.path.expanduser(self.main_dir))

    @property
    def cache_directory(self) -> str:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        folder = self.cache_dir or os.path.join(base, "lazycluster")
        return os.path.abspath(os.path.expanduser(folder))

    @property
    def state_directory(self) -> str:
        folder = self.state_dir or os.path.join(self.main_directory, "clusters")
        return os.path.abspath(os.path.expanduser(folder))


def settings() -> Settings:
    """The settings as the environment has them now (a bad value raises, naming it)."""
    return Settings()
