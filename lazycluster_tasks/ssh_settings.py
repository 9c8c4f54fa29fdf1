"""Settings resolution: an alias and its ``connection_kwargs`` -> :class:`SSHSettings`.

paramiko does not read ``~/.ssh/config`` by itself; :func:`resolve_settings` does, through
:mod:`lazycluster_tasks.sshconfig` (Include, ``Host *``, multi-pattern Host lines, Match: OpenSSH's
``ssh -G``), and ``connection_kwargs`` override what it finds. :func:`jump_settings` resolves
each hop of a ProxyJump the same way.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from lazycluster_tasks import sshconfig

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
DEFAULT_CONNECT_TIMEOUT = 10.0
HOST_KEY_POLICIES = ("reject", "auto-add", "accept-new")

#: connection_kwargs we understand; anything else is a mistake worth naming.
CONNECTION_KWARGS = frozenset(
    {
        "hostname",
        "port",
        "username",
        "user",
        "key_filename",
        "password",
        "passphrase",
        "private_key",
        "connect_timeout",
        "timeout",
        "known_hosts",
        "host_key_policy",
        "proxy_jump",
        "allow_agent",
        "look_for_keys",
    }
)


@dataclass(frozen=True)
class SSHSettings:
    """Everything needed to open a connection to one host.

    ``host_key_policy``: ``reject`` (StrictHostKeyChecking yes/ask), ``auto-add`` (no: trust
    in memory), ``accept-new`` (trust an unknown key and append it to the first known_hosts
    file, as OpenSSH does; a changed key is still refused).
    """

    alias: str
    hostname: str
    port: int = 22
    username: str | None = None
    key_filenames: tuple[str, ...] = ()
    password: str | None = field(default=None, repr=False)
    passphrase: str | None = field(default=None, repr=False)
    private_key: str | None = field(default=None, repr=False)  # key text (e.g. from a Block)
    proxy_jump: str | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    known_hosts: tuple[str, ...] = ()
    host_key_policy: str = "reject"
    allow_agent: bool = True
    look_for_keys: bool = True
    ssh_config_path: str | None = None
    proxy_command: str | None = None  # with its %-tokens; expanded when connecting
    certificate_files: tuple[str, ...] = ()
    global_known_hosts: tuple[str, ...] = ()  # read, never written
    hash_known_hosts: bool = False

    @property
    def destination(self) -> str:
        """``user@hostname:port`` (plus the route through jump hosts or a proxy command):
        two settings with the same destination reach the same sshd."""
        user = self.username or sshconfig._local_user()
        where = f"{user}@{self.hostname.lower()}:{self.port}"
        route = self.proxy_jump or self.proxy_command
        return f"{where} via {route}" if route else where


def resolve_settings(
    alias: str,
    ssh_config_path: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SSHSettings:
    """Resolve ``alias`` through the OpenSSH config (:mod:`lazycluster_tasks.sshconfig`:
    Include, ``Host *``, multi-pattern Host lines, Match), then apply ``connection_kwargs``."""
    if not isinstance(alias, str) or not alias.strip() or any(c.isspace() for c in alias):
        raise ValueError(f"invalid host name: {alias!r}")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - CONNECTION_KWARGS)
    if unknown:
        raise ValueError(
            f"unknown connection_kwargs for {alias!r}: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(CONNECTION_KWARGS))})"
        )
    options = sshconfig.resolve(alias, ssh_config_path)

    def first(key: str, default: str | None = None) -> str | None:
        values = options.get(key)
        return values[0] if values else default

    hostname = first("hostname", alias) or alias
    port = int(first("port", "22") or 22)
    username = first("user")

    def expand(path: str) -> str:
        return sshconfig.expand_tokens(
            path, hostname=hostname, port=port, username=username, alias=alias
        )

    identities = options.get("identityfile", [])
    if set(identities) <= sshconfig.OPENSSH_DEFAULT_IDENTITIES:
        identities = []  # ssh -G lists its defaults; look_for_keys covers them
    known = [p for v in options.get("userknownhostsfile", [DEFAULT_KNOWN_HOSTS]) for p in v.split()]
    global_known = [p for v in options.get("globalknownhostsfile", []) for p in v.split()]
    strict = (first("stricthostkeychecking", "yes") or "yes").lower()
    identities_only = (first("identitiesonly", "no") or "no").lower() in ("yes", "true")
    timeout = first("connecttimeout", "none") or "none"
    settings = SSHSettings(
        alias=alias,
        hostname=hostname,
        port=port,
        username=username,
        key_filenames=tuple(expand(k) for k in identities),
        proxy_jump=_none(first("proxyjump")),
        proxy_command=_none(first("proxycommand")),
        connect_timeout=DEFAULT_CONNECT_TIMEOUT if timeout == "none" else float(timeout),
        known_hosts=tuple(_home_path(p) for p in known),
        global_known_hosts=tuple(_home_path(p) for p in global_known),
        host_key_policy=_host_key_policy(strict),
        hash_known_hosts=(first("hashknownhosts", "no") or "no").lower() in ("yes", "true"),
        certificate_files=tuple(expand(c) for c in options.get("certificatefile", [])),
        allow_agent=not identities_only,
        look_for_keys=not identities_only,
        ssh_config_path=ssh_config_path,
    )
    return _apply_overrides(settings, overrides)


def _none(value: str | None) -> str | None:
    return None if value is None or value.lower() == "none" else value


def _host_key_policy(strict: str) -> str:
    if strict == "accept-new":
        return "accept-new"
    return "auto-add" if strict in ("no", "off", "false") else "reject"  # yes, true, ask


def _home_path(path: str) -> str:
    """``~`` as $HOME. ssh -G expands ``~`` with the passwd home; follow $HOME instead."""
    path = os.path.expanduser(path)
    try:
        passwd_home = pwd.getpwuid(os.getuid()).pw_dir.rstrip("/")
    except KeyError:
        return path
    home = os.path.expanduser("~").rstrip("/")
    if passwd_home and home != passwd_home and path.startswith(passwd_home + "/"):
        return home + path[len(passwd_home) :]
    return path


def _apply_overrides(settings: SSHSettings, kw: dict[str, Any]) -> SSHSettings:
    changes: dict[str, Any] = {}
    for key in (
        "hostname",
        "password",
        "passphrase",
        "private_key",
        "proxy_jump",
        "allow_agent",
        "look_for_keys",
    ):
        if key in kw:
            changes[key] = kw[key]
    if "port" in kw:
        changes["port"] = int(kw["port"])
    if "username" in kw or "user" in kw:
        changes["username"] = kw.get("username", kw.get("user"))
    if "private_key" in kw and "key_filename" not in kw:
        changes["key_filenames"] = ()  # an explicit key replaces the config's IdentityFile
    if "key_filename" in kw:
        keys = kw["key_filename"]
        keys = [keys] if isinstance(keys, (str, os.PathLike)) else list(keys)
        changes["key_filenames"] = tuple(os.path.expanduser(str(k)) for k in keys)
    if "connect_timeout" in kw or "timeout" in kw:
        changes["connect_timeout"] = float(kw.get("connect_timeout", kw.get("timeout", 0)))
    if "known_hosts" in kw:
        files = kw["known_hosts"]
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        changes["known_hosts"] = tuple(os.path.expanduser(str(f)) for f in files)
    if "host_key_policy" in kw:
        policy = kw["host_key_policy"]
        if policy not in HOST_KEY_POLICIES:
            raise ValueError(f"host_key_policy must be one of {HOST_KEY_POLICIES}, not {policy!r}")
        changes["host_key_policy"] = policy
    if changes.get("port", settings.port) <= 0 or changes.get("port", settings.port) > 65535:
        raise ValueError(f"invalid port for {settings.alias!r}: {changes.get('port')}")
    return replace(settings, **changes)


def _parse_jump(spec: str) -> tuple[str, str | None, int | None]:
    """``[user@]host[:port]`` -> (host, user, port)."""
    user = None
    if "@" in spec:
        user, spec = spec.rsplit("@", 1)
    port = None
    if spec.startswith("["):  # [ipv6]:port
        host, _, rest = spec[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else None
    elif spec.count(":") == 1:
        host, port_text = spec.split(":")
        port = int(port_text)
    else:
        host = spec
    return host, user, port


def jump_settings(settings: SSHSettings) -> list[SSHSettings]:
    """The chain of jump hosts (first hop first) for ``settings.proxy_jump``."""
    if not settings.proxy_jump:
        return []
    hops = []
    for spec in settings.proxy_jump.split(","):
        host, user, port = _parse_jump(spec.strip())
        hop = resolve_settings(host, settings.ssh_config_path)
        overrides: dict[str, Any] = {}
        if user:
            overrides["username"] = user
        if port:
            overrides["port"] = port
        hops.append(replace(_apply_overrides(hop, overrides), proxy_jump=None))
    return hops
