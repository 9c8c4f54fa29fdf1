"""The controller's Dask clients of one cluster: its own (monitor) and those it hands out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

logger = logging.getLogger(__name__)

#: Seconds a question to the scheduler may take before it counts as unanswered.
IDENTITY_TIMEOUT = 5.0


class Clients:
    """Clients of the scheduler at ``address()``. The monitor client is the controller's own:
    it keeps an idle scheduler alive (``--idle-timeout``) while the controller lives."""

    def __init__(self, address: Callable[[], str | None], security: Any = None) -> None:
        from lazycluster_tasks import comm_patch  # imports distributed: only when used

        comm_patch.install()
        self._address = address
        self.security = security  # the cluster's distributed.Security (None: plain tcp)
        self._monitor: Any = None
        self._handed_out: list[Any] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        #: closed with the cluster (until its next scheduler comes up): a worker start still
        #: under way then connects no new client, which would only log its reconnects
        self._closed = False

    def _scheduler(self) -> str:
        if self._closed:
            raise ValueError("the cluster is closing: its clients are closed")
        address = self._address()
        if address is None:  # Client(None) would start a local cluster in this process
            raise ValueError("the scheduler is not running")
        return address

    def monitor(self) -> Any:
        """The controller's own client (connected on first use; do not close it)."""
        with self._lock:
            if self._monitor is None:
                from distributed import Client

                self._monitor = Client(
                    self._scheduler(), timeout=30, set_as_default=False, security=self.security
                )
            return self._monitor

    def close_scheduler(self, timeout: float = 5.0) -> bool:
        """Close every client, then ask the scheduler to close itself over a connection of its
        own (as SpecCluster's close does); True once it said so. The clients go first: a client
        whose scheduler closes under it tries to reconnect, waits 0.1 s for a goodbye that never
        comes and logs the cancelled attempt. Asked only while the monitor client is connected
        (a cut path is not waited for); bounded; a failure only means the stop that follows ends
        it instead."""
        reachable = self.connected
        address = self._address()
        self.close()
        if not reachable or address is None:
            return False
        outcome: list[BaseException | None] = []
        thread = threading.Thread(
            target=lambda: outcome.append(_run(_terminate(address, self.security, timeout))),
            name="lct-terminate",
            daemon=True,
        )
        thread.start()
        thread.join(timeout + 1)
        if not outcome or outcome[0] is not None:
            logger.info("the scheduler was not asked to close: %s", outcome or "no answer")
            return False
        return True

    @property
    def connected(self) -> bool:
        """Whether the monitor client is connected right now (a free health signal)."""
        client = self._monitor
        return client is not None and client.status == "running"

    def connect_in_background(self) -> None:
        """Connect the monitor client in a thread (while workers start)."""
        self._closed = False

        def connect() -> None:
            try:
                self.monitor()
            except Exception as exc:  # the next monitor() call raises it where it matters
                logger.debug("monitor client not connected yet: %s", exc)

        self._thread = threading.Thread(target=connect, name="lct-monitor", daemon=True)
        self._thread.start()

    def registered(self, timeout: float = IDENTITY_TIMEOUT) -> dict[str, dict[str, Any]]:
        """Workers the scheduler lists, by name (a bounded question, never the client's 30 s)."""
        client = self.monitor()
        info = client.sync(client.scheduler.identity, n_workers=-1, callback_timeout=timeout)
        return {str(w.get("name")): {**w, "address": a} for a, w in info["workers"].items()}

    def run(self, function: Any, *args: Any, workers: list[str] | None, timeout: float) -> Any:
        """``Client.run`` on ``workers`` (None: all), bounded: an error when they have not all
        answered within ``timeout`` seconds."""
        client = self.monitor()

        async def run() -> Any:
            return await client.run(function, *args, workers=workers)

        return client.sync(run, callback_timeout=timeout)

    def new(self, timeout: float) -> Any:
        """A new client for the caller (closed by :meth:`close`)."""
        from distributed import Client

        client = Client(
            self._scheduler(), timeout=timeout, set_as_default=False, security=self.security
        )
        self._handed_out.append(client)
        return client

    def close_monitor(self) -> None:
        """Close the controller's own client before its scheduler is stopped on purpose: left
        open, it would try to reconnect, log the refusal and hold a socket until collected.
        Clients handed out stay: their users see the scheduler go."""
        if self._thread is not None:  # still connecting: it sets the monitor
            self._thread.join()
            self._thread = None
        with self._lock:
            monitor, self._monitor = self._monitor, None
        if monitor is not None:
            _close(monitor)

    def close(self) -> None:
        """Close every client (the scheduler keeps running); none connects until the next
        :meth:`connect_in_background`."""
        self._closed = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:  # a monitor client being connected now is closed too
            clients = [*self._handed_out, self._monitor]
            self._handed_out, self._monitor = [], None
        for client in clients:
            if client is not None:
                _close(client)


async def _terminate(address: str, security: Any, timeout: float) -> None:
    """Ask the scheduler to close itself; return once it did. Its close ends by closing every
    comm, ours too, before any reply is sent (after its plugins' and preloads' close hooks):
    that closing, once the request was written, is its answer."""
    from distributed.comm import connect
    from distributed.comm.core import CommClosedError

    args = security.get_connection_args("client") if security is not None else {}
    comm = await connect(address, timeout=timeout, **args)
    try:
        await asyncio.wait_for(comm.write({"op": "terminate", "reply": True}), timeout)
        with contextlib.suppress(CommClosedError):
            await asyncio.wait_for(comm.read(), timeout)
    finally:
        comm.abort()


def _run(coroutine: Coroutine[Any, Any, None]) -> BaseException | None:
    """Run ``coroutine`` on a loop of this thread; what it raised, or None."""
    try:
        asyncio.run(coroutine)
    except BaseException as exc:  # reported by the caller
        return exc
    return None


def _close(client: Any) -> None:
    """Close ``client``, also when its connection to the scheduler failed with an error.

    distributed's ``close()`` awaits the task that read the scheduler's messages and raises
    what ended it (seen: a TLS reconnect failing with "IOStream is not idle"); the client then
    stays half open, its IO thread running, and its ``__del__`` tries again at some later
    moment. That task has ended and has nothing more to say: it is let go and the close runs
    once more."""
    for attempt in (1, 2):
        try:
            client.close(timeout=2)
            return
        except Exception as exc:
            logger.debug("closing a client failed (try %d): %s", attempt, exc)
            reader = getattr(client, "_handle_report_task", None)
            if reader is not None and reader.done():
                client._handle_report_task = None
    logger.warning("a Dask client did not close: %s", client)
