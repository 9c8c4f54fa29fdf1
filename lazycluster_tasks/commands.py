"""Pure builders of the shell lines we send to hosts.

Every value that goes into a line (paths, env values, host names, arguments) is quoted here with
``shlex.quote``; user commands given to ``RuntimeTask.run_command`` are the only text passed
through as shell code, by design. Nothing in this module does I/O: each function returns a
string (or an argv) and is tested as such. The Dask processes' argv: dask_argv.py; the SSH
links' lines: link_commands.py.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence

#: Exit code of our wrappers when ``cd`` into the working directory fails.
EXIT_NO_WORKDIR = 97

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def q(value: object) -> str:
    """Quote one value for a POSIX shell."""
    return shlex.quote(str(value))


def check_env_name(name: str) -> str:
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise ValueError(f"invalid environment variable name: {name!r}")
    return name


def export_env(env: Mapping[str, object]) -> str:
    """``export A='1' B='x y'`` for the given variables, or ``""`` when there are none."""
    if not env:
        return ""
    return "export " + " ".join(f"{check_env_name(k)}={q(v)}" for k, v in env.items())


def wrap_command(
    command: str,
    working_dir: str | None = None,
    env: Mapping[str, object] | None = None,
    tag: str = "",
) -> str:
    """The full line for a user command: report the shell's pid, export env, cd, run.

    The first line the shell prints is its pid (the process-group id of the SSH session or of the
    local subprocess), which lets the caller kill the whole command tree on timeout or cleanup.
    ``tag`` (letters, digits, ``-``) goes into the shell's command line as a comment: a kill
    long after can check that the pid is still the command's (:func:`kill_marked`).
    """
    if not isinstance(command, str) or not command.strip():
        raise ValueError("command must be a non-empty string")
    if not re.fullmatch(r"[A-Za-z0-9-]*", tag):
        raise ValueError(f"not a tag: {tag!r}")
    lines = [f'echo "$$"  # {tag}' if tag else 'echo "$$"']
    exported = export_env(env or {})
    if exported:
        lines.append(exported)
    if working_dir:
        lines.append(f"cd -- {q(working_dir)} || exit {EXIT_NO_WORKDIR}")
    lines.append(command)
    return "\n".join(lines)


def kill_group(pgids: Iterable[int], grace: float = 2.0) -> str:
    """TERM each process group, wait up to ``grace`` seconds, then KILL what is left.

    Prints ``left=<pgid>`` for groups that survived SIGKILL. Exit code 0.
    """
    ids = " ".join(str(int(p)) for p in pgids)
    if not ids:
        raise ValueError("no process group ids given")
    return f"{GROUP_SIGNAL}; {LIVE_GROUP}; ids={q(ids)}; {_terminate_ids(grace)}"


def _terminate_ids(grace: float, killed: Sequence[int] = ()) -> str:
    """Shell that TERMs the groups in $ids, waits, KILLs the rest, and reports survivors
    (``sig`` and ``live_ids`` defined before it).

    The grace is wall-clock time (a ``sleep`` in the background), not a count of polls: the
    processes just signalled make each poll slow on a busy host. In the grace and after KILL,
    :data:`LIVE_GROUP` tells a survivor from a zombie that its parent (often init) has not
    reaped yet — some inits take a second or more, and a stop that took zombies for processes
    waited its whole grace (measured: 0.47 s of a 0.5 s cleanup). A grace of 0
    KILLs at once (no TERM that nothing waits for). The first check after TERM or KILL comes
    before any pause and lists no process: most groups are gone by then. Every later check
    lists the processes where a leader is a zombie, the first at once when only zombie leaders
    are left (waiting for a slow init to reap them gains nothing), else after 10 ms.

    ``killed``: leaders whose groups were KILLed already (see :func:`kill_marked`): they get
    no TERM and no grace, and when only they are left the grace is skipped (it cost each
    host's stop a ``sleep`` and 50 ms more of a cleanup).
    """
    term = ""
    if grace > 0:
        # the groups to TERM: those not KILLed already
        listed = ",".join(str(int(p)) for p in killed)
        pick = (
            f'w=; for g in $ids; do case ",{listed}," in *",$g,"*) ;; *) w="$w $g";; esac; done; '
            if killed
            else "w=$ids; "
        )
        term = (
            f'{pick}if [ -n "$w" ]; then '
            # CONT after TERM: a stopped process acts on it instead of waiting for the KILL
            "for g in $w; do sig TERM $g; sig CONT $g; done; "
            f"sleep {float(grace):g} & t=$!; "
            # as after KILL: a group of zombies only (their reaper not quick) is not waited
            # for, and when no leader runs at the first check the listing follows at once; a
            # short first pause (most groups end on a TERM within milliseconds), then longer
            'i=0; while [ -n "$ids" ] && kill -0 $t 2>/dev/null; do '
            'if [ $i -lt 1 ]; then live_ids quick; [ -n "$c" ] || [ -z "$ids" ] || live_ids; '
            "else live_ids; fi; i=$((i+1)); "
            'if [ -n "$ids" ]; then if [ $i = 1 ]; then sleep 0.01; else sleep 0.05; fi; fi; '
            "done; kill $t 2>/dev/null; fi; "
        )
    return (
        f"{term}for g in $ids; do sig KILL $g; done; "
        # a quick check (no process listing) right after KILL, then listings: at once when
        # only zombie leaders are left ($c: the leaders that run), else after a pause (a short
        # first one: a KILLed process is gone within milliseconds)
        'live_ids quick; i=0; while [ -n "$ids" ] && [ $i -lt 20 ]; do '
        'if [ $i != 0 ]; then sleep 0.05; elif [ -n "$c" ]; then sleep 0.01; fi; '
        "live_ids; i=$((i+1)); done; "
        'for g in $ids; do echo "left=$g"; done; true'
    )


def mkdir_p(path: str) -> str:
    return f"mkdir -p -- {q(path)}"


#: Seconds before a removal that failed is tried once more.
REMOVE_AGAIN_AFTER = 0.2


def remove_tree(path: str) -> str:
    """``rm -rf``, tried once more after a pause when it fails: another host sharing the folder
    (a shared temp dir a sweep sees whole) may still be writing its last files there."""
    if path in ("", "/", "~"):
        raise ValueError(f"refusing to remove {path!r}")
    rm = f"rm -rf -- {q(path)}"
    return f"{{ {rm} 2>/dev/null || {{ sleep {REMOVE_AGAIN_AFTER:g}; {rm}; }}; }}"


def make_tempdir(prefix: str = "lazycluster-") -> str:
    """A fresh directory in the host's temp dir; prints its path."""
    return f"mktemp -d -t {q(prefix + 'XXXXXXXX')}"


def echo(message: str) -> str:
    return f"printf '%s\\n' {q(message)}"


def any_python(run: str, first: Sequence[str] = ()) -> str:
    """Run ``run`` (arguments to an interpreter) with the first Python 3 on the host's PATH:
    ``first``, then python3, then python3.X from the newest; exit 127 naming none found."""
    names = [*first, "python3", *(f"python3.{minor}" for minor in range(14, 7, -1))]
    return (
        f'for p in {" ".join(dict.fromkeys(names))}; do if command -v "$p" >/dev/null 2>&1; '
        f'then exec "$p" {run}; fi; done; echo "no python3 on the PATH" >&2; exit 127'
    )


def python_call(python: str, code: str, args: Sequence[str] = (), bare: bool = False) -> str:
    """Run ``code`` with ``python -c``; the interpreter is called by absolute path when given.
    ``bare``: for code that needs the standard library only: ``-I -S`` (no site, no user
    environment variables), an interpreter that starts in about half the time."""
    flags = ["-I", "-S"] if bare else []
    return shlex.join([python, *flags, "-c", code, *map(str, args)])


#: Exit code of a setup line that failed (see setup_file), and its log lines.
EXIT_SETUP = 96
SETUP_MARK = "[lazycluster] setup step"


def setup_file(lines: Sequence[str]) -> str:
    """The text of a file that ``.`` runs before a process starts: each line in turn (its
    output in the process's log), announced; the first that fails ends the start with
    EXIT_SETUP, naming its step. ``source`` works as in bash (``.``)."""
    text = 'source() { . "$@"; }\n'
    for number, line in enumerate(lines, 1):
        first = line.strip().splitlines()[0]
        text += f"printf '%s\\n' {q(f'{SETUP_MARK} {number}: {first}')}\n"
        text += f"{line}\n"
        text += (
            f"_lc_rc=$?; if [ $_lc_rc -ne 0 ]; then printf '%s failed (exit %s)\\n' "
            f"{q(f'{SETUP_MARK} {number}')} $_lc_rc; exit {EXIT_SETUP}; fi\n"
        )
    return text


def start_detached(
    command: Sequence[str],
    cwd: str,
    log_file: str,
    pid_file: str,
    env_file: str | None = None,
    setup_file: str | None = None,
) -> str:
    """Start ``command`` (argv) detached in its own session; prints its pid (= its pgid).
    ``env_file`` (relative to ``cwd``, see :func:`env_file`) is sourced first, then
    ``setup_file`` (see :func:`setup_file`), in the shell that then becomes the command.

    ``;`` after ``cd`` on purpose: ``cd DIR && setsid … &`` would background a subshell that holds
    the SSH channel open.
    """
    if not command:
        raise ValueError("empty command")
    run = f"setsid nohup {shlex.join(command)}"
    sourced = [f". ./{q(f)}" for f in (env_file, setup_file) if f is not None]
    if sourced:
        run = f"( {' && '.join(sourced)} && exec {run} )"
    return (
        f"cd -- {q(cwd)} || exit {EXIT_NO_WORKDIR}; "
        f"{run} >{q(log_file)} 2>&1 </dev/null & "
        f'echo "$!" >{q(pid_file)}; echo "$!"'
    )


def env_file(env: Mapping[str, object]) -> str:
    """The text of a file that ``.`` (source) turns into exported variables."""
    return "".join(f"export {check_env_name(k)}={q(v)}\n" for k, v in env.items())


def private_folder(path: str) -> str:
    """Create ``path`` (and parents) readable by the user only; later files too (umask)."""
    return f"umask 077 && mkdir -p -- {q(path)}"


def unpack_stdin(folder: str) -> str:
    """Unpack a tar read from stdin into ``folder`` (modes as archived, owned by the user)."""
    return f"tar -x -o -f - -C {q(folder)}"


#: ``sig SIGNAL ID`` signals the process group ID (``sig 0``: it has a member), for ids that may
#: be stale (a command's group that ended: its id may now be another process's).
GROUP_SIGNAL = 'sig() { kill -"$1" -"$2" 2>/dev/null; }'

#: ``sig`` for leaders whose command line was just checked (``marked_ids``): one that has no
#: group yet is signalled alone — a start's process between its fork and its ``setsid`` (a
#: cleanup right after the start's answer, on a busy host), which would otherwise escape.
MARKED_SIGNAL = 'sig() { kill -"$1" -"$2" 2>/dev/null || kill -"$1" "$2" 2>/dev/null; }'

#: ``proc_state PID`` sets ``$st`` to the process's state letter and what follows it in its
#: /proc entry, read by the shell itself (no process started); empty when there is none.
PROC_STATE = 'proc_state() { st=; { read -r st <"/proc/$1/stat"; } 2>/dev/null; st=${st##*) }; }'

#: ``live_ids`` keeps in ``$ids`` the groups that have a member that is not a zombie (a killed
#: process stays a zombie until its parent, often init, reaps it; that does not count as alive).
#: ``kill -0`` first; a group whose leader runs (its /proc entry, read by the shell itself) is
#: alive; only groups whose leader ended but that still have members need a process listing,
#: which scans every process of the machine (slow on a busy one, e.g. many hosts sharing a PID
#: space) — and hosts without /proc. ``live_ids quick`` skips that scan and keeps those groups
#: (their reaper usually takes them within milliseconds; the scan is for one that does not).
#: Needs ``sig`` (:data:`GROUP_SIGNAL` or :data:`MARKED_SIGNAL`).
LIVE_GROUP = (
    f"{PROC_STATE}; "
    'live_ids() { c=; s=; for g in $ids; do sig 0 "$g" || continue; '
    'proc_state "$g"; case "$st" in ""|Z*) s="$s $g";; *) c="$c $g";; esac; done; '
    'ids=$c; [ -n "$s" ] || return 0; [ "$1" != quick ] || { ids="$ids$s"; return 0; }; '
    'ids="$ids$(ps -e -o pgid=,stat= | awk -v ids="$s" '
    '\'BEGIN {n = split(ids, a, " "); for (i = 1; i <= n; i++) w[a[i]] = 1} '
    '($1 in w) && $2 !~ /^Z/ && !s[$1]++ {printf " %s", $1}\')"; }'
)

#: ``marked_ids`` reads pids from ``$pids`` (comma-separated) and sets ``$ids`` to those whose
#: command line mentions ``$marker``: read by the shell itself where there is /proc (``read``
#: drops the NULs between arguments; no process started), else one ``ps`` for all.
MARKED_IDS = (
    'marked_ids() { ids=; [ -n "$pids" ] || return 0; if [ -r /proc/self/cmdline ]; then '
    "set -f; o=$IFS; IFS=,; set -- $pids; IFS=$o; set +f; "
    'for p in "$@"; do [ -n "$p" ] || continue; l=; '
    '{ read -r l <"/proc/$p/cmdline"; } 2>/dev/null; '
    'case "$l" in *"$marker"*) ids="$ids $p";; esac; done; '
    'else ids=$(ps -ww -o pid=,args= -p "${pids#,}" 2>/dev/null '
    '| grep -F -- "$marker" | awk \'{printf " %s", $1}\'); fi; }'
)


#: Name of the guard's pid file in a cluster folder (see hostside.guard).
GUARD_PID = "guard.pid"


def guard_argv(
    python: str, folder: str, bundle: str, key_marker: str = "", remove: str = ""
) -> list[str]:
    """The host's guard of ``folder`` (see hostside.guard): run from the zip application
    ``bundle`` (a path in the folder, so its command line names the folder)."""
    argv = [python, "-I", "-S", bundle, "guard", "--folder", folder.rstrip("/")]
    if key_marker:
        argv += ["--key-marker", key_marker]
    if remove:
        argv += ["--remove", remove]
    return argv


def ensure_guard(argv: Sequence[str], folder: str) -> str:
    """Start the folder's guard unless one runs (its pid file names a live process whose
    command line names the folder); prints nothing."""
    marker = folder.rstrip("/") + "/"
    start = start_detached(
        argv, folder, posixpath.join(folder, "guard.log"), posixpath.join(folder, GUARD_PID)
    )
    return (
        f"{MARKED_IDS}; marker={q(marker)}; p=; "
        f"{{ read -r p <{q(posixpath.join(folder, GUARD_PID))}; }} 2>/dev/null; "
        'case "$p" in *[!0-9]*) p=;; esac; pids=",$p"; marked_ids; '
        f'if [ -z "$ids" ]; then {{ {start}; }} >/dev/null; fi'
    )


def stop_pid_files(pid_files: Sequence[str], marker: str, grace: float = 2.0) -> str:
    """Stop the process groups recorded in pid files, verify they are gone, remove the files.

    Only groups whose leader still mentions ``marker`` in its command line are signalled, so a
    pid reused by an unrelated process since is left alone. Prints ``left=<pgid>`` for any group
    that survived SIGKILL; then the files stay and the line exits non-zero.
    """
    if not pid_files:
        raise ValueError("no pid files given")
    return _stop_groups(" ".join(q(f) for f in pid_files), marker, grace)


def kill_marked(pids: Sequence[int], marker: str) -> str:
    """KILL the process groups of these leaders whose command line still mentions ``marker``
    (a pid reused since is left alone) and return at once: nothing waits for them to end (the
    stop that follows verifies). Exit code 0."""
    if not pids:
        raise ValueError("no pids given")
    listed = ",".join(str(int(p)) for p in pids)
    return (
        f"{MARKED_SIGNAL}; {MARKED_IDS}; marker={q(marker)}; pids=,{listed}; marked_ids; "
        'for g in $ids; do sig KILL "$g"; done; true'
    )


def stop_folder(
    folder: str, grace: float = 2.0, spare_guard: bool = False, kill_first: Sequence[int] = ()
) -> str:
    """Like :func:`stop_pid_files` for every ``*.pid`` file in ``folder`` (teardown by folder).
    ``spare_guard``: not the guard's (:func:`ask_guard` TERMed it; :func:`await_guard` ends it).
    ``kill_first``: leaders whose groups are KILLed before anything else, without a grace."""
    base = _cluster_folder(folder)
    skip = f"{base}/{GUARD_PID}" if spare_guard else ""
    stop = _stop_groups(f"{q(base)}/*.pid", base + "/", grace, skip, kill_first)
    return f"{kill_marked(kill_first, base + '/')}; {stop}" if kill_first else stop


def _cluster_folder(folder: str) -> str:
    """``folder`` without its trailing slashes; ValueError for none, ``/`` or ``~``."""
    base = folder.rstrip("/")
    if base in ("", "~"):
        raise ValueError(f"refusing to use folder {folder!r}")
    return base


def stop_edits(folder: str, flag: str, pid_files: str) -> str:
    """Before a revoke of the lines that let keys into this host: write ``flag`` in ``folder``
    (no edit adds lines once it is there) and KILL the edits whose pid files match the glob
    ``pid_files`` there, until they are gone (see hostside.authorized_keys). Cheap when none
    runs: shell builtins only."""
    base = _cluster_folder(folder)
    return f"{{ printf '' >{q(f'{base}/{flag}')}; }} 2>/dev/null; " + _stop_groups(
        f"{q(base)}/{pid_files}", base + "/", 0.0
    )


def ask_guard(folder: str, ask: str, answer: str, marker: str) -> str:
    """Write ``marker`` to ``ask`` (an answer left from before removed) and TERM the folder's
    guard (and CONT: a stopped one acts on it too), which then revokes those lines of
    authorized_keys and writes the edit's answer to ``answer`` (hostside.guard). Sets ``$gp``
    to the guard's pid ("" when none runs)."""
    pid_file = f"{folder.rstrip('/')}/{GUARD_PID}"
    return (
        f"{MARKED_IDS}; rm -f -- {q(answer)}; "
        f"{{ printf '%s\\n' {q(marker)} >{q(ask)}; }} 2>/dev/null; "
        f'p=; {{ read -r p <{q(pid_file)}; }} 2>/dev/null; case "$p" in *[!0-9]*) p=;; esac; '
        f'marker={q(folder.rstrip("/") + "/")}; pids=",$p"; marked_ids; gp=${{ids# }}; '
        '[ -z "$gp" ] || { kill -TERM "$gp"; kill -CONT "$gp"; } 2>/dev/null'
    )


def await_guard(wait: float) -> str:
    """Wait up to ``wait`` seconds for the guard :func:`ask_guard` TERMed to end, then KILL
    it; ``left=PID`` and ``s=1`` when it survives that."""
    polls = max(1, int(wait / 0.02))
    return (
        f"{RUNNING}; i=0; "
        f'while running "$gp" && [ $i -lt {polls} ]; do sleep 0.02; i=$((i+1)); done; '
        'if running "$gp"; then kill -KILL "$gp" 2>/dev/null; sleep 0.1; '
        'if running "$gp"; then echo "left=$gp"; s=1; fi; fi'
    )


def release_env(lease: str) -> str:
    """Remove the hold of the cluster whose folder is named ``lease`` on the user's
    environments (hostside.envs: ``envs/<key>/leases/<lease>``); never fails."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", lease):
        raise ValueError(f"not a cluster folder's name: {lease!r}")
    base = '"${XDG_CACHE_HOME:-$HOME/.cache}/lazycluster/envs"'
    return f"rm -f {base}/*/leases/{q(lease)} 2>/dev/null || true"


def _stop_groups(
    files: str, marker: str, grace: float, skip: str = "", killed: Sequence[int] = ()
) -> str:
    spared = f'[ "$f" != {q(skip)} ] || continue; ' if skip else ""
    return (
        f"{MARKED_SIGNAL}; {LIVE_GROUP}; {MARKED_IDS}; marker={q(marker)}; "
        f'pids=; for f in {files}; do {spared}[ -r "$f" ] || continue; read p <"$f"; '
        'case "$p" in *[!0-9]*|"") continue;; esac; pids="$pids,$p"; done; '
        "marked_ids; "
        f"{_terminate_ids(grace, killed)}; "
        # a survivor keeps its pid file (a later stop must still find it) and fails the line,
        # so a folder removal chained with && keeps the folder too
        f'if [ -n "$ids" ]; then false; else rm -f {files}; fi'
    )


#: ``running PID`` succeeds when the process runs and is no zombie: its /proc entry, read by the
#: shell itself (no process started: checks of hundreds of processes cost nothing), or
#: ``kill -0`` where there is no /proc.
RUNNING = (
    f"{PROC_STATE}; "
    'running() { [ -n "$1" ] || return 1; proc_state "$1"; case "$st" in Z*) return 1;; '
    '"") [ ! -r /proc/self/stat ] && kill -0 "$1" 2>/dev/null;; *) return 0;; esac; }'
)


def leader_states(leaders: Mapping[str, int]) -> str:
    """Print ``name=1`` for each named process whose leader (pid) runs and is no zombie, else
    ``name=0`` (a cheap check: no process listing, no process started)."""
    checks = [
        f"if running {int(pid)}; then echo {q(name + '=1')}; else echo {q(name + '=0')}; fi"
        for name, pid in leaders.items()
    ]
    return "; ".join([RUNNING, *checks]) if checks else "true"


def python_program(python: str, args: Sequence[str] = ()) -> str:
    """Run a program read from stdin with ``python`` in isolated mode (no PYTHON* variables,
    no user site-packages, nothing imported from the working dir): ``python -I - ARGS``."""
    return shlex.join([python, "-I", "-", *map(str, args)])


#: Runs a program sent on stdin ahead of its input: ``<source> NUL <input>``; the program reads
#: the input as its stdin.
_SPLIT_STDIN = (
    "import io, sys; d = sys.stdin.buffer.read(); i = d.index(b'\\0'); "
    "sys.stdin = io.TextIOWrapper(io.BytesIO(d[i + 1:]), encoding='utf-8'); "
    "exec(compile(d[:i], '<stdin>', 'exec'), {'__name__': '__main__'})"
)


def python_program_with_input(python: str, args: Sequence[str] = ()) -> str:
    """Like :func:`python_program`, for a program that also reads input: the command's stdin
    is the program's source, a NUL byte, then the input (which may be of any length, unlike a
    command line: one argument holds at most 128 KiB on Linux)."""
    return shlex.join([python, "-I", "-c", _SPLIT_STDIN, *map(str, args)])
