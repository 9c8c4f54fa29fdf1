"""Pure builders of the host-to-host SSH links' lines: authorized_keys lines and their markers,
the link master's argv, its forwards and states. Values are quoted with ``shlex.quote``; nothing
in this module does I/O."""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence

from lazycluster_tasks import openssh_options
from lazycluster_tasks.commands import RUNNING, q

# -- host-to-host SSH links (tunnelled data plane) ---------------------------------------

#: Where sshd looks for a user's keys by default (the links' keys are authorized there).
AUTHORIZED_KEYS = '"$HOME/.ssh/authorized_keys"'
#: Seconds a link's master waits for the far sshd; silence after that many keep-alives ends it.
LINK_CONNECT_TIMEOUT = 5
#: What a key may open or listen on when it needs nothing yet: sshd refuses a key line with no
#: port at all, and a line without ``permitopen`` would allow every port. The ``.invalid``
#: domain never resolves (RFC 2606): nothing can be reached or bound through it.
NOWHERE = "lazycluster.invalid:1"


def peer_marker(cluster_id: str) -> str:
    """The comment that names a cluster's keys in authorized_keys (the edit's marker)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", cluster_id):
        raise ValueError(f"invalid cluster id {cluster_id!r}")
    return f"lazycluster-link-{cluster_id}"


def _host_word(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", host)


def key_comment(marker: str, dialler: str, target: str) -> str:
    """The comment of the line that lets ``dialler``'s key into ``target``."""
    return f"{marker}/{_host_word(dialler)}@{_host_word(target)}"


def key_scope(marker: str, target: str) -> str:
    """What names the lines of ``marker`` that let keys into ``target`` (see
    hostside.authorized_keys): a home shared by several hosts holds every host's lines."""
    return f"{marker}@{_host_word(target)}"


def authorized_line(
    public_key: str,
    comment: str,
    sources: Sequence[str] = (),
    opens: Iterable[int] = (),
    listens: Iterable[int] = (),
) -> str:
    """An authorized_keys line (without its expiry-time, which the host adds from its own
    clock) for a link's key: from ``sources`` only (the dialling host's addresses; none given:
    from anywhere), forwarding to the host's 127.0.0.1:<port> for each of ``opens`` and
    listening on its 127.0.0.1:<port> for each of ``listens``, and nothing else — no shell, no
    command, no pty, no agent, no other address or port."""
    parts = public_key.split()
    if len(parts) < 2 or not re.fullmatch(r"[A-Za-z0-9+/=]+", parts[1]):
        raise ValueError("not an OpenSSH public key")
    if not re.fullmatch(r"[A-Za-z0-9_./@-]+", comment):
        raise ValueError(f"invalid key comment {comment!r}")
    addresses = [str(ipaddress.ip_address(a)) for a in sources]  # ValueError on anything else
    options = ["restrict", "port-forwarding"]
    if addresses:
        options.append(f'from="{",".join(addresses)}"')
    targets = [f"127.0.0.1:{int(p)}" for p in sorted(set(opens))] or [NOWHERE]
    listeners = [f"127.0.0.1:{int(p)}" for p in sorted(set(listens))] or [NOWHERE]
    options += [f'permitopen="{t}"' for t in targets]
    options += [f'permitlisten="{t}"' for t in listeners]
    options.append('command="/bin/false"')
    return f"{','.join(options)} {parts[0]} {parts[1]} {comment}"


def revoke_keys(python: str, marker: str) -> str:
    """Remove ``marker``'s lines from the user's authorized_keys with the edit program, which
    the command's stdin must carry. Every decision is the program's, under the file's lock: a
    look at the file before it could miss a line an edit under way was writing. ``-S``: the
    program needs the standard library only, and starts a third faster without ``site``."""
    return shlex.join([python, "-I", "-S", "-", "--marker", marker])


def link_master_argv(
    control: str,
    key_file: str,
    known_hosts: str,
    alias: str,
    key_type: str,
    user: str,
    address: str,
    port: int,
) -> list[str]:
    """An OpenSSH master connection to another host that carries forwards added later with
    :func:`link_forwards`; it reads no ssh config and checks the far host's key strictly."""
    options = {
        "IdentitiesOnly": "yes",
        "IdentityAgent": "none",
        "UserKnownHostsFile": known_hosts,
        "GlobalKnownHostsFile": "/dev/null",
        "StrictHostKeyChecking": "yes",
        "HostKeyAlias": alias,
        "BatchMode": "yes",
        "ConnectTimeout": str(LINK_CONNECT_TIMEOUT),
        **openssh_options.common(key_type),
        "ControlPersist": "no",
    }
    argv = ["ssh", "-F", "/dev/null", "-N", "-M", "-S", control, "-i", key_file]
    for name, value in options.items():
        argv += ["-o", f"{name}={value}"]
    return [*argv, "-p", str(int(port)), "-l", user, "--", address]


