"""The ``-o`` options both of our OpenSSH clients pass: the controller's masters
(``ssh_master``) and the host-to-host links (``link_commands``). Plain values, no I/O."""

from __future__ import annotations

#: Ciphers offered, fastest first where the CPU has AES instructions.
CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr"
#: Key exchanges left out of the client's defaults: sntrup761's key generation costs the
#: dialling ssh about 0.1 CPU-second a connection (curve25519: 0.02), and 120 links at 16 hosts
#: at once held every core for seconds. Where the client has the cheap post-quantum
#: mlkem768x25519 (OpenSSH 9.9+), it stays first; unknown names here are no error.
KEX_LEFT_OUT = "-sntrup761x25519-sha512*"
#: ServerAliveInterval, ServerAliveCountMax: a host silent for 15 s ends the connection.
ALIVE = (5, 3)


def host_key_algorithms(key_type: str) -> str:
    """What ``HostKeyAlgorithms`` must name for a host key of ``key_type`` to be offered."""
    return "rsa-sha2-512,rsa-sha2-256" if key_type == "ssh-rsa" else key_type


def common(key_type: str) -> dict[str, str]:
    """The options above as ``-o`` pairs, for a host whose key is of ``key_type``."""
    return {
        "HostKeyAlgorithms": host_key_algorithms(key_type),
        "ServerAliveInterval": str(ALIVE[0]),
        "ServerAliveCountMax": str(ALIVE[1]),
        "Ciphers": CIPHERS,
        "KexAlgorithms": KEX_LEFT_OUT,
        "Compression": "no",
    }
