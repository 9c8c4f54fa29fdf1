"""Waits on a host until a started server is up, its process group is gone, or time is over.

``python -c <this file> READY_FILE HOST PORT PGID LIMIT`` prints ``up|dead|timeout SECONDS``:
up once READY_FILE exists and HOST:PORT accepts a connection (a listener of someone else does
not count before the file exists), dead once the group's leader ended. Standard library only.
"""

from __future__ import annotations

import os
import socket
import sys
import time


def running(pid: int) -> bool:
    """The group's leader runs and is no zombie: one read, no /proc scan."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait(ready: str, host: str, port: int, pgid: int, limit: float) -> tuple[str, float]:
    start = time.monotonic()
    while True:
        if os.path.exists(ready):
            try:
                socket.create_connection((host, port), timeout=0.5).close()
                return "up", time.monotonic() - start
            except OSError:
                pass
        if not running(pgid):
            return "dead", time.monotonic() - start
        if time.monotonic() - start > limit:
            return "timeout", time.monotonic() - start
        time.sleep(0.02)


def main() -> None:
    ready, host, port, pgid, limit = sys.argv[1:6]
    state, waited = wait(ready, host, int(port), int(pgid), float(limit))
    print(state, waited)


if __name__ == "__main__":
    main()
