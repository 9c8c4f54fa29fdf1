"""An OpenSSH master connection from this machine to one host, carrying that host's forwards.

paramiko moves every forwarded byte through Python. Measured here on 2026-12-07 (two test hosts,
256 MiB pushed from one host to a port of the other through this machine, -R into -L): 110-160
MiB/s at 10-13 machine CPU-seconds per GiB with paramiko's forwards, 360-455 MiB/s at 4 with the
same forwards on two OpenSSH masters (aes128-gcm). So a tunnelled cluster puts its forwards on a
master per host where one comes up, and keeps paramiko's for the rest (see :class:`MasterForward`).

A master is the user's own ``ssh``: their ssh config (the one the runtime resolved), keys and
agent; with no prompt (``BatchMode``: a host that needs a password or a passphrase keeps
paramiko), no forwards of the config's own (``ClearAllForwardings``), one waiting command (see
SESSION), and the host key pinned to the one our paramiko connection verified (a known_hosts
file of its own). Its
control socket is in a 0700 folder of its own. A host reached through a jump host or a proxy
command is reached the same way (the runtime's ``ProxyJump`` or ``ProxyCommand``): the hops
are the user's ssh's, checked by their config, while the pin still covers the host the
forwards end at, so a hop sees only that session's ciphertext.

The master runs in a process session of its own (a Ctrl-C at the controller does not cut it
before the cleanup) and ends with this process: the shell that starts it reads a pipe from us
and sends the master a TERM when that pipe reaches its end (our close, or our death).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence

from lazycluster_tasks import openssh_options
from lazycluster_tasks.errors import TunnelError
from lazycluster_tasks.ssh_settings import SSHSettings

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
#: Seconds a master has to come up beyond its connect timeout.
START_MARGIN = 5.0
#: Seconds one control request (add or cancel forwards) may take.
REQUEST_TIMEOUT = 10.0
#: The name the pinned host key is filed under (HostKeyAlias).
PINNED = "lazycluster-pinned"
#: The master's session: a command that waits, on a terminal (``-tt``). OpenSSH turns Nagle's
#: algorithm off (TCP_NODELAY, both ends) only for a connection with an interactive session;
#: a master of forwards alone (``-N``) left it on, and each small message the host's sshd sent
#: waited for the previous one's acknowledgement, which this end delays: a Dask task's round
#: trip took 35-37 ms through such masters against 13 through paramiko, and 11.5-13.8 with
#: this session (2026-12-07, 3 hosts). It prints READY, then reads its input until that ends:
#: the terminal hangs up with the connection, and without a terminal sshd's pipe closes. (A
#: ``sleep`` there outlived a connection that had no terminal, or lost it while starting.) The
#: ``cat`` copies nothing: no input ever comes. A host that grants no terminal (``PermitTTY
#: no``) ends a ``-tt`` master, so it gets one started again without (``-T``): Nagle's
#: algorithm then stays on.
READY = "lct-session"
SESSION = f"echo {READY}; exec cat"
#: What ssh prints when the host refused the terminal; with ``-tt`` it then ends.
NO_TERMINAL = "PTY allocation request failed"

# Started by `sh -c` in a process group of its own, with the master's folder as $0. The pipe
# from us is the master's input (it never ends before we do) and the reader's: at its end a
# subshell removes the folder (so a killed controller leaves nothing here), then TERMs the
# master. The shell waits for the master (its pid is not reused meanwhile), then ends the
# subshell and exits with the master's status.
_WRAPPER = (
    'exec 3<&0 </dev/null; "$@" <&3 3<&- & p=$!; '
    '(read -r _ <&3; rm -rf -- "$0"; kill -TERM "$p" 2>/dev/null) & '
    'r=$!; exec 3<&-; wait "$p"; s=$?; kill "$r" 2>/dev/null; exit "$s"'
)


def usable(settings: SSHSettings) -> str | None:
    """Why a master cannot replace paramiko's forwards to this host (None: it may)."""
    if shutil.which("ssh") is None:
        return "this machine has no ssh client"
    return None


