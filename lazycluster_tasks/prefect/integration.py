"""The Prefect integration of the core (see ``lazycluster_tasks.integrations``): blocks made
plain data, the workers' Prefect environment inside a run, their task runs' logs sent before
they stop. Registered by the package's entry point; the core never imports this module."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prefect.context import FlowRunContext, TaskRunContext

from lazycluster_tasks.prefect.resolve import resolve_blocks
from lazycluster_tasks.prefect.tasks import flush_worker_logs, worker_prefect_env

if TYPE_CHECKING:
    from lazycluster_tasks.engine import Engine


class PrefectIntegration:
    """What Prefect adds to a cluster (see ``lazycluster_tasks.integrations.Integration``)."""

    #: the settings by name made plain: the one resolution of blocks
    resolve = staticmethod(resolve_blocks)

    def active(self) -> bool:
        return bool(FlowRunContext.get() or TaskRunContext.get())

    def worker_env(self) -> tuple[dict[str, str], list[int]]:
        return worker_prefect_env()

    def before_close(self, engine: Engine, log: logging.Logger) -> None:
        flush_worker_logs(engine, log)
