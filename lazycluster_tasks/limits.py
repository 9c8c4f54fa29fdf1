"""This process's own limits, raised where a cluster needs more than the default.

The controller holds descriptors per host (measured by ``benchmarks/scale.py``: about one per
host direct, 13 per host tunnelled — SSH connections, forwards, their pumps' selectors and
the monitor client's connections). The usual soft limit of 1,024 open files would end a
tunnelled cluster near 75 hosts with ``Too many open files``; the hard limit is usually far
higher, and raising the soft limit up to it needs no privilege.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

#: Descriptors a cluster may need per host at the controller (tunnelled, with headroom) and
#: for everything else this process holds.
FILES_PER_HOST = 16
FILES_BASE = 256


def open_files_for(hosts: int) -> int:
    """What a cluster of ``hosts`` may need at the controller."""
    return FILES_BASE + FILES_PER_HOST * max(0, hosts)


def ensure_open_files(needed: int) -> int:
    """Raise this process's soft limit on open files to at least ``needed`` (at most the hard
    limit); returns the soft limit now. Where the platform has no such limit, ``needed``."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return needed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return needed if soft == resource.RLIM_INFINITY else soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("open files limit not raised from %d to %d: %s", soft, target, exc)
            return soft
        logger.info("open files limit raised from %d to %d for the cluster's hosts", soft, target)
    if target < needed:
        logger.warning(
            "a cluster this size may need %d open files here; the hard limit is %d "
            "(raise it: ulimit -Hn, or LimitNOFILE= for a service)",
            needed,
            hard,
        )
    return target