class OpenSSHMaster:
    """``ssh -M`` to one host; forwards are added to it and cancelled through its control
    socket (``ssh -O forward``/``-O cancel``), each request bounded."""

    def __init__(self, settings: SSHSettings, key_type: str, key_base64: str) -> None:
        self.settings = settings
        self.host = settings.alias
        self._key = (key_type, key_base64)
        self._folder: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._lock = threading.Lock()  # one start at a time
        self._tty = True  # False once the host refused the session a terminal (see SESSION)
        #: how many times it started: forwards added before the last start are gone
        self.generation = 0

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        proc = self._proc
        return bool(not self._closed and proc is not None and proc.poll() is None)

    def start(self) -> None:
        """Start the master (again, after it ended); TunnelError when it does not come up."""
        with self._lock:
            if self._closed:
                raise TunnelError(f"the OpenSSH master to {self.host} is closed")
            if self.alive:
                return
            self._end()
            self._launch()
            if self._wait_session() or not self._tty:
                return
            logger.info(
                "%s grants no terminal: its OpenSSH master runs without one (Nagle's algorithm"
                " stays on for its forwards)",
                self.host,
            )
            self._tty = False
            self._end()
            self._launch()
            self._wait_session()

    def restart(self, generation: int) -> None:
        """Start the master anew on a connection of its own if it is still the start numbered
        ``generation`` (a request that got no answer saw that one): a path that was cut can
        leave a live master whose connection carries nothing for many seconds more (TCP's
        retransmissions back off while it is cut), where a new connection works at once. Its
        forwards come back on the new one (the keeper, see :class:`MasterForward`)."""
        with self._lock:
            if self._closed or self.generation != generation or self._proc is None:
                return
            logger.info("%s: its OpenSSH master carries nothing; started anew", self.host)
            self._end()
        self.start()

    def check(self, timeout: float) -> bool:
        """True when a round trip through the master's connection (a forward the host must
        answer) takes less than ``timeout``; a master that gets no answer is started anew. A
        refusal is an answer."""
        if not self.alive:
            return False
        generation = self.generation
        with contextlib.suppress(TunnelError):
            self.settle(timeout)
        return self.generation == generation

    def _launch(self) -> None:
        folder = self._folder
        if folder is None or not os.path.isdir(folder):
            folder = tempfile.mkdtemp(prefix="lct-ssh-")  # 0700
        self._folder = folder
        key_type, key = self._key
        with open(os.path.join(folder, "known_hosts"), "w") as f:
            f.write(f"{PINNED} {key_type} {key}\n")
        for name in ("c", "log"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))
        log = open(os.path.join(folder, "log"), "wb")  # noqa: SIM115 - the child holds it
        try:
            self._proc = subprocess.Popen(
                ["sh", "-c", _WRAPPER, folder, *self._argv()],
                # no prompt anywhere, a hop's ssh (which gets no BatchMode) included: it has no
                # terminal (a session of its own), and no askpass program is ever run
                env={**os.environ, "SSH_ASKPASS_REQUIRE": "never"},
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        except OSError as exc:
            raise TunnelError(f"no OpenSSH master to {self.host}: {exc}") from exc
        finally:
            log.close()
        self.generation += 1

    def _wait_session(self) -> bool:
        """Wait for the master's session to run (its READY line); False when the master ended
        because the host grants no terminal, TunnelError for any other end."""
        proc = self._proc
        assert proc is not None and self._folder is not None
        deadline = time.monotonic() + self.settings.connect_timeout + START_MARGIN
        log = os.path.join(self._folder, "log")
        while True:
            with contextlib.suppress(OSError), open(log, "rb") as f:
                if READY.encode() in f.read() and os.path.exists(self.control):
                    return True
            ended = proc.poll() is not None
            if ended or time.monotonic() > deadline:
                why = self._log() or (f"exited {proc.returncode}" if ended else "no answer")
                self._end()
                if ended and self._tty and NO_TERMINAL in why:
                    return False
                raise TunnelError(f"no OpenSSH master to {self.host}: {why}")
            time.sleep(0.01)

    def _argv(self) -> list[str]:
        s = self.settings
        assert self._folder is not None
        options = {
            "BatchMode": "yes",
            "ControlPersist": "no",
            "ClearAllForwardings": "yes",
            "ExitOnForwardFailure": "no",
            "ForwardAgent": "no",
            "ForwardX11": "no",
            "PermitLocalCommand": "no",
            "RemoteCommand": "none",
            "HostName": s.hostname,
            "HostKeyAlias": PINNED,
            "UserKnownHostsFile": os.path.join(self._folder, "known_hosts"),
            "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "yes",
            "UpdateHostKeys": "no",
            "CheckHostIP": "no",
            "ConnectTimeout": str(max(1, round(s.connect_timeout))),
            **openssh_options.common(self._key[0]),
            "LogLevel": "INFO",  # a refused channel open is logged at INFO
        }
        if not s.allow_agent:
            options["IdentityAgent"] = "none"
        if s.proxy_jump:  # the hops' own ssh reads the same config (-F), not these options
            options["ProxyJump"] = s.proxy_jump
        elif s.proxy_command:  # with its %-tokens, which ssh expands as paramiko did
            options["ProxyCommand"] = s.proxy_command
        argv = ["ssh"]
        if s.ssh_config_path:
            argv += ["-F", s.ssh_config_path]
        argv += ["-tt" if self._tty else "-T", "-M", "-S", self.control, "-p", str(int(s.port))]
        if s.username:
            argv += ["-l", s.username]
        for path in s.key_filenames:
            argv += ["-i", path]
        for path in s.certificate_files:
            argv += ["-o", f"CertificateFile={path}"]
        for name, value in options.items():
            argv += ["-o", f"{name}={value}"]
        return [*argv, "--", s.alias, SESSION]

    @property
    def control(self) -> str:
        assert self._folder is not None
        return os.path.join(self._folder, "c")

    def _log(self) -> str:
        if self._folder is None:
            return ""
        try:
            with open(os.path.join(self._folder, "log"), "rb") as f:
                text = f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""
        return " ".join(text.split())

    def open_refused(self) -> str | None:
        """How the host's sshd refused to open a connection of a -L forward, as the master
        logged it (its policy: AllowTcpForwarding, PermitOpen); None when it did not."""
        found = re.findall(r"open failed: ([^:]*(?:prohibited|refused)[^:]*)", self._log())
        return found[-1].strip() if found else None

    def _end(self) -> None:
        """End the master process, if one runs: its pipe closed (the TERM), then a KILL."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(2.0)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the shell, the master and the reader
            proc.wait(5.0)

    def close(self) -> None:
        """End the master and every connection it carries; remove its folder."""
        with self._lock:
            self._closed = True
            self._end()
            folder, self._folder = self._folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    # -- forwards -------------------------------------------------------------------------

    def forward(
        self, local: Sequence[tuple[int, int]] = (), remote: Sequence[tuple[int, int]] = ()
    ) -> list[int]:
        """Add ``-L`` forwards (our port, the host's port) and ``-R`` forwards (the host's
        port, our port; 0: one the host picks) in one request; returns the ports the host
        picked, in order. TunnelError when the master refused any (which of them were added
        is not known: cancel them all)."""
        out = self._request("forward", local, remote)
        return [int(word) for word in out.split()]

    def cancel(
        self, local: Sequence[tuple[int, int]] = (), remote: Sequence[tuple[int, int]] = ()
    ) -> None:
        """Cancel forwards; the connections open on them go on until they end (a host's sshd
        takes a -R cancel without answering: see :meth:`settle`)."""
        self._request("cancel", local, remote)

    def settle(self, timeout: float | None = None) -> None:
        """Return once the host's sshd handled every request sent before: a forward it must
        answer (a port it picks, cancelled again) goes after them on the same connection."""
        out = self._request("forward", (), [(0, 9)], timeout)
        if out.split():
            with contextlib.suppress(TunnelError):
                self._request("cancel", (), [(int(out.split()[0]), 9)], timeout)

    def _request(
        self,
        op: str,
        local: Sequence[tuple[int, int]],
        remote: Sequence[tuple[int, int]],
        timeout: float | None = None,
    ) -> str:
        """One control request, bounded by ``timeout`` (REQUEST_TIMEOUT): a master whose host
        does not answer it is started anew (see :meth:`restart`) before the TunnelError ("no
        answer")."""
        timeout = REQUEST_TIMEOUT if timeout is None else timeout
        specs: list[str] = []
        for ours, theirs in local:
            specs += ["-L", f"{LOOPBACK}:{int(ours)}:{LOOPBACK}:{int(theirs)}"]
        for theirs, ours in remote:
            specs += ["-R", f"{LOOPBACK}:{int(theirs)}:{LOOPBACK}:{int(ours)}"]
        if not specs:
            return ""
        if not self.alive:
            raise TunnelError(f"the OpenSSH master to {self.host} is not running")
        argv = ["ssh", "-S", self.control, "-O", op, *specs, "--", self.host]
        generation = self.generation
        try:
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            with contextlib.suppress(TunnelError):  # its forwards' keeper tries again
                self.restart(generation)
            raise TunnelError(
                f"{self.host}: the OpenSSH master's {op} got no answer in {timeout:g} s"
            ) from None
        except OSError as exc:
            raise TunnelError(f"{self.host}: the OpenSSH master's {op} failed: {exc}") from exc
        if done.returncode != 0:
            why = " ".join(done.stderr.decode(errors="replace").split())
            raise TunnelError(f"{self.host}: the OpenSSH master's {op} failed: {why}")
        return done.stdout.decode(errors="replace")

    def __repr__(self) -> str:
        return f"<OpenSSHMaster {self.host} {'up' if self.alive else 'down'}>"
