"""Reading OpenSSH client configs as people write them: discovery and resolution.

Two questions, two tools:

* **Which hosts does a config define?** (:func:`config_hosts`) A small reader of ``Host``,
  ``Match`` and ``Include`` lines. A ``Host`` line with several patterns is ONE host, named by
  its first pattern without wildcards (``*``, ``?``) or negation (``!x``); lines of wildcards
  only (``Host *``) are defaults, never hosts.
* **What are the settings of one alias?** (:func:`resolve`) OpenSSH itself answers:
  ``ssh -G -F - <alias>`` prints the fully resolved configuration (first value wins, ``Host *``
  defaults, multi-pattern lines, ``Match``, ``ProxyJump``/``ProxyCommand`` precedence). It costs
  one short subprocess per alias (~10 ms), runs without a shell (argv list), and is bounded by
  :data:`RESOLVE_TIMEOUT`. Without an ``ssh`` binary (or with
  ``LAZYCLUSTER_SSH_CONFIG_RESOLVER=paramiko``)
  paramiko's ``SSHConfig`` resolves instead; it honours ``Match`` host/originalhost/user/
  localuser/canonical/final/all, and any other criterion (``exec``: paramiko runs it through
  invoke, which reads our stdin; ``localnetwork``, ``tagged``...) is a ValueError that names the
  file and line, never silently ignored.

Both read the same *flattened* text: this module expands ``Include`` itself, so discovery and
resolution always agree and paramiko (which has no ``Include``) gets it too:

* arguments are globbed (sorted, as glob(3)); a pattern that matches nothing is skipped, as in
  OpenSSH; nesting is allowed up to 16 levels;
* ``~`` is the home directory of ``$HOME`` (Python's ``expanduser``), and a relative path is
  relative to ``~/.ssh`` -- also for a config given by path, because OpenSSH treats ``-F`` files
  as user configs. (OpenSSH would take ``~`` from the passwd entry; the two differ only when
  ``$HOME`` is overridden, and then we follow ``$HOME``.)
* an ``Include`` inside a ``Host``/``Match`` block applies only to that block: the included
  file's own ``Host X`` lines become ``Match originalhost <outer> originalhost X`` (the outer
  condition AND X, which is what OpenSSH evaluates), and the enclosing block resumes after it.

With no path, ``~/.ssh/config`` is read (the system-wide ``/etc/ssh/ssh_config`` is not).
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import paramiko

from lazycluster_tasks.settings import settings

logger = logging.getLogger(__name__)

DEFAULT_SSH_CONFIG = "~/.ssh/config"
#: Upper bound (s) of one ``ssh -G`` run (a ``Match exec`` command runs inside it).
RESOLVE_TIMEOUT = 10.0
#: OpenSSH's READCONF_MAX_DEPTH.
MAX_INCLUDE_DEPTH = 16
#: ``openssh`` (``ssh -G``), ``paramiko``, or unset: ``ssh -G`` when ``ssh`` is installed.
RESOLVER_ENV = "LAZYCLUSTER_SSH_CONFIG_RESOLVER"
RESOLVERS = ("openssh", "paramiko")
#: Match criteria paramiko's SSHConfig evaluates (the fallback resolver).
PARAMIKO_MATCH_CRITERIA = frozenset(
    {"all", "canonical", "final", "host", "originalhost", "user", "localuser"}
)
#: What ``ssh -G`` lists as IdentityFile when the config names none.
OPENSSH_DEFAULT_IDENTITIES = frozenset(
    f"~/.ssh/id_{k}" for k in ("rsa", "ecdsa", "ecdsa_sk", "ed25519", "ed25519_sk", "xmss", "dsa")
)
#: Options that may appear several times and accumulate.
MULTI_VALUED = frozenset(
    {"identityfile", "certificatefile", "localforward", "remoteforward", "dynamicforward"}
)

_KEYWORD = re.compile(r"\s*([^\s=]+)\s*(?:=\s*)?(.*)")


def is_concrete(pattern: str) -> bool:
    """A pattern that names one host: no wildcard, no negation."""
    return not pattern.startswith("!") and not any(c in pattern for c in "*?")


def pattern_list_matches(patterns: Iterable[str], name: str) -> bool:
    """OpenSSH's pattern-list match: any positive pattern matches and no negated one does."""
    name = name.lower()
    matched = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if fnmatchcase(name, pattern.lstrip("!").lower()):
            if negated:
                return False
            matched = True
    return matched


