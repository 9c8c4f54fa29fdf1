"""The scheduler's preload (sent as its text): the scheduler closes once no client has been
connected for $LAZYCLUSTER_CLIENT_TIMEOUT seconds. The controller holds one client for the
cluster's lifetime, so a controller that died takes its scheduler with it; workers follow by
their death timeout. Until the controller's first client arrives the wait is at least
$LAZYCLUSTER_FIRST_CLIENT_GRACE seconds (30): a loaded controller may take longer than a short
idle timeout to connect, and a scheduler that closed before then failed the whole start.
Standard library only (it runs in the scheduler, which need not import lazycluster_tasks).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any


def dask_setup(scheduler: Any) -> None:
    limit = float(os.environ.get("LAZYCLUSTER_CLIENT_TIMEOUT", "60"))
    first = max(limit, float(os.environ.get("LAZYCLUSTER_FIRST_CLIENT_GRACE", "30")))

    async def watch() -> None:
        last, seen = time.monotonic(), False
        while scheduler.status.name not in ("closing", "closed"):
            await asyncio.sleep(0.5)
            if any(c != "fire-and-forget" for c in scheduler.clients):
                last, seen = time.monotonic(), True
            elif time.monotonic() - last > (limit if seen else first):
                await scheduler.close(reason="lazycluster: no client connected")
                return

    scheduler._lazycluster_watch = asyncio.ensure_future(watch())
