"""Healing: a policy object beside the cluster, as distributed's ``Adaptive`` sits beside a
``SpecCluster``. Every second it compares the scheduler's workers with the cluster's spec; a
worker whose process exited, whose host stopped answering, or that stayed silent, is replaced —
on its own host once that answers again, or at once on another host with room — with a log line
and an event for each step. Hosts that do not answer are kept in :class:`HostAvailability`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

from distributed.core import Status

logger = logging.getLogger(__name__)

#: Seconds between two checks of the workers.
HEAL_INTERVAL = 1.0
#: A missing worker whose process group still runs may be restarting under its nanny.
RESTART_GRACE = 20.0
#: Seconds a host may take to answer a liveness question before it counts as unreachable.
REACH_TIMEOUT = 5.0


class HostAvailability:
    """Which hosts do not answer (since when), which were reported lost for good, and the
    workers to stop on each once it answers again."""

    def __init__(self) -> None:
        self.down: dict[str, float] = {}
        self.reported: set[str] = set()
        self.stale: dict[str, list[str]] = {}

    def mark_down(self, host: str, why: str) -> None:
        if host not in self.down:
            self.down[host] = time.monotonic()
            logger.warning(
                "host %s does not answer (%s); its workers go elsewhere or wait", host, why
            )

    def leave_for_later(self, host: str, name: str) -> None:
        """``name`` could not be stopped on ``host``: stopped once the host answers."""
        self.down.setdefault(host, time.monotonic())
        self.stale.setdefault(host, []).append(name)


class Healable(Protocol):
    """What the healer needs of its cluster (a LazySSHCluster)."""

    worker_spec: dict[str, Any]
    workers: dict[str, Any]
    status: Status
    scheduler_comm: Any
    engine: Any
    launcher: Any

    def _place(self, specs: Any, prefer: str | None = None) -> str | None: ...

    def _spec_on(self, host: str | None) -> dict[str, Any]: ...

    async def _correct_state(self) -> None: ...

    def _event(self, what: str, **details: Any) -> None: ...


class Healer:
    """Replaces the lost workers of ``cluster`` (see the module's docstring)."""

    def __init__(
        self,
        cluster: Healable,
        hosts: HostAvailability,
        worker_ttl: float,
        host_lost_after: float,
        interval: float = HEAL_INTERVAL,
    ) -> None:
        self.cluster = cluster
        self.hosts = hosts
        self.worker_ttl = worker_ttl
        self.host_lost_after = host_lost_after
        self.interval = interval
        #: set when the cluster closes: ends the checks even when a cancellation is lost
        #: (asyncio.wait_for in Python 3.11 can swallow one arriving as its future completes)
        self.stopping = False
        self._task: asyncio.Task[None] | None = None
        self._seen: set[str] = set()
        self._missing: dict[str, float] = {}
        self._beats: dict[str, tuple[Any, float]] = {}  # name -> (scheduler's last_seen, when)
        self._lost_at: dict[str, float] = {}  # replacement name -> when its predecessor was lost
        self._replaces: dict[str, str] = {}  # replacement name -> the lost worker's name
        self._waiting: list[tuple[str, str, float]] = []  # (lost worker, its host, when)
        self._probes: dict[str, asyncio.Future[None]] = {}  # host -> its running probe

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._forever())

    async def stop(self) -> None:
        """End the checks and the host probes (a start half done finishes first: shielded)."""
        self.stopping = True
        tasks = [t for t in (self._task, *self._probes.values()) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.interval + 2 * REACH_TIMEOUT + 2)

    async def _forever(self) -> None:
        while self.cluster.status == Status.running and not self.stopping:
            await asyncio.sleep(self.interval)
            try:
                await self.heal_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("checking the workers failed: %s", exc, exc_info=True)

    async def _registered(self) -> dict[str, dict[str, Any]]:
        """name -> the scheduler's entry (address, last_seen), asked with a bounded wait."""
        assert self.cluster.scheduler_comm is not None
        info = await asyncio.wait_for(
            self.cluster.scheduler_comm.identity(n_workers=-1), REACH_TIMEOUT
        )
        return {str(w.get("name")): {**w, "address": a} for a, w in info["workers"].items()}

    async def heal_once(self) -> None:
        """One check: find lost workers, retry unreachable hosts, start replacements.

        Lost: gone from the scheduler and its process exited (or its host does not answer), or
        silent (no heartbeat for ``worker_ttl``) on a host that does not answer, or missing
        for longer than a nanny needs to restart it."""
        now = time.monotonic()
        registered = await self._registered()
        for name, entry in registered.items():
            beat = self._beats.get(name)
            if beat is None or beat[0] != entry.get("last_seen"):
                self._beats[name] = (entry.get("last_seen"), now)
            if name in self.cluster.worker_spec and name not in self._seen:
                self._seen.add(name)
                if name in self._lost_at:
                    host = self.cluster.worker_spec[name]["options"]["host"]
                    after = now - self._lost_at.pop(name)
                    logger.info(
                        "worker %s ready on %s, %.1f s after the worker it replaces was lost",
                        name,
                        host,
                        after,
                    )
                    self.cluster._event(
                        "worker-replaced",
                        worker=name,
                        host=host,
                        replaces=self._replaces.pop(name, None),
                        seconds_after_loss=round(after, 2),
                    )
        lost: dict[str, str] = {}
        suspects: list[str] = []
        for name in list(self.cluster.worker_spec):
            worker = self.cluster.workers.get(name)
            silent = name in registered and now - self._beats[name][1] > self.worker_ttl
            if name in registered and not silent:
                self._missing.pop(name, None)
            elif worker is None:
                if name in self.cluster.launcher.started:
                    lost[name] = "it left the scheduler"
            elif worker.status in (Status.failed, Status.closed):
                lost[name] = "its start failed"
            elif worker.status == Status.running and name in self.cluster.launcher.started:
                self._missing.setdefault(name, now)
                suspects.append(name)
        if suspects:
            try:  # bounded here too: reconnecting to a cut host may take its connect timeout
                states = await asyncio.wait_for(
                    asyncio.to_thread(self.cluster.engine.liveness, suspects, REACH_TIMEOUT),
                    REACH_TIMEOUT + 1,
                )
            except asyncio.TimeoutError:
                states = {name: "unreachable: no answer in time" for name in suspects}
            fresh = await self._registered()  # the check took time: who came back meanwhile
            for name in suspects:
                last = self._beats.get(name, (None, now))[0]
                if name in fresh and fresh[name].get("last_seen") != last:
                    continue
                host = self.cluster.worker_spec[name]["options"]["host"]
                state = states.get(name, "gone")
                if state == "gone":
                    lost[name] = "its process exited"
                elif state.startswith("unreachable"):
                    self.hosts.mark_down(host, state)
                    lost[name] = f"its host {host} does not answer"
                elif now - self._missing[name] > RESTART_GRACE:
                    lost[name] = f"it has not come back within {RESTART_GRACE:.0f} s"
        await self._retry_hosts(now)
        for name, why in lost.items():
            host = self.cluster.worker_spec.pop(name)["options"]["host"]
            self._missing.pop(name, None)
            self._beats.pop(name, None)
            logger.warning("worker %s on %s lost: %s", name, host, why)
            self.cluster._event("worker-lost", worker=name, host=host, reason=why)
            if name in registered and self.cluster.scheduler_comm is not None:  # silent: its tasks
                # go to the other workers now
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self.cluster.scheduler_comm.unregister(
                            address=registered[name]["address"],
                            stimulus_id=f"lazycluster-lost-{name}-{time.time()}",
                            close=False,
                        ),
                        REACH_TIMEOUT,
                    )
            self._waiting.append((name, host, now))
        placed = self._place_waiting()
        if lost or placed:
            # shielded: closing the cluster cancels this check, never a start half done (the
            # close waits for it, then stops what it started)
            await asyncio.shield(self.cluster._correct_state())

    async def _retry_hosts(self, now: float) -> None:
        """Hosts that did not answer are asked again in the background (a connect attempt may
        take its whole timeout), and reported lost after ``host_lost_after`` seconds."""
        for host, since in list(self.hosts.down.items()):
            if now - since > self.host_lost_after and host not in self.hosts.reported:
                self.hosts.reported.add(host)
                logger.error(
                    "host %s lost: no answer for %.0f s; the cluster runs on the other hosts",
                    host,
                    now - since,
                )
            probe = self._probes.get(host)
            if probe is None or probe.done():
                self._probes[host] = asyncio.ensure_future(self._probe_host(host, since))

    async def _probe_host(self, host: str, since: float) -> None:
        """Once ``host`` answers: stop what was left there, and place workers there again."""
        try:
            await asyncio.to_thread(self.cluster.engine.reach, host, REACH_TIMEOUT)
            await self._stop_stale(host)
            await asyncio.to_thread(self.cluster.engine.reroute, host)  # tunnelled: what it missed
            await self._stop_stale(host)  # left there while this probe ran
        except Exception as exc:
            logger.debug("host %s still does not answer: %s", host, exc)
            return
        self.hosts.down.pop(host, None)  # no await since the last stop: nothing left unstopped
        self.hosts.reported.discard(host)
        logger.info("host %s answers again after %.1f s", host, time.monotonic() - since)

    async def _stop_stale(self, host: str) -> None:
        """Stop the workers left for later on ``host``, those added meanwhile too (a worker
        closed while the probe ran); on failure they stay left for later."""
        while stale := self.hosts.stale.pop(host, []):
            try:
                await asyncio.to_thread(self.cluster.engine.stop, stale)
            except BaseException:
                self.hosts.stale.setdefault(host, [])[:0] = stale
                raise

    def _place_waiting(self) -> int:
        """Start a replacement for each lost worker where there is room (its host first)."""
        placed = 0
        for item in list(self._waiting):
            name, host, when = item
            target = self.cluster._place(self.cluster.worker_spec, prefer=host)
            if target is None:
                continue
            self._waiting.remove(item)
            spec = self.cluster._spec_on(target)
            self.cluster.worker_spec.update(spec)
            (new,) = spec
            self._lost_at[new] = when
            self._replaces[new] = name
            logger.info("worker %s starts on %s to replace %s", new, target, name)
            placed += 1
        return placed