@dataclass(frozen=True)
class HostEntry:
    """One ``Host`` line of a config: a host with one or more names."""

    name: str  # the first concrete pattern
    patterns: tuple[str, ...]
    origin: str  # file:line


@dataclass
class FlatConfig:
    """A config with its Includes expanded into one text; see the module docstring."""

    path: str | None
    lines: list[str] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)  # file:line of every flattened line
    hosts: list[HostEntry] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # every file read, in order

    @property
    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)

    def emit(self, line: str, origin: str) -> None:
        self.lines.append(line)
        self.origins.append(origin)

    def origin_of(self, line_number: int) -> str:
        """The file:line that a line (1-based) of the flattened text came from."""
        if 1 <= line_number <= len(self.origins):
            return self.origins[line_number - 1]
        return f"line {line_number}"


def _home() -> str:
    return os.path.expanduser("~")


def _split_args(text: str, origin: str) -> list[str]:
    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=False)
        lexer.whitespace_split = True
        lexer.commenters = ""
        args = list(lexer)
    except ValueError as exc:
        raise ValueError(f"{origin}: cannot parse {text!r}: {exc}") from None
    for i, arg in enumerate(args):
        if arg.startswith("#"):  # a trailing comment, as OpenSSH reads it
            return args[:i]
    return args


def _include_paths(arg: str) -> list[str]:
    path = os.path.expanduser(arg)
    if not os.path.isabs(path):
        path = os.path.join(_home(), ".ssh", path)
    return sorted(glob.glob(path))


@dataclass(frozen=True)
class _Block:
    """The condition of the block being read: criteria ANDed into a Match line."""

    header: str | None  # the line that opens it (None: the top of the config)
    criteria: tuple[str, ...]  # Match criteria text; () means always
    host_lists: tuple[tuple[str, ...], ...]  # Host pattern lists that must all match


def _quote(arg: str, origin: str) -> str:
    """An argument for a Match line (OpenSSH reads double quotes only)."""
    if not arg or any(c.isspace() for c in arg) or "#" in arg:
        if '"' in arg:
            raise ValueError(f"{origin}: cannot carry {arg!r} into a Match line")
        return f'"{arg}"'
    return arg


def _match_criteria(args: list[str], origin: str) -> tuple[str, ...]:
    """The criteria of a Match line (``all`` dropped: it is what no criteria means)."""
    return tuple(_quote(a, origin) for a in args if a.lower() != "all")


def _host_criterion(patterns: tuple[str, ...], origin: str) -> str:
    return "originalhost " + _quote(",".join(patterns), origin)


