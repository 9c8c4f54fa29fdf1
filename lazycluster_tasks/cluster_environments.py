"""ClusterEnvironments: the environments one cluster's hosts run with — made at the start from
this machine's (see ``environments``), and the user's code synced to them later."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from lazycluster_tasks import environments
from lazycluster_tasks.dask_options import DaskOptions
from lazycluster_tasks.errors import LazyclusterError
from lazycluster_tasks.runtime import Runtime
from lazycluster_tasks.settings import settings

logger = logging.getLogger(__name__)

Progress = Callable[[Sequence[environments.HostEnvironment], int], None]


def given_python(options: DaskOptions, runtime: Runtime) -> str | None:
    """The interpreter the user gave for ``runtime`` (its own, or the options'), else None."""
    given = options.python_executable
    if (
        runtime.python_given
        or isinstance(given, str)
        or (isinstance(given, Mapping) and runtime.host in given)
    ):
        return options.python(runtime)
    return None


class ClusterEnvironments:
    """What each host of one cluster runs the cluster with (environment sync on)."""

    def __init__(self, lease: str = "") -> None:
        #: The cluster folder's name: each host's environment is held for it from the check
        #: until the cluster's cleanup there (see hostside.envs.LEASE).
        self.lease = lease
        #: Called with (hosts ready so far, hosts to make ready) as each host's environment
        #: is checked or made: once with none ready first.
        self.on_environment: Progress | None = None
        #: What each host runs the cluster with, once checked.
        self.environments: dict[str, environments.HostEnvironment] = {}
        #: The environment the hosts got (None: environment sync off, or not made yet).
        self.manifest: environments.Manifest | None = None
        #: Hosts asked for their environment: each may hold one for ``lease`` (a cleanup
        #: lets go there, also where the start failed before anything else reached it).
        self.asked: set[str] = set()
        self._shared: set[str] = set()  # hosts that run this machine's own interpreter
        self._bases: dict[str, str] = {}  # host -> the interpreter given: its env's base
        self._code_path: list[str] = []  # the user's code folders here

    def prepare(self, options: DaskOptions) -> None:
        """The user's code folders here, before any host is asked: a scheduler on this machine
        may start first (:meth:`make` reads the same folders with the rest)."""
        parts = options.environment_parts()
        if parts is not None:
            self._code_path = environments.code_folders(parts[2])

    def make(self, options: DaskOptions, runtimes: Sequence[Runtime]) -> DaskOptions:
        """Each remote host gets this machine's environment, made from the interpreter given
        for it if any (python=), else from python3.X on its PATH. Returns ``options`` with
        each host's interpreter for the cluster from then on (unchanged with the sync off)."""
        parts = options.environment_parts()
        if parts is None:
            return options
        given = options.python_executable
        remote = [rt for rt in runtimes if not rt.is_local]
        bases = {  # host -> the interpreter given there: the environment's base
            rt.host: python for rt in remote if (python := given_python(options, rt)) is not None
        }
        manifest = environments.current(*parts)
        self.manifest = manifest
        self._code_path = list(manifest.code_folders)
        if not remote:
            return options
        self.asked.update(rt.host for rt in remote)
        made = environments.sync(
            remote,
            manifest,
            _packs(),
            python=bases,
            on_host=self._reporter(len(remote)),
            lease=self.lease,
        )
        self.environments.update(made)
        self._bases = bases
        pythons = dict(given) if isinstance(given, Mapping) else {}
        for host, env in made.items():
            if env.shared:  # its files are this machine's: the given interpreter as it is
                self._shared.add(host)
                if host in bases:
                    pythons[host] = bases[host]
                continue
            pythons[host] = env.python
            if env.sent:
                logger.info(
                    "%s: environment %s made: %s sent in %.1f s",
                    host,
                    manifest.key,
                    f"{env.sent / 2**20:.1f} MiB",
                    env.seconds,
                )
            else:
                logger.info("%s: environment %s ready (%.2f s)", host, manifest.key, env.seconds)
        return replace(options, python_executable=pythons or None)

    def _reporter(self, total: int) -> Callable[[environments.HostEnvironment | None], None]:
        """The progress callback for ``sync`` (called once with none ready first)."""
        ready: list[environments.HostEnvironment] = []
        reporting = threading.Lock()

        def report(env: environments.HostEnvironment | None) -> None:
            if self.on_environment is None:
                return
            with reporting:
                if env is not None:
                    ready.append(env)
                done = list(ready)
            self.on_environment(done, total)  # sync logs an exception from it

        try:
            report(None)
        except Exception:
            logger.exception("environment progress callback failed")
        return report

    def resync(
        self, options: DaskOptions, runtimes: Sequence[Runtime]
    ) -> tuple[DaskOptions, dict[str, str], list[str]]:
        """The code folders scanned again; each host with an environment of ours gets the
        changed units (only those travel) and an environment naming them. Returns the options
        with the new interpreters, old unit key -> new one, and the code folders (for the
        running workers)."""
        parts = options.environment_parts()
        if self.manifest is None or parts is None:
            raise LazyclusterError("sync_code: the cluster runs without environment sync")
        old = self.manifest
        manifest = environments.current(*parts)
        moves = {
            unit.key: new.key
            for unit in old.units
            for new in manifest.units
            if new.name == unit.name and new.key != unit.key  # changed files, a new key
        }
        ours = [
            rt
            for rt in runtimes
            if rt.host in self.environments and not self.environments[rt.host].shared
        ]
        if ours and manifest.key != old.key:
            made = environments.sync(ours, manifest, _packs(), python=self._bases, lease=self.lease)
            self.environments.update(made)
            given = options.python_executable
            pythons = dict(given) if isinstance(given, Mapping) else {}
            pythons.update({host: env.python for host, env in made.items()})
            options = replace(options, python_executable=pythons)
            for host, env in made.items():
                logger.info(
                    "%s: code synced to environment %s: %.1f MiB sent in %.1f s",
                    host,
                    manifest.key,
                    env.sent / 2**20,
                    env.seconds,
                )
        self.manifest = manifest
        self._code_path = list(manifest.code_folders)
        return options, moves, list(self._code_path)

    def code_env(self, runtime: Runtime, here: bool, user_env: Mapping[str, str]) -> dict[str, str]:
        """PYTHONPATH for a process that runs with this machine's own interpreter (``here``, or
        on a host sharing its files): the user's code folders (unless the user set PYTHONPATH)."""
        shared = here or runtime.host in self._shared
        if not shared or not self._code_path or "PYTHONPATH" in user_env:
            return {}
        return {"PYTHONPATH": os.pathsep.join(self._code_path)}


def _packs() -> environments.Packs:
    return environments.Packs(os.path.join(settings().cache_directory, "packs"))
