"""The carried Dask patch: a connect its caller gave up on closes what it made later."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from typing import Any

import psutil
import pytest
from distributed.comm import registry
from distributed.comm.tcp import TCPBackend, TLSBackend

from lazycluster_tasks import comm_patch
from lazycluster_tasks.security import ClusterTLS


def _serve_one(
    listener: socket.socket, context: ssl.SSLContext, hello: threading.Event, seen: list[str]
) -> None:
    """Accept one TLS client, say when its first handshake bytes arrived, then report whether
    the client closed the connection after the handshake (within 5 s)."""
    raw, _ = listener.accept()
    with raw:
        raw.settimeout(5)
        try:
            raw.recv(1, socket.MSG_PEEK)
            hello.set()
            with context.wrap_socket(raw, server_side=True) as tls:
                seen.append("closed" if tls.recv(1) == b"" else "data")
        except TimeoutError:
            seen.append("left open")
        except (OSError, ssl.SSLError) as exc:
            seen.append(f"failed ({type(exc).__name__}: {exc})")


async def _cancel_as_the_handshake_completes(
    address: str, args: dict[str, Any], hello: threading.Event, seen: list[str]
) -> None:
    """Cancel a connect in the very loop iteration in which its TLS handshake completes: the
    handshake's future is already done when the cancellation reaches the coroutine awaiting it
    (how a ``wait_for`` timeout and a late answer meet on a busy controller)."""
    loop = asyncio.get_running_loop()
    connector = registry.get_backend("tls").get_connector()
    task = asyncio.ensure_future(connector.connect(address, **args))

    def hold_the_loop() -> None:
        if not hello.is_set():
            loop.call_soon(hold_the_loop)
            return
        time.sleep(0.5)  # the server's reply arrives meanwhile: the next iteration reads it
        loop.call_later(0, task.cancel)  # runs after that read, in the same iteration

    loop.call_soon(hold_the_loop)
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):  # the loop keeps running (as a controller's does) until the answer
        if seen:
            return
        await asyncio.sleep(0.05)


def test_a_connect_cancelled_as_its_tls_handshake_completes_is_closed() -> None:
    comm_patch.install()
    security = ClusterTLS.generate().security()
    server_context = security.get_listen_args("scheduler")["ssl_context"]
    listener = socket.create_server(("127.0.0.1", 0))
    hello, seen = threading.Event(), []
    server = threading.Thread(
        target=_serve_one, args=(listener, server_context, hello, seen), daemon=True
    )
    server.start()
    fds = psutil.Process().num_fds()
    try:
        address = f"tls://127.0.0.1:{listener.getsockname()[1]}"
        args = security.get_connection_args("client")
        asyncio.run(_cancel_as_the_handshake_completes(address, args, hello, seen))
        server.join(15)
    finally:
        listener.close()
    # without the patch the stream the handshake made stays open: the server's recv times out
    assert seen == ["closed"]
    assert psutil.Process().num_fds() <= fds - 1  # the listener is gone and nothing else came


def test_install_replaces_only_distributeds_own_backends_and_is_idempotent() -> None:
    custom = TCPBackend()
    saved = dict(registry.backends)
    try:
        registry.backends["tcp"] = type("Custom", (TCPBackend,), {})()
        registry.backends["tls"] = TLSBackend()
        comm_patch.install()
        comm_patch.install()
        assert type(registry.backends["tcp"]).__name__ == "Custom"  # a user's own stays
        assert isinstance(registry.backends["tls"], comm_patch.OwnedTLSBackend)
        registry.backends["tcp"] = custom
        comm_patch.install()
        assert isinstance(registry.backends["tcp"], comm_patch.OwnedTCPBackend)
    finally:
        registry.backends.clear()
        registry.backends.update(saved)
