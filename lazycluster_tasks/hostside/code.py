"""Run inside each worker process (``Client.run``): the user's changed code read again
(``cluster.sync_code()``), the idle connections of a start's readiness check dropped, and
connections through the controller's relay ended once idle when their route moved onto a link.

Sent by value: the worker need not be able to import this package. Standard library only, as
every host program.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Dict, List  # noqa: UP035 - the package runs on hosts with 3.8


def reload(moves: Dict[str, str], folders: List[str]) -> List[str]:  # noqa: UP006
    """Point this process at the new code and forget the old.

    ``moves``: a code unit's old key -> its new key; the sys.path entry ``…/units/<old>`` (how
    an environment of ours adds it) becomes ``…/units/<new>``. ``folders``: code folders read
    in place (on a filesystem shared with the controller), whose files changed where they are.
    Every module loaded from an old unit or from those folders is dropped, so the next import
    (a task's function is unpickled by name) reads the new files. Returns the dropped modules.
    """
    roots: List[str] = []  # noqa: UP006
    for index, entry in enumerate(list(sys.path)):
        parent, name = os.path.split(entry.rstrip("/"))
        if name in moves and os.path.basename(parent) == "units":
            sys.path[index] = os.path.join(parent, moves[name])
            roots.append(entry.rstrip("/"))
    roots += [os.path.realpath(f) for f in folders] + [f.rstrip("/") for f in folders]
    dropped = []
    for module_name, module in list(sys.modules.items()):
        where = getattr(module, "__file__", None) or ""
        if where and any(where.startswith(root + os.sep) for root in roots):
            del sys.modules[module_name]
            dropped.append(module_name)
    importlib.invalidate_caches()
    return sorted(dropped)


def drop_idle_connections(dask_worker: Any) -> int:
    """Close this worker's idle connections to other workers; returns how many. A start's
    readiness check opened them through the controller's relay, before the host-to-host links
    were up: kept in the worker's pool, the job's fetches would go on using them (and, with
    links dialled on demand, never ask for their pair's link)."""
    pool = dask_worker.rpc
    idle = sum(len(comms) for comms in pool.available.values())
    pool.collect()
    return idle


def retire_connections(ports: Dict[str, List[int]], dask_worker: Any) -> int:  # noqa: UP006
    """Close this worker's pooled connections to the workers listening on its ``ports`` (worker
    address -> ports, at 127.0.0.1 on every host: tunnelled) as soon as each is idle: those
    idle now at once (as the pool does itself when it needs room), those in use when their
    request hands them back (the pool closes a connection returned to it that it no longer
    holds). They went through the controller's relay, and their routes moved onto a
    host-to-host link, which the next connection takes. Runs on the worker's event loop;
    returns how many were retired."""
    pool = dask_worker.rpc
    wanted = {str(port) for port in ports.get(dask_worker.address, [])}
    retired = 0
    for table in (pool.available, pool.occupied):
        for address, comms in table.items():
            if address.rsplit(":", 1)[-1] not in wanted:
                continue
            for comm in list(comms):
                comms.discard(comm)
                pool.semaphore.release()  # its room in the pool, as a close gives back
                if table is pool.available:
                    dask_worker.loop.add_callback(comm.close)
                retired += 1
    return retired
