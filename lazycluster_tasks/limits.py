"""This process's own limits, raised where a cluster needs more than the default.

The controller holds descriptors per host (measured by ``benchmarks/scale.py`` on 2026-12-07:
about one per host direct, 21.6 per host tunnelled, 20.8 to 25 from 3 to 32 hosts — SSH
connections, forwards, their pumps' selectors and the clients' connections; 13 on 2026-12-06).
The usual soft limit of 1,024 open files would end a tunnelled cluster near 47 hosts with
``Too many open files``; the hard limit is usually far higher, and raising the soft limit up to
it needs no privilege.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

#: Descriptors a cluster may need per host at the controller (tunnelled, with headroom: the
#: scale benchmark checks its measured growth against this) and for everything else this
#: process holds. At 16 per host (before), the limit asked for fell below what a tunnelled
#: cluster holds from about 45 hosts on.
FILES_PER_HOST = 32
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
