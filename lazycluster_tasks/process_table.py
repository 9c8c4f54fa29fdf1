"""ProcessTable: the processes of one cluster by name, their runtimes and GPU pins, and the
questions asked of their hosts all at once (liveness, logs)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from lazycluster_tasks import processes
from lazycluster_tasks.errors import LazyclusterError
from lazycluster_tasks.group import run_parallel
from lazycluster_tasks.processes import ProcessInfo
from lazycluster_tasks.runtime import Runtime

#: Processes grouped by the runtime that owns them, keyed as in records.
Jobs = dict[str, tuple[Runtime, list[ProcessInfo]]]


class ProcessTable:
    """A cluster's processes by name: each one's runtime (the one that started it, which owns
    its folder) and, for a worker on a GPU, the GPU it is pinned to; and the questions asked of
    their hosts, every host at once. Safe from any thread.

    ``key``: how records name a runtime (its host; this machine's controller has its own)."""

    def __init__(self, key: Callable[[Runtime], str] = lambda runtime: runtime.host) -> None:
        self._key = key
        self._infos: dict[str, ProcessInfo] = {}
        self._owners: dict[str, Runtime] = {}
        self._gpus: dict[str, int] = {}
        self._lock = threading.RLock()

    def add(self, owner: Runtime, info: ProcessInfo) -> None:
        with self._lock:
            self._infos[info.name] = info
            self._owners[info.name] = owner

    def remove(self, name: str) -> ProcessInfo | None:
        """Forget ``name`` (its GPU is free again); what it was, if it was known."""
        with self._lock:
            self._owners.pop(name, None)
            self._gpus.pop(name, None)
            return self._infos.pop(name, None)

    def get(self, name: str) -> ProcessInfo | None:
        return self._infos.get(name)

    def __getitem__(self, name: str) -> ProcessInfo:
        return self._infos[name]

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def names(self) -> list[str]:
        with self._lock:
            return list(self._infos)

    def all(self) -> list[ProcessInfo]:
        with self._lock:
            return list(self._infos.values())

    def known(self, names: Sequence[str]) -> list[ProcessInfo]:
        """Those of ``names`` still in the table, in that order."""
        with self._lock:
            return [self._infos[n] for n in names if n in self._infos]

    def workers(self) -> list[ProcessInfo]:
        with self._lock:
            return [i for i in self._infos.values() if i.role == "worker"]

    def owner(self, name: str) -> Runtime | None:
        return self._owners.get(name)

    def pin(self, host: str, names: Sequence[str], gpus: Sequence[int]) -> dict[str, int]:
        """A GPU of ``host`` (of ``gpus``) that no other worker there holds, for each of
        ``names``; ValueError when too few are free."""
        with self._lock:
            held = {
                self._gpus[i.name]
                for i in self._infos.values()
                if i.host == host and i.name in self._gpus and i.name not in names
            }
            free = [g for g in gpus if g not in held]
            if len(free) < len(names):
                raise ValueError(f"{host}: {len(names)} workers to start, {len(free)} GPUs free")
            pinned = dict(zip(names, free, strict=False))
            self._gpus.update(pinned)
            return pinned

    def key_of(self, name: str) -> str | None:
        """The key of the runtime that owns ``name`` (None: not in the table)."""
        owner = self._owners.get(name)
        return None if owner is None else self._key(owner)

    def by_owner(self, infos: Sequence[ProcessInfo]) -> Jobs:
        """Processes grouped by the runtime that owns them, keyed as in records."""
        jobs: Jobs = {}
        for info in infos:
            owner = self._owners.get(info.name)
            if owner is not None:
                jobs.setdefault(self._key(owner), (owner, []))[1].append(info)
        return jobs

    def dead(self, infos: Sequence[ProcessInfo]) -> list[str]:
        """Names of the processes that no longer run (all runtimes at once)."""
        states = run_parallel("liveness", self.by_owner(infos), lambda job: processes.alive(*job))
        return [name for result in states.values() for name, up in result.items() if not up]

    def logs(
        self, infos: Sequence[ProcessInfo], lines: int | None = processes.LOG_TAIL_LINES
    ) -> dict[str, str]:
        """Each process's log (or its tail), all runtimes at once; a runtime that cannot be
        read says so in place of its logs."""

        def read(job: tuple[Runtime, list[ProcessInfo]]) -> dict[str, str]:
            runtime, owned = job
            try:
                return processes.read_logs(runtime, owned, lines)
            except LazyclusterError as exc:
                return {i.name: f"(log unavailable: {exc})" for i in owned}

        found: dict[str, str] = {}
        for part in run_parallel("read logs", self.by_owner(infos), read).values():
            found.update(part)
        return found

    def liveness(self, names: Sequence[str], timeout: float) -> dict[str, str]:
        """name -> "alive", "gone", or "unreachable: why" (each host asked once, bounded)."""

        def ask(job: tuple[Runtime, list[ProcessInfo]]) -> dict[str, str]:
            runtime, owned = job
            try:
                states = processes.alive(runtime, owned, timeout=timeout)
            except LazyclusterError as exc:
                return {i.name: f"unreachable: {exc}".splitlines()[0] for i in owned}
            return {name: "alive" if up else "gone" for name, up in states.items()}

        result = {n: "gone" for n in names if n not in self}
        for part in run_parallel("liveness", self.by_owner(self.known(names)), ask).values():
            result.update(part)
        return result