def _read(flat: FlatConfig, path: str, outer: _Block, depth: int, seen: tuple[str, ...]) -> bool:
    """Append the lines of ``path`` under ``outer``; True if it opened a block of its own."""
    real = os.path.realpath(path)
    if real in seen:
        raise ValueError(f"{path}: Include loop ({' -> '.join([*seen, real])})")
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            raw_lines = handle.read().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read ssh config {path!r}: {exc}") from None
    flat.files.append(path)
    block = outer
    opened = False
    for number, raw in enumerate(raw_lines, 1):
        origin = f"{path}:{number}"
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = _KEYWORD.match(stripped)
        if m is None:  # pragma: no cover - the regex matches every non-empty line
            continue
        keyword, rest = m.group(1).lower(), m.group(2)
        if keyword == "host":
            patterns = tuple(_split_args(rest, origin))
            if not patterns:
                raise ValueError(f"{origin}: Host line without a pattern")
            criteria = (*outer.criteria, _host_criterion(patterns, origin))
            if outer.criteria:  # inside a block of an including file: both must match
                header = "Match " + " ".join(criteria)
            else:
                header = "Host " + " ".join(patterns)
            block = _Block(header, criteria, (*outer.host_lists, patterns))
            flat.emit(header, origin)
            opened = True
            concrete = [p for p in patterns if is_concrete(p)]
            if concrete and all(pattern_list_matches(h, concrete[0]) for h in outer.host_lists):
                flat.hosts.append(HostEntry(concrete[0], patterns, origin))
        elif keyword == "match":
            args = _split_args(rest, origin)
            if not args:
                raise ValueError(f"{origin}: Match line without criteria")
            criteria = (*outer.criteria, *_match_criteria(args, origin))
            header = "Match " + (" ".join(criteria) or "all")
            block = _Block(header, criteria, outer.host_lists)
            flat.emit(header, origin)
            opened = True
        elif keyword == "include":
            if depth >= MAX_INCLUDE_DEPTH:
                raise ValueError(f"{origin}: Include nested deeper than {MAX_INCLUDE_DEPTH}")
            for arg in _split_args(rest, origin):
                for included in _include_paths(arg):
                    if os.path.isdir(included):
                        continue
                    if _read(flat, included, block, depth + 1, (*seen, real)):
                        # the included file opened blocks: resume the enclosing one
                        flat.emit(block.header or "Match all", origin)
        else:
            flat.emit(stripped, origin)
    return opened


def flatten(ssh_config_path: str | None = None) -> FlatConfig | None:
    """The config with its Includes expanded; None when there is no (default) config.

    Without a path: ``LAZYCLUSTER_SSH_CONFIG``, else ``~/.ssh/config`` (the CLI and the Python
    API read the same one). A path given, here or by that variable, must exist (ValueError).
    """
    given = ssh_config_path or settings().ssh_config
    path = os.path.expanduser(given or DEFAULT_SSH_CONFIG)
    if not os.path.exists(path):
        if given:
            raise ValueError(f"ssh config file not found: {given!r}")
        return None
    flat = FlatConfig(path)
    _read(flat, path, _Block(None, (), ()), 0, ())
    return flat


def config_hosts(ssh_config_path: str | None = None) -> list[str]:
    """The hosts of an OpenSSH config, Includes followed, each once, in file order.

    Every ``Host`` line is one host, named by its first concrete pattern.
    """
    flat = flatten(ssh_config_path)
    if flat is None:
        return []
    names: dict[str, HostEntry] = {}
    for entry in flat.hosts:
        if entry.name in names:
            continue
        # a later Host line naming an alias an earlier line already covers is the same host
        if any(pattern_list_matches(e.patterns, entry.name) for e in names.values()):
            logger.debug("%s: %s is already a name of an earlier host", entry.origin, entry.name)
            continue
        names[entry.name] = entry
    return list(names)


# -- resolution ---------------------------------------------------------------------------------


def resolver() -> str:
    """The resolver in use: ``openssh`` or ``paramiko``; see the module docstring."""
    try:
        choice = settings().ssh_config_resolver
    except ValueError:
        raise ValueError(
            f"{RESOLVER_ENV} must be one of {RESOLVERS}, not {os.environ.get(RESOLVER_ENV)!r}"
        ) from None
    if choice:
        return choice
    return "openssh" if _ssh_binary() else "paramiko"


@functools.cache
def _ssh_binary() -> str | None:
    found = shutil.which("ssh")
    if found is None:
        logger.warning(
            "OpenSSH's ssh is not installed: ssh configs are resolved with paramiko's SSHConfig "
            "(install openssh-client for full fidelity)"
        )
    return found


def resolve(alias: str, ssh_config_path: str | None = None) -> dict[str, list[str]]:
    """The resolved options of ``alias`` (lower-case keys, every value a list of strings).

    Values are as OpenSSH prints them: tokens (``%h``...) and ``~`` in IdentityFile,
    CertificateFile and ProxyCommand are left for :func:`expand_tokens`.
    """
    if not alias or alias.startswith("-") or any(c.isspace() for c in alias):
        raise ValueError(f"invalid host name: {alias!r}")
    flat = flatten(ssh_config_path)
    if resolver() == "openssh":
        binary = _ssh_binary()
        if binary is None:
            raise ValueError(f"{RESOLVER_ENV}=openssh but no ssh binary is installed")
        return _resolve_openssh(binary, alias, flat)
    return _resolve_paramiko(alias, flat)


