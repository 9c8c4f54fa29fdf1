"""Shell commands on hosts from a flow, in prefect-shell's shape (prefect#4299): the
``ssh_command`` task and the ``SSHCommand`` block run a command on one host or a host group,
all hosts at once, stream each line to the run's log as ``[host] line``, and return each host's
exit code and output. A host that cannot be reached or whose command fails is data, named in
the result; ``check=True`` (the default) then fails the task naming each such host."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from prefect import get_run_logger, task
from prefect.blocks.core import Block
from pydantic import Field

from lazycluster_tasks.errors import LazyclusterError
from lazycluster_tasks.group import run_parallel
from lazycluster_tasks.integrations import Resolved
from lazycluster_tasks.prefect.blocks import DOCUMENTATION_URL, LOGO_URL
from lazycluster_tasks.prefect.resolve import resolve_blocks
from lazycluster_tasks.runtime import Runtime

#: Seconds a command may run on a host unless told.
TIMEOUT = 600.0


def run_on_hosts(
    command: str,
    where: Resolved,
    env: Mapping[str, str] | None,
    timeout: float,
    log: logging.Logger | logging.LoggerAdapter[Any],
) -> dict[str, dict[str, Any]]:
    """``command`` under /bin/sh on every host at once: host -> {"exit_code", "output"} (an
    exit code of None, with "error", for a host it could not run on)."""
    runtimes = {
        h: Runtime(h, None, where.connection_kwargs, where.ssh_config_path) for h in where.hosts
    }

    def run(host: str) -> dict[str, Any]:
        def said(line: str) -> None:
            log.info("[%s] %s", host, line.rstrip("\n"))

        try:
            result = runtimes[host].connection.run(
                command, timeout=timeout, env=env, on_output=said, combine_stderr=True
            )
        except Exception as exc:
            return {"exit_code": None, "output": "", "error": " ".join(str(exc).split())}
        return {"exit_code": result.exit_code, "output": result.stdout}

    try:
        return run_parallel("ssh command", {h: h for h in where.hosts}, run)
    finally:
        for runtime in runtimes.values():
            runtime.cleanup()


def _checked(results: dict[str, dict[str, Any]], check: bool) -> dict[str, dict[str, Any]]:
    failed = {h: r for h, r in results.items() if r["exit_code"] != 0}
    if check and failed:
        said = "; ".join(
            f"{h}: exit {r['exit_code']}" if r["exit_code"] is not None else f"{h}: {r['error']}"
            for h, r in sorted(failed.items())
        )
        raise LazyclusterError(
            f"the command failed on {len(failed)} of {len(results)} hosts: {said}"
        )
    return results


@task(name="ssh-command", task_run_name="ssh-command on {hosts}")
def ssh_command(
    command: str,
    hosts: Sequence[str] | None = None,
    host_group: str | None = None,
    ssh_block: str | None = None,
    ssh_config_path: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = TIMEOUT,
    check: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run ``command`` on the hosts at once; host -> its exit code and output, each line in the
    run's log as it comes.

    Args:
        command: A shell command (run under /bin/sh whatever the login shell).
        hosts: SSH aliases or host names (default: the host group's).
        host_group: A host group block: its hosts and SSH settings.
        ssh_block: An SSH settings block, used instead of the host group's.
        ssh_config_path: An OpenSSH config file (default: the SSH settings').
        env: Environment variables for the command (values are shell-quoted).
        timeout: Seconds the command may run on each host.
        check: Fail the task when a host's command exits with an error.
    """
    where = resolve_blocks(hosts, host_group, ssh_block, ssh_config_path)
    if not where.hosts:
        raise ValueError("give hosts=[...] or host_group='block name'")
    results = run_on_hosts(command, where, env, timeout, get_run_logger())
    return _checked(results, check)


class SSHCommand(Block):
    """Commands to run on a set of hosts over SSH, as prefect-shell's ShellOperation runs
    them here: in one /bin/sh per host, stopping at the first that fails."""

    _block_type_name = "Lazycluster SSH Command"
    _block_type_slug = "lazycluster-ssh-command"
    _description = "Shell commands run on SSH hosts at once; each host's exit code and output."
    _documentation_url = DOCUMENTATION_URL  # type: ignore[assignment]
    _logo_url = LOGO_URL  # type: ignore[assignment]

    commands: list[str] = Field(description="Shell lines, run in order; the first failing ends.")
    hosts: list[str] = Field(default_factory=list, description="SSH aliases or host names.")
    host_group: str | None = Field(default=None, description="Or a host group block's name.")
    ssh_block: str | None = Field(default=None, description="An SSH settings block's name.")
    ssh_config_path: str | None = Field(default=None, description="OpenSSH config to read.")
    env: dict[str, str] = Field(default_factory=dict, description="Variables for the commands.")
    timeout: float = Field(default=TIMEOUT, gt=0, description="Seconds per host.")

    def run(self, check: bool = True) -> dict[str, dict[str, Any]]:
        """Run the commands on every host at once (from a flow or task: lines to its log)."""
        where = resolve_blocks(
            self.hosts or None, self.host_group, self.ssh_block, self.ssh_config_path
        )
        if not where.hosts:
            raise ValueError("the block names no hosts (hosts or host_group)")
        try:
            log: logging.Logger | logging.LoggerAdapter[Any] = get_run_logger()
        except Exception:  # outside a run: this module's logger
            log = logging.getLogger(__name__)
        line = "set -e\n" + "\n".join(self.commands)
        return _checked(run_on_hosts(line, where, self.env, self.timeout, log), check)
