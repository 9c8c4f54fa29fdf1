"""The end-to-end readiness check: every path a started cluster needs carries a task's data."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger(__name__)


def blocked_paths(
    client: Any,
    workers: Mapping[str, tuple[str, str]],
    timeout: float,
    scheduler_at: str,
    give_up: Callable[[], bool] | None = None,
) -> dict[str, str]:
    """Run a tiny task pinned to every worker (name -> (host, address)) and fetch its result
    here through the scheduler; then a ring of tasks makes each worker fetch the previous one's
    result (worker -> worker, across hosts). Returns path -> why, for each path that failed
    within ``timeout`` seconds — or sooner, once ``give_up()`` says a path is known to fail
    (checked every half second)."""
    from distributed import as_completed

    ours = list(workers.items())
    started = time.monotonic()
    first = {
        name: client.submit(
            socket.gethostname, workers=[address], allow_other_workers=False, pure=False
        )
        for name, (_, address) in ours
    }
    ring = {}
    if len(ours) > 1:
        for i, (name, _) in enumerate(ours):
            target, (_, address) = ours[(i + 1) % len(ours)]
            ring[(name, target)] = client.submit(
                len, first[name], workers=[address], allow_other_workers=False, pure=False
            )
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
                failed[f"scheduler on {scheduler_at} -> {where}"] = (
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
        len(ours),
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
