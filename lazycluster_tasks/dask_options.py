"""DaskOptions: how a cluster's scheduler and workers are run, checked before anything starts."""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lazycluster_tasks.checks import check_count, check_seconds
from lazycluster_tasks.dask_commands import check_options
from lazycluster_tasks.network import NetworkMode, network_mode
from lazycluster_tasks.runtime import Runtime, check_path
from lazycluster_tasks.settings import settings

#: Workers a host takes when nothing names a count for it.
WORKERS_PER_HOST = 1


def workers_on(counts: int | Mapping[str, int] | None, host: str) -> int:
    """What ``host`` takes by ``counts`` (one count for every host, or host -> count; hosts
    not named, and every host when None: ``WORKERS_PER_HOST``); unchecked."""
    if counts is None:
        return WORKERS_PER_HOST
    return counts.get(host, WORKERS_PER_HOST) if isinstance(counts, Mapping) else counts


@dataclass
class DaskOptions:
    """How the scheduler and workers are run (all optional)."""

    network_mode: NetworkMode = "auto"  # see network.NetworkMode
    #: Workers a host takes: one count for every host, or host -> count (others: 1).
    workers_per_host: int | Mapping[str, int] = WORKERS_PER_HOST
    threads_per_worker: int | None = None  # None: Dask's default (the host's cores)
    memory_limit: str | int | None = None  # None: Dask's default ("auto")
    #: Worker resources, e.g. {"GPU": 1}, or a function of the runtime (per host).
    resources: Mapping[str, float] | Callable[[Runtime], Mapping[str, float]] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    #: More options of ``dask scheduler`` / ``dask worker``: SSHCluster's forms, a list of
    #: command-line arguments or a dict of keyword options ({"nthreads": 2}: ``--nthreads 2``;
    #: the keys lazycluster has options for — nthreads, memory_limit, nanny, resources,
    #: worker_class, death_timeout, dashboard — set those).
    scheduler_options: Sequence[str] | Mapping[str, Any] = ()
    worker_options: Sequence[str] | Mapping[str, Any] = ()
    #: The worker's class, a dotted name importable on the hosts ("dask_cuda.CUDAWorker", a
    #: class of the user's code); None: Dask's Worker. A Nanny runs it unless nanny=False.
    worker_class: str | None = None
    #: GPUs: "auto" runs one worker per GPU a host reports (nvidia-smi), each pinned to its
    #: own (CUDA_VISIBLE_DEVICES) with resources {"GPU": 1}; host -> "auto" or a count, for
    #: some hosts only; None (default): GPUs are not looked at.
    gpus: str | Mapping[str, int | str] | None = None
    #: Shell lines run before each scheduler and worker on the hosts, in the /bin/sh that
    #: then starts it ("module load cuda/12", ". /opt/conda/bin/activate ml"): one list for
    #: every host, or host -> list. A failing line stops the start, named with its output.
    setup: Sequence[str] | Mapping[str, Sequence[str]] = ()
    #: A worker without scheduler exits after this; Dask also ends a worker that has not
    #: started (registered) within it, so a few seconds fail starts on a loaded host.
    death_timeout: float = 60.0
    idle_timeout: float = 60.0  # the scheduler exits this long after its last client left
    nanny: bool = True
    #: Interpreter on the hosts: one path for all, or host -> path (default: the runtime's).
    python_executable: str | Mapping[str, str] | None = None
    #: The scheduler's dashboard (bokeh: about 1 s of CPU at each start); default from
    #: ``LAZYCLUSTER_DASHBOARD`` (on).
    dashboard: bool = field(default_factory=lambda: settings().dashboard)
    #: Ports of this machine (e.g. a Prefect API) to expose as 127.0.0.1:<port> on every host,
    #: to the processes of the user the cluster logs in as there only (see gates).
    forward_ports: Sequence[int] = ()
    start_timeout: float = 120.0  # for all workers to register
    #: seconds between TERM and KILL (at the close of a LazySSHCluster whose scheduler has told
    #: every worker to close, what is left is killed at once)
    stop_grace: float = 0.3
    #: TLS between all processes: True makes fresh certificates per cluster; False turns it off
    #: (warned); a ``distributed.Security`` brings the user's own.
    security: Any = True
    #: Tunnelled mode: worker traffic crosses host-to-host SSH links where a host reaches
    #: another's sshd: a key per host, let into the others' ~/.ssh/authorized_keys (from that
    #: host only, for the two hosts' ports only, expiring) until the cluster ends there.
    #: True: every pair's link dialled after the start, up to links.ON_DEMAND_ABOVE hosts,
    #: above that a pair's link when its workers first talk; "all" or "on-demand" choose one
    #: way at any size; False leaves every authorized_keys untouched and sends that traffic
    #: through this machine.
    host_links: bool | str = True
    #: The hosts' Python: "auto" makes an environment like this machine's on each host without
    #: an interpreter given (python_executable) — its installed distributions and the user's
    #: code, sent from here and kept there by content; a mapping with "include" (distributions:
    #: only these), "exclude" (names or patterns left out) and "code" (the folders of the
    #: user's code) does the same with those; None uses the hosts' interpreters as they are.
    environment: Any = "auto"

    def __post_init__(self) -> None:
        """The keyword form's options that lazycluster has fields for set those fields;
        ``worker_class="distributed.Nanny"`` (SSHCluster's default) is ``nanny=True``."""
        for role, fields in (("worker", WORKER_FIELDS), ("scheduler", SCHEDULER_FIELDS)):
            given = getattr(self, f"{role}_options")
            if isinstance(given, Mapping) and any(k in fields for k in given):
                rest = dict(given)
                for key, name in fields.items():
                    if key in rest:
                        setattr(self, name, rest.pop(key))
                setattr(self, f"{role}_options", rest)
        if self.worker_class in NANNY_CLASSES:
            self.worker_class, self.nanny = None, True
        elif self.worker_class in WORKER_CLASSES:
            self.worker_class, self.nanny = None, False

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> DaskOptions:
        """The options named in keyword form (a cluster's ``**options``, a Prefect task's
        ``options``, a host group's defaults); a name that is no option is a TypeError naming
        it, and the option it looks like."""
        known = sorted(f.name for f in dataclasses.fields(cls) if f.init)
        for name in options:
            if name not in known:
                like = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {like[0]!r}?" if like else f"options: {', '.join(known)}"
                raise TypeError(f"{name!r} is not a cluster option ({hint})")
        return cls(**options)

    def workers_on(self, host: str) -> int:
        """Workers ``host`` takes (before GPUs: see gpus)."""
        return workers_on(self.workers_per_host, host)

    def gpus_on(self, host: str) -> int | str | None:
        """``"auto"``, a GPU count, or None (GPUs not used) for ``host``."""
        chosen = self.gpus
        return chosen.get(host) if isinstance(chosen, Mapping) else chosen

    def setup_on(self, host: str) -> list[str]:
        """The setup lines for processes on ``host``."""
        chosen = self.setup
        lines = chosen.get(host, ()) if isinstance(chosen, Mapping) else chosen
        return list(lines)

    def python(self, runtime: Runtime) -> str:
        """The interpreter that runs Dask on ``runtime`` (one path given for all: the hosts';
        this machine keeps its own unless a mapping names it)."""
        choice = self.python_executable
        if isinstance(choice, str):
            return runtime.python_executable if runtime.is_local else choice
        if isinstance(choice, Mapping) and runtime.host in choice:
            return choice[runtime.host]
        return runtime.python_executable

    def environment_parts(self) -> tuple[list[str] | None, list[str], list[str] | None] | None:
        """(include, exclude, code) of ``environment``; None when it is off."""
        choice = self.environment
        if choice is None:
            return None
        if choice == "auto":
            return None, [], None
        include, exclude, code = choice.get("include"), choice.get("exclude"), choice.get("code")
        return (
            list(include) if include is not None else None,
            list(exclude or []),
            list(code) if code is not None else None,
        )

    def check(self) -> None:
        """Refuse options that would start a useless or broken cluster, naming the option."""
        if self.host_links not in (True, False, "all", "on-demand"):
            raise ValueError(
                f"host_links must be True, False, 'all' or 'on-demand', not {self.host_links!r}"
            )
        choice = self.environment
        if not (choice is None or choice == "auto" or isinstance(choice, Mapping)):
            raise ValueError(f"environment must be 'auto', None or a mapping, not {choice!r}")
        if isinstance(choice, Mapping):
            unknown = set(choice) - {"include", "exclude", "code"}
            if unknown:
                raise ValueError(f"environment: unknown keys {sorted(unknown)}")
            for key in ("include", "exclude", "code"):
                value = choice.get(key)
                if value is not None and (
                    isinstance(value, str) or not isinstance(value, Sequence)
                ):
                    raise ValueError(f"environment[{key!r}] must be a list of names, not {value!r}")
        network_mode(self.network_mode)
        counts = self.workers_per_host
        for host, count in counts.items() if isinstance(counts, Mapping) else [("", counts)]:
            check_count(f"workers_per_host[{host!r}]" if host else "workers_per_host", count, 1)
        for role in ("worker", "scheduler"):
            check_options(role, getattr(self, f"{role}_options"))
        if self.worker_class is not None and not (
            isinstance(self.worker_class, str) and _DOTTED.match(self.worker_class)
        ):
            raise ValueError(
                "worker_class must be a dotted name such as 'dask_cuda.CUDAWorker', "
                f"not {self.worker_class!r}"
            )
        self._check_gpus()
        self._check_setup()
        if self.threads_per_worker is not None:
            check_count("threads_per_worker", self.threads_per_worker, minimum=1)
        for name in ("death_timeout", "idle_timeout", "start_timeout"):
            check_seconds(name, getattr(self, name))
        check_seconds("stop_grace", self.stop_grace, zero=True)
        for key in self.env:
            check_path(key, "env name")
            if "=" in key or not key:
                raise ValueError(f"env name must be non-empty without '=': {key!r}")

    def _check_gpus(self) -> None:
        chosen = self.gpus
        if chosen is None or chosen == "auto":
            return
        if not isinstance(chosen, Mapping):
            raise ValueError(f"gpus must be 'auto', None or host -> 'auto' or a count: {chosen!r}")
        for host, value in chosen.items():
            if value != "auto":
                check_count(f"gpus[{host!r}]", value, minimum=0)

    def _check_setup(self) -> None:
        chosen = self.setup
        groups = chosen.values() if isinstance(chosen, Mapping) else [chosen]
        for lines in groups:
            if isinstance(lines, str) or not isinstance(lines, Sequence):
                raise TypeError(
                    f"setup must be a list of shell lines (or host -> list): {chosen!r}"
                )
            for line in lines:
                if not isinstance(line, str) or not line.strip() or "\0" in line:
                    raise ValueError(f"setup: not a shell line: {line!r}")


#: Keyword options of ``dask worker`` / ``dask scheduler`` that set a field of ours.
WORKER_FIELDS = {
    "nthreads": "threads_per_worker",
    "memory_limit": "memory_limit",
    "nanny": "nanny",
    "resources": "resources",
    "worker_class": "worker_class",
    "death_timeout": "death_timeout",
}
SCHEDULER_FIELDS = {"dashboard": "dashboard"}
#: Dask's own classes, as SSHCluster names them: a nanny (that runs a Worker), a bare worker.
NANNY_CLASSES = ("distributed.Nanny", "distributed.nanny.Nanny")
WORKER_CLASSES = ("distributed.Worker", "distributed.worker.Worker")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+\Z")
