"""The end-to-end readiness check: every path a started cluster needs carries a task's data."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger(__name__)


class PathCheck:
    """A tiny task pinned to every worker, whose result is fetched here through the scheduler;
    and a ring of tasks that makes each worker fetch the previous one's result (worker ->
    worker, across hosts). Workers are added one by one (as they register, where every path
    exists once a worker listens), the ring closed and the outcome waited for by
    :meth:`finish`."""

    def __init__(self, client: Any, scheduler_at: str) -> None:
        self.client = client
        self.scheduler_at = scheduler_at
        #: name -> (host, address), in the order added
        self.workers: dict[str, tuple[str, str]] = {}
        self._first: dict[str, Any] = {}
        self._ring: dict[tuple[str, str], Any] = {}  # (source, target): target fetches

    def add(self, name: str, host: str, address: str) -> None:
        """Send ``name`` its task, and the previous worker's result to fetch."""
        if name in self.workers:
            return
        previous = next(reversed(self.workers), None)  # the last one added
        self.workers[name] = (host, address)
        self._first[name] = self._submit(socket.gethostname, address)
        if previous is not None:
            self._ring[(previous, name)] = self._submit(len, address, self._first[previous])
        logger.debug("end-to-end check: tasks sent to %s on %s", name, host)

    def covers(self, workers: Mapping[str, tuple[str, str]]) -> bool:
        """Whether every worker added so far is one of ``workers``, at the same address (a
        worker started again elsewhere makes the tasks sent so far useless)."""
        return all(workers.get(name) == where for name, where in self.workers.items())

    def cancel(self) -> None:
        self.client.cancel([*self._first.values(), *self._ring.values()], force=True)

    def _submit(self, function: Any, address: str, *args: Any) -> Any:
        return self.client.submit(
            function, *args, workers=[address], allow_other_workers=False, pure=False
        )

    def finish(self, timeout: float, give_up: Callable[[], bool] | None = None) -> dict[str, str]:
        """Close the ring and wait: path -> why, for each path that failed within ``timeout``
        seconds — or sooner, once ``give_up()`` says a path is known to fail (checked every
        half second)."""
        from distributed import as_completed

        client, workers, first, ring = self.client, self.workers, self._first, self._ring
        names = list(workers)
        if len(names) > 1:  # the first fetches the last's result: every worker in the ring
            ring[(names[-1], names[0])] = self._submit(len, workers[names[0]][1], first[names[-1]])
        started = time.monotonic()
        futures = [*first.values(), *ring.values()]
        failed: dict[str, str] = {}
        try:
            deadline = started + timeout
            while (pending := [f for f in futures if f.status == "pending"]) and (
                time.monotonic() < deadline
            ):
                if give_up is not None and give_up():
                    deadline = time.monotonic()
                    break
                step = max(0.01, min(0.5, deadline - time.monotonic()))
                with contextlib.suppress(TimeoutError):
                    for _ in as_completed(pending, timeout=step, loop=client.loop):
                        pass
            waited = time.monotonic() - started
            done = [f for f in first.values() if f.status == "finished"]
            fetched = _fetched_at_once(client, done, max(1.0, deadline - time.monotonic()))
            for name, future in first.items():
                host, address = workers[name]
                where = f"{name} on {host} ({address})"
                if future.status != "finished":
                    failed[where] = f"ran no task within {waited:.0f} s ({future.status})"
                    continue
                if fetched:
                    continue
                left = max(1.0, deadline - time.monotonic())
                try:
                    future.result(timeout=left)
                except Exception as exc:
                    failed[f"scheduler on {self.scheduler_at} -> {where}"] = (
                        f"its result could not be fetched ({type(exc).__name__})"
                    )
            for (source, target), future in ring.items():
                if future.status != "finished" and first[source].status == "finished":
                    source_host, source_address = workers[source]
                    failed[
                        f"{target} on {workers[target][0]} -> {source} on {source_host} "
                        f"({source_address})"
                    ] = f"data not fetched within {waited:.0f} s"
        finally:
            client.cancel(futures, force=True)
        logger.info(
            "end-to-end check: %d workers reached from here and from each other in %.2f s",
            len(names),
            time.monotonic() - started,
        )
        return failed


def _fetched_at_once(client: Any, futures: list[Any], timeout: float) -> bool:
    """Whether every result reached this machine in one gather (one round trip, not one per
    worker); when not, each is fetched alone to name the paths that fail."""
    if not futures:
        return True
    try:
        client.sync(client._gather, futures, callback_timeout=timeout)
    except Exception as exc:
        logger.debug("results not fetched at once (%s): fetching each", type(exc).__name__)
        return False
    return True
