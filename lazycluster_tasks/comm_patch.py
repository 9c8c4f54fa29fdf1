"""The one Dask patch we carry: a connect whose caller gave up closes what it made later.

distributed's TCP and TLS connectors await tornado's connect and then its TLS handshake. Tornado
closes a handshake cancelled while under way; but when the handshake completes in the same
event-loop iteration as the caller gives up (a ``wait_for`` timeout, a client's
``callback_timeout``: a health question to a scheduler that answers late), the cancellation
reaches a coroutine whose future is already done, and the new stream, known to nobody, keeps its
socket for as long as the peer lives. Here the connect runs as a task of its own: the caller
still gets its cancellation at once, and a connection completed afterwards is closed. The note
to file upstream: ``docs/upstream/distributed-connect-cancelled-after-handshake.md``.

:func:`install` puts these connectors in place of distributed's own ``tcp`` and ``tls`` backends
in this process (the controller), and leaves any other backend a user registered alone.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from distributed.comm import registry
from distributed.comm.tcp import TCPBackend, TCPConnector, TLSBackend, TLSConnector

logger = logging.getLogger(__name__)


def _close_late(task: asyncio.Future[Any]) -> None:
    """Close the connection a given-up connect made after all (a failed one closed itself)."""
    if task.cancelled() or task.exception() is not None:
        return
    logger.debug("closing a connection whose caller gave up: %s", task.result())
    task.result().abort()


async def _connect_owned(connect: Any, address: str, deserialize: bool, **args: Any) -> Any:
    task = asyncio.ensure_future(connect(address, deserialize, **args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_close_late)
        raise


class OwnedTCPConnector(TCPConnector):
    """distributed's ``tcp://`` connector; a connection its caller gave up on is closed."""

    async def connect(self, address: str, deserialize: bool = True, **connection_args: Any) -> Any:
        return await _connect_owned(super().connect, address, deserialize, **connection_args)


class OwnedTLSConnector(TLSConnector):
    """distributed's ``tls://`` connector; a connection its caller gave up on is closed."""

    async def connect(self, address: str, deserialize: bool = True, **connection_args: Any) -> Any:
        return await _connect_owned(super().connect, address, deserialize, **connection_args)


class OwnedTCPBackend(TCPBackend):
    _connector_class = OwnedTCPConnector


class OwnedTLSBackend(TLSBackend):
    _connector_class = OwnedTLSConnector


def install() -> None:
    """Use the connectors above for ``tcp`` and ``tls`` in this process (idempotent)."""
    for scheme, stock, owned in (
        ("tcp", TCPBackend, OwnedTCPBackend),
        ("tls", TLSBackend, OwnedTLSBackend),
    ):
        current = registry.backends.get(scheme)
        if type(current) is stock:
            registry.backends[scheme] = owned()