def _resolve_openssh(binary: str, alias: str, flat: FlatConfig | None) -> dict[str, list[str]]:
    text = flat.text if flat is not None else ""
    where = flat.path if flat is not None else "(no config)"
    argv = [binary, "-G", "-F", "/dev/stdin", "--", alias]
    try:
        done = subprocess.run(
            argv, input=text, capture_output=True, text=True, timeout=RESOLVE_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        raise ValueError(
            f"`ssh -G {alias}` did not finish within {RESOLVE_TIMEOUT:.0f}s reading {where} "
            "(a Match exec command that hangs?)"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot run {binary}: {exc}") from None
    if done.returncode != 0:
        message = _locate(done.stderr.strip(), flat)
        raise ValueError(f"ssh config {where} is not valid for {alias!r}: {message}")
    options: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key:
            options.setdefault(key.lower(), []).append(value.strip())
    return options


def _locate(stderr: str, flat: FlatConfig | None) -> str:
    """OpenSSH's messages about the flattened text, pointed at the original files."""
    lines = [
        line
        for line in stderr.splitlines()
        if line.strip() and "Pseudo-terminal will not be allocated" not in line
    ]
    text = " | ".join(lines) or "(no message)"
    if flat is None:
        return text
    text = re.sub(r"/dev/stdin:? line (\d+)", lambda m: flat.origin_of(int(m.group(1))), text)
    return text.replace("/dev/stdin", flat.path or "config")


def _resolve_paramiko(alias: str, flat: FlatConfig | None) -> dict[str, list[str]]:
    if flat is None:
        return {"hostname": [alias]}
    for line, origin in zip(flat.lines, flat.origins, strict=True):
        if line.lower().startswith("match "):
            _check_paramiko_match(_split_args(line[6:], origin), origin)
    try:
        config = paramiko.SSHConfig.from_text(flat.text)
        entry = config.lookup(alias)
    except Exception as exc:  # paramiko's parse errors carry no position
        raise ValueError(f"ssh config {flat.path} cannot be read by paramiko: {exc}") from exc
    options: dict[str, list[str]] = {}
    for key, value in entry.items():
        options[key] = [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return options


def _check_paramiko_match(args: list[str], origin: str) -> None:
    """A ValueError naming the line when paramiko cannot evaluate a Match criterion."""
    i = 0
    while i < len(args):
        kind = args[i].lstrip("!").lower()
        if kind not in PARAMIKO_MATCH_CRITERIA:
            raise ValueError(
                f"{origin}: `Match {args[i]}` cannot be evaluated without OpenSSH's ssh "
                f"(paramiko's SSHConfig knows {', '.join(sorted(PARAMIKO_MATCH_CRITERIA))})"
            )
        i += 1 if kind in ("all", "canonical", "final") else 2


def expand_tokens(
    value: str,
    *,
    hostname: str,
    port: int,
    username: str | None,
    alias: str,
) -> str:
    """OpenSSH's ``%`` tokens (``%h %p %r %n %u %d %l %%``) and a leading ``~``."""
    home = _home()
    table = {
        "h": hostname,
        "p": str(port),
        "r": username or _local_user(),
        "n": alias,
        "u": _local_user(),
        "d": home,
        "l": os.uname().nodename.split(".")[0],
        "%": "%",
    }

    def one(m: re.Match[str]) -> str:
        token = m.group(1)
        if token not in table:
            raise ValueError(f"unknown token %{token} in {value!r}")
        return table[token]

    out = re.sub(r"%(.)", one, value)
    if out.startswith("~"):
        out = os.path.expanduser(out)
    return out


def _local_user() -> str:
    import getpass

    return getpass.getuser()
