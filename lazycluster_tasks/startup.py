"""Reading a failed start: which logs mean "start it again" and how a failure is reported."""

from __future__ import annotations

import re
from collections.abc import Mapping

from lazycluster_tasks.commands import SETUP_MARK
from lazycluster_tasks.connection import tail
from lazycluster_tasks.errors import WorkerStartError

ADDRESS_IN_USE = ("Address already in use", "[Errno 98]")
#: A worker whose first connection to the scheduler dropped while it registered (seen through
#: busy SSH forwards; with TLS it ends the handshake): started again, like one that lost its
#: port at bind time.
DROPPED_AT_START = (
    "StreamClosedError",
    "Connection reset by peer",
    "UNEXPECTED_EOF_WHILE_READING",
    "IOStream is not idle",
)
MISSING_DISTRIBUTED = "No module named 'distributed'"


def lost_port(log: str) -> bool:
    """The process exited because its port was taken when it bound it."""
    return any(text in log for text in ADDRESS_IN_USE)


#: A nanny closed while it started: its close path then fails Dask's own status assertion in
#: Nanny.kill, the first error its log shows. Seen in CI when the start took longer than the
#: death timeout (which Dask also applies to a start: "failure-to-start-TimeoutError") and when
#: its first connection dropped; started again once, like a worker whose connection dropped.
NANNY_DROPPED_AT_START = "AssertionError: Status.starting"


def retriable(log: str) -> bool:
    """A worker that lost its port at bind time, or its first connection to the scheduler."""
    cause = first_error(log) or ""
    dropped = any(t in cause for t in DROPPED_AT_START) or cause == NANNY_DROPPED_AT_START
    return lost_port(log) or dropped


def first_error(log: str) -> str | None:
    """The first line of a log that reports an error: usually the cause, where the last lines
    show only what followed from it."""
    for line in log.splitlines():
        text = line.strip()
        if re.search(r"\b\w*(Error|Exception)\b:|\berror:", text):
            return text
    return None


def setup_failure(log: str) -> str | None:
    """ "setup step N (LINE) failed (exit E): FIRST OUTPUT LINE" when a setup line ended the
    start (see commands.setup_file), else None."""
    lines = log.splitlines()
    failed = [i for i, x in enumerate(lines) if x.startswith(SETUP_MARK) and " failed (exit " in x]
    if not failed:
        return None
    end = failed[0]
    number, status = lines[end][len(SETUP_MARK) :].split(" failed ", 1)
    begin = f"{SETUP_MARK}{number}: "
    starts = [i for i in range(end) if lines[i].startswith(begin)]
    step = lines[starts[-1]][len(begin) :] if starts else "?"
    said = [x.strip() for x in lines[(starts[-1] + 1 if starts else 0) : end] if x.strip()]
    return f"setup step{number} ({step}) failed {status}: {said[0] if said else '(no output)'}"


def failure_text(name: str, log: str) -> str:
    """A process's first error and the tail of its log."""
    cause = first_error(log)
    head = f"{name}: first error: {cause}\n" if cause else f"{name}: "
    return head + tail(log, 800)


def worker_start_error(
    failed: Mapping[str, str],
    logs: Mapping[str, str],
    exited: bool,
    timeout: float,
    scheduler_log: str | None,
) -> WorkerStartError:
    """One error naming every failed worker (name -> host) with its first error and log tail,
    and the scheduler's log tail when there is one."""
    found = {failed[n]: setup_failure(logs.get(n, "")) for n in failed}
    setup = {host: why for host, why in found.items() if why}
    if setup:  # the site's own lines failed: that is the whole story
        text = "; ".join(f"{host}: {why}" for host, why in setup.items())
        return WorkerStartError(text, missing=setup)
    why = "exited" if exited else f"did not register within {timeout} s"
    if any(MISSING_DISTRIBUTED in logs.get(n, "") for n in failed):
        why += " (dask.distributed is not importable by their Python there; nothing is "
        why += "installed for you)"
    details = {host: failure_text(name, logs.get(name, "")) for name, host in failed.items()}
    if scheduler_log is not None:
        details["scheduler"] = tail(scheduler_log, 800)
    lines = "\n".join(f"--- {h}\n{text}" for h, text in details.items())
    names, hosts = ", ".join(failed), ", ".join(details)
    return WorkerStartError(f"workers {names} {why} (hosts: {hosts}):\n{lines}", missing=details)
