"""Watching a running cluster: a lost scheduler, worker or path becomes an error, never a hang.

:class:`ClusterWatch` checks a cluster's :class:`~lazycluster_tasks.engine.Engine` (or a
:class:`~lazycluster_tasks.dask.DaskCluster`'s) from a background thread every ``interval``
seconds. Fatal (the first one ends the watch and calls ``on_lost``): the scheduler is gone, or
has not answered for ``unanswered_limit`` seconds (a busy one answers late: on 2 shared cores a
scheduler can miss a 5 s question now and then); every worker is gone; a registered worker
cannot be reached from this machine (direct mode) or has sent no heartbeat for
``heartbeat_limit`` seconds (its path to the scheduler is cut); the optional deadline passed.
A worker that simply died is logged and left to Dask, which reschedules its work on the others.

A cluster that replaces lost workers itself (``LazySSHCluster``, ``heals=True``) is watched with
its own policy: a silent or unreachable worker is logged and left to the healing, and "every
worker is gone" becomes fatal only after ``all_lost_after`` seconds (its hosts are reported lost
by then).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from lazycluster_tasks.checks import check_seconds
from lazycluster_tasks.engine import Engine
from lazycluster_tasks.errors import LazyclusterError

if TYPE_CHECKING:
    from lazycluster_tasks.dask import DaskCluster

logger = logging.getLogger(__name__)

INTERVAL = 2.0
HEARTBEAT_LIMIT = 10.0
#: With healing: seconds without any worker before the cluster counts as lost.
ALL_LOST_AFTER = 120.0
CONNECT_TIMEOUT = 2.0
#: Seconds the scheduler may leave the checks unanswered before it counts as lost.
UNANSWERED_LIMIT = 20.0


class ClusterWatch:
    """Health checks of a running cluster in a background thread (``start``/``stop``, or use
    it as a context manager). ``failure`` holds the first fatal finding."""

    def __init__(
        self,
        cluster: Engine | DaskCluster,
        on_lost: Callable[[str], None] | None = None,
        interval: float = INTERVAL,
        heartbeat_limit: float = HEARTBEAT_LIMIT,
        deadline: float | None = None,
        heals: bool = False,
        all_lost_after: float = ALL_LOST_AFTER,
        unanswered_limit: float = UNANSWERED_LIMIT,
    ) -> None:
        check_seconds("interval", interval)
        check_seconds("heartbeat_limit", heartbeat_limit)
        self.cluster: Engine = cluster if isinstance(cluster, Engine) else cluster.engine
        self.on_lost = on_lost
        self.interval = interval
        self.heartbeat_limit = heartbeat_limit
        #: time.monotonic() after which the watched job counts as timed out (None: never)
        self.deadline = deadline
        self.failure: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beats: dict[str, tuple[float, float]] = {}  # worker -> (last_seen, seen here at)
        self._lost: set[str] = set()
        #: lost workers are replaced by the cluster (only the whole cluster's loss is fatal)
        self.heals = heals
        self.all_lost_after = all_lost_after
        self._none_since: float | None = None
        self.unanswered_limit = unanswered_limit
        self._unanswered_since: float | None = None  # first check the scheduler left unanswered
        self._left_to_healing: set[str] = set()

    def __enter__(self) -> ClusterWatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ClusterWatch:
        self._thread = threading.Thread(target=self._run, name="lct-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 10)
        self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                finding = self.check()
            except Exception as exc:  # a broken check must not kill the watch silently
                finding = f"the health check itself failed: {type(exc).__name__}: {exc}"
            if finding is None or self._stop.is_set():
                continue
            self.failure = finding
            logger.error("cluster %s lost: %s", self.cluster.cluster_id, finding)
            if self.on_lost is not None:
                try:
                    self.on_lost(finding)
                except Exception:
                    logger.exception("reacting to the loss of cluster %s failed", self.cluster)
            return

    def check(self) -> str | None:
        """One round of checks; the fatal finding, or None while the cluster is usable."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            return "the job ran past its timeout"
        cluster = self.cluster
        if not cluster.scheduler_ok():
            return cluster.failure or "the scheduler is gone"
        try:
            registered = cluster.registered()
        except (OSError, TimeoutError, LazyclusterError) as exc:
            now = time.monotonic()
            since = self._unanswered_since = self._unanswered_since or now
            if now - since >= self.unanswered_limit:
                return (
                    f"the scheduler at {cluster.scheduler_address} does not answer ({exc!r}; "
                    f"asked for {now - since:.0f} s)"
                )
            logger.warning(
                "the scheduler at %s does not answer (%r); asked again until %.0f s passed",
                cluster.scheduler_address,
                exc,
                self.unanswered_limit,
            )
            return None
        self._unanswered_since = None
        ours = cluster.worker_names()
        for name in ours:
            if name not in registered and name not in self._lost:
                self._lost.add(name)
                logger.warning("worker %s lost (Dask reschedules its work)", name)
        now = time.monotonic()
        if ours and not any(name in registered for name in ours):
            if not self.heals:
                return f"every worker is gone ({', '.join(ours)})"
            self._none_since = self._none_since or now
            if now - self._none_since > self.all_lost_after:
                return f"no worker for {now - self._none_since:.0f} s ({', '.join(ours)} lost)"
        else:
            self._none_since = None
        for name, info in registered.items():
            if name not in ours:
                continue
            finding = self._heartbeat(name, info, now) or self._reachable(name, info)
            if finding is None:
                continue
            if not self.heals:
                return finding
            if name not in self._left_to_healing:
                self._left_to_healing.add(name)
                logger.warning("%s; left to the cluster's healing", finding)
        return None

    def _heartbeat(self, name: str, info: dict[str, Any], now: float) -> str | None:
        """Stale heartbeats, measured on this machine's clock (hosts' clocks may differ)."""
        seen = float(info.get("last_seen") or 0.0)
        previous = self._beats.get(name)
        if previous is None or previous[0] != seen:
            self._beats[name] = (seen, now)
            return None
        silent = now - previous[1]
        if silent > self.heartbeat_limit:
            host = self.cluster.host_of(name)
            return f"worker {name} on {host} sent no heartbeat for {silent:.0f} s (path cut?)"
        return None

    def _reachable(self, name: str, info: dict[str, Any]) -> str | None:
        """Direct mode: this machine must reach the worker (tunnels have their own keeper)."""
        if self.cluster.routing.loopback:  # forwarded: reachable through this machine
            return None
        address = urlparse(str(info["address"]))
        if address.hostname is None or address.port is None:
            return None
        try:
            socket.create_connection((address.hostname, address.port), CONNECT_TIMEOUT).close()
        except OSError as exc:
            host = self.cluster.host_of(name)
            why = "no answer" if isinstance(exc, TimeoutError) else str(exc)
            return (
                f"this machine cannot reach worker {name} on {host} at "
                f"{address.hostname}:{address.port} ({why})"
            )
        return None
