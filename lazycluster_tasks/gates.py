"""Gates: who may use a port of this machine that a ``-R`` forward puts on a host.

A ``-R`` forward puts a service of this machine (a Prefect API on its loopback, say) at
127.0.0.1:<port> on every host, where every local user of the host can connect to it. A service
that does not authenticate its callers (the ephemeral API does not; it hands out the SSH block's
key) is then open to them all. The gate asks the host, before anything reaches the service, who
opened each forwarded connection — the owner of the connecting socket, read from the host's
``/proc/net/tcp`` — and lets it through only when that is the user the cluster logs in as (its
workers). What the kernel says cannot be forged by the caller, whatever protocol it speaks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

#: Seconds the host has to say who opened a connection.
ASK_TIMEOUT = 10.0
#: What the host prints: its login user's uid, then its IPv4 TCP sockets.
ASK = "id -u; cat /proc/net/tcp 2>/dev/null"


def socket_owner(listing: str, origin_port: int, port: int) -> int | None:
    """The uid of the socket 127.0.0.1:``origin_port`` connected to 127.0.0.1:``port``, from
    ``/proc/net/tcp``'s text (None when there is no such socket)."""
    local, remote = f"0100007F:{origin_port:04X}", f"0100007F:{port:04X}"
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) > 7 and fields[1].upper() == local and fields[2].upper() == remote:
            return int(fields[7]) if fields[7].isdigit() else None
    return None


class LoginUserGate:
    """Lets through the connections that a process of the host's login user opened (the
    cluster's workers); closes the others. ``run``: runs a command on the host, returns its
    output (the forward's own SSH connection)."""

    def __init__(self, run: Callable[[str, float], str]) -> None:
        self._run = run
        self._lock = threading.Lock()
        self._refused = 0

    def admits(self, origin_port: int, port: int) -> bool:
        """Whether the connection from 127.0.0.1:``origin_port`` to the forward's
        127.0.0.1:``port`` on the host is the login user's. Unknown (no ``/proc/net/tcp``
        there, no answer): not let through."""
        try:
            output = self._run(ASK, ASK_TIMEOUT)
        except Exception as exc:  # the caller's connection is closed: it may try again
            logger.info("who opened a connection to port %d not known: %s", port, exc)
            return False
        first, _, listing = output.partition("\n")
        owner = socket_owner(listing, origin_port, port)
        if first.strip().isdigit() and owner == int(first):
            return True
        with self._lock:
            self._refused += 1
            count = self._refused
        if owner is None:
            logger.warning("a connection to port %d refused: its owner is not known", port)
        elif count == 1 or count % 100 == 0:  # not a line per attempt of a local user
            logger.warning(
                "a connection to port %d from uid %d refused (the cluster's user only; %d so far)",
                port,
                owner,
                count,
            )
        return False
