"""Host-key policy: which host keys a connection trusts (OpenSSH's known_hosts checking).

The known_hosts files (global ones read, never written) are loaded into each client; an unknown
key then meets the policy of ``StrictHostKeyChecking``: ``reject`` (yes/ask), ``auto-add`` (no:
trusted in memory) or ``accept-new`` (:class:`AcceptNewPolicy`: trusted and appended to the first
known_hosts file, hashed when HashKnownHosts). A changed key is always refused.
"""

from __future__ import annotations

import logging
import os
import threading

import paramiko

from lazycluster_tasks.ssh_settings import SSHSettings

logger = logging.getLogger(__name__)

_KNOWN_HOSTS_LOCK = threading.Lock()


class AcceptNewPolicy(paramiko.MissingHostKeyPolicy):
    """StrictHostKeyChecking accept-new: trust an UNKNOWN key and save it to the first
    known_hosts file (hashed when HashKnownHosts). A changed key never reaches a policy:
    paramiko raises BadHostKeyException for it."""

    def __init__(self, settings: SSHSettings) -> None:
        self.settings = settings

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        if not self.settings.known_hosts:
            logger.warning(
                "accepted the new host key of %s (no known_hosts file to save it to)", hostname
            )
            return
        path = self.settings.known_hosts[0]
        name = paramiko.HostKeys.hash_host(hostname) if self.settings.hash_known_hosts else hostname
        line = f"{name} {key.get_name()} {key.get_base64()}\n"
        with _KNOWN_HOSTS_LOCK:
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, mode=0o700, exist_ok=True)
            needs_newline = False
            if os.path.exists(path) and os.path.getsize(path) > 0:
                with open(path, "rb") as handle:
                    handle.seek(-1, os.SEEK_END)
                    needs_newline = handle.read(1) != b"\n"
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(("\n" if needs_newline else "") + line)
        logger.warning(
            "accepted the new host key of %s (%s %s) and saved it to %s",
            hostname,
            key.get_name(),
            key.fingerprint,
            path,
        )


def load_known_hosts(client: paramiko.SSHClient, settings: SSHSettings) -> None:
    """The keys of every known_hosts file of ``settings`` that exists, loaded into ``client``."""
    for path in (*settings.global_known_hosts, *settings.known_hosts):
        if os.path.isfile(path):
            client.load_host_keys(path)


def missing_host_key_policy(settings: SSHSettings) -> paramiko.MissingHostKeyPolicy:
    """What a client does with a host key that no known_hosts file has."""
    if settings.host_key_policy == "auto-add":
        return paramiko.AutoAddPolicy()
    if settings.host_key_policy == "accept-new":
        return AcceptNewPolicy(settings)
    return paramiko.RejectPolicy()