def link_alive(pid_files: Mapping[str, str]) -> str:
    """Print ``name=1`` for each link process (a master, a watch) whose pid, in the named file,
    runs, ``name=0`` for one that ended: one round trip for all of a host's links, no process
    started."""
    lines = [
        f"m=; {{ read -r m <{q(path)}; }} 2>/dev/null; "
        f'if running "$m"; then echo {q(name + "=1")}; else echo {q(name + "=0")}; fi'
        for name, path in pid_files.items()
    ]
    return "; ".join([RUNNING, *lines]) if lines else "true"


def link_forwards(
    control: str, ports: Iterable[int], cancel: bool = False, reverse: bool = False
) -> str:
    """Add (or cancel) 127.0.0.1:<port> here -> 127.0.0.1:<port> there on a link's master;
    ``reverse``: there -> here (``-R``: the far host's traffic to this one, on the same link)."""
    return _mux_call(control, _forward_options(ports, reverse), cancel)


def _forward_options(ports: Iterable[int], reverse: bool) -> list[str]:
    specs = [f"127.0.0.1:{int(p)}:127.0.0.1:{int(p)}" for p in sorted(set(ports))]
    if not specs:
        raise ValueError("no ports given")
    return [option for spec in specs for option in ("-R" if reverse else "-L", spec)]


def _mux_call(control: str, options: list[str], cancel: bool) -> str:
    op = "cancel" if cancel else "forward"
    return shlex.join(["ssh", "-F", "/dev/null", "-S", control, "-O", op, *options, "link"])


def link_forward_parts(
    control: str, parts: Mapping[str, tuple[Iterable[int], bool]], cancel: bool = False
) -> str:
    """Add (or cancel) several parts of one master's forwards — name -> (ports, reverse), as
    for :func:`link_forwards` — in one ``ssh -O`` call (each call costs its host about 8 ms of
    CPU); prints ``name=1`` for each part that was made, ``name=0`` for one that was not. When
    the call fails, each part is tried alone (the master answers a forward it already has as
    made), so one refused part does not take the others with it."""
    if not parts:
        raise ValueError("no forwards given")
    alone = [
        f"if {link_forwards(control, ports, cancel, reverse)} >/dev/null 2>&1; "
        f"then echo {q(name + '=1')}; else echo {q(name + '=0')}; fi"
        for name, (ports, reverse) in parts.items()
    ]
    if len(parts) == 1:
        return alone[0]
    options = [o for ports, reverse in parts.values() for o in _forward_options(ports, reverse)]
    whole = _mux_call(control, options, cancel)
    made = "; ".join(f"echo {q(name + '=1')}" for name in parts)
    return f"if {whole} >/dev/null 2>&1; then {made}; else {'; '.join(alone)}; fi"


#: Seconds between two looks at the links being dialled.
LINK_STATE_PAUSE = 0.1


def link_states(controls: Mapping[str, str], pids: Mapping[str, int], timeout: float) -> str:
    """Wait (one deadline of ``timeout`` s for all, counted in pauses) for each link's master
    to be up; print ``name=1`` when it is, ``name=0`` when its process ended or time ran out.

    A master is up once its control socket exists: OpenSSH creates it after logging in. Only
    builtins and one ``sleep`` per pause (asking each master with ``ssh -O check`` and reading
    the clock started three processes per pause on every host, while the links' handshakes
    needed the cores). The wait also ends with the SSH session that runs it (its parent): a
    controller that died leaves no loop behind.
    """
    pauses = max(1, int(timeout / LINK_STATE_PAUSE))
    checks = ["i=0"]
    for name, control in controls.items():
        made, runs = f"[ -S {q(control)} ]", f"kill -0 {int(pids[name])} 2>/dev/null"
        checks.append(
            f'while ! {made} && {runs} && kill -0 "$PPID" 2>/dev/null && [ $i -lt {pauses} ]; '
            f"do sleep {LINK_STATE_PAUSE:g}; i=$((i+1)); done; "
            f"if {made} && {runs}; then echo {q(name + '=1')}; else echo {q(name + '=0')}; fi"
        )
    return "; ".join(checks)
