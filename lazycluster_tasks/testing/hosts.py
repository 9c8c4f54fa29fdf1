"""SSH test hosts on one machine.

As root every host is a network namespace on a private bridge, with its own hostname (UTS
namespace), host keys and sshd on port 22. Without root there is one loopback host: sshd as the
current user on a free port of 127.0.0.1. Force a mode with LCT_TEST_HOSTS_MODE=netns|loopback.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import os
import pwd
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"
#: Each namespaced host's sshd runs under tini as a child subreaper: the processes its sessions
#: leave detached are reaped as soon as they end, as a host's init (systemd) does. Without it
#: they fall to this machine's PID 1, which may reap them seconds later (this VM's does).
REAPER = shutil.which("tini")
NETNS_DIR = Path("/run/netns")
MARKER_DIR = Path("/run")
SSHD_NAMES = ("sshd", "sshd-session", "sshd-auth")
MODE_ENV = "LCT_TEST_HOSTS_MODE"
#: Which paths a test network leaves open (see TestHosts.set_network).
TOPOLOGIES = ("open", "isolated", "ssh-only", "no-connect-back")
#: Outgoing rules match connection attempts only (a SYN without ACK): the resets a host's
#: firewall sends back must still leave it.
SYN = "tcp flags & (syn | ack) == syn"
#: How a closed port answers: nftables verdicts.
CLOSED_STYLES = {
    "drop": "drop",
    "reset": "reject with tcp reset",
    "icmp": "reject with icmpx type admin-prohibited",
}


#: The size of each host's ~/.ssh (its own disk, which a test can fill).
SSH_DIR_SIZE = "1m"
#: A private host's own folders (see TestHosts(private=True)) and their modes, and their size.
PRIVATE_DIRS = {"tmp": 0o1777, "root": 0o700, "home": 0o755, "work": 0o755}
#: Top-level folders of the system itself: a private host keeps them (its own Python is there).
SYSTEM_DIRS = frozenset(
    [
        "bin",
        "boot",
        "dev",
        "etc",
        "lib",
        "lib32",
        "lib64",
        "libx32",
        "proc",
        "run",
        "sbin",
        "sys",
        "usr",
        "var",
    ]
)
PRIVATE_SIZE = "4g"

#: The key of :meth:`TestHosts.leftovers` for entries left in the hosts' temp dir.
TEMP = "(hosts' temp dir)"


class UnknownHostError(KeyError, ValueError):
    """No test host of that name (a ValueError; a KeyError too, as it always was)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class TestHost:
    __test__ = False  # not a pytest test class

    name: str
    address: str
    port: int
    netns: str | None


def _run(argv: list[str], input: str | None = None, check: bool = True) -> str:
    res = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def _netns_possible() -> bool:
    if os.geteuid() != 0 or not os.path.exists(SSHD):
        return False
    if not all(shutil.which(b) for b in ("ip", "nsenter", "unshare", "nft")):
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


def _netns_names() -> list[str]:
    try:
        return os.listdir(NETNS_DIR)
    except OSError:
        return []


def _netns_pids(ns: str) -> list[int]:
    """Pids whose network namespace is `ns` (what `ip netns pids` prints)."""
    return _netns_pids_of([ns])[ns]


def _netns_pids_of(namespaces: Sequence[str]) -> dict[str, list[int]]:
    """Each of ``namespaces`` -> the pids in it, from one pass over /proc (a test polls this
    while hundreds of processes run)."""
    found: dict[str, list[int]] = {ns: [] for ns in namespaces}
    which: dict[tuple[int, int], str] = {}
    for ns in namespaces:
        with contextlib.suppress(OSError):
            st = os.stat(NETNS_DIR / ns)
            which[(st.st_dev, st.st_ino)] = ns
    if not which:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            s = os.stat(f"/proc/{entry}/ns/net")
        except OSError:  # gone, zombie or not ours to see
            continue
        inside = which.get((s.st_dev, s.st_ino))
        if inside is not None:
            found[inside].append(int(entry))
    return found


def _is_sshd(p: psutil.Process) -> bool:
    try:
        return p.name() in SSHD_NAMES
    except psutil.Error:
        return False


def _describe(p: psutil.Process) -> str | None:
    try:
        return f"{p.pid} {' '.join(p.cmdline()) or p.name()}"
    except psutil.Error:
        return None


def _kill_and_wait(procs: list[psutil.Process], timeout: float = 5.0) -> None:
    """SIGKILL and wait until each is gone or a zombie (Popen owners keep their returncode)."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    deadline = time.monotonic() + timeout
    for p in procs:
        while time.monotonic() < deadline:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:  # dead; its parent reaps it
                    break
            except psutil.Error:
                break
            time.sleep(0.01)


def _run_links(run_id: str) -> list[str]:
    pat = re.compile(rf"lct{run_id}(br|v\d+|p\d+)")
    return [n for n in os.listdir("/sys/class/net") if pat.fullmatch(n)]


def _run_mounts(run_id: str) -> list[str]:
    """Mount points of the run's tmpfs disks (see TestHosts._small_disk), deepest first."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            rows = handle.read().splitlines()
    except OSError:
        return []
    points = []
    for row in rows:
        head, _, tail = row.partition(" - ")
        fields, rest = head.split(), tail.split()
        if len(fields) > 4 and len(rest) > 1 and rest[1] == f"lct{run_id}ssh":
            points.append(fields[4].replace("\\040", " "))
    return sorted(points, key=len, reverse=True)


def _remove_user(name: str) -> None:
    """The run's account and the mount point of its homes, if it has one."""
    try:
        home = pwd.getpwnam(name).pw_dir
    except KeyError:
        return
    _run(["userdel", name], check=False)
    with contextlib.suppress(OSError):
        os.rmdir(home)


def _destroy_run(run_id: str) -> None:
    """Kill everything in the run's namespaces, delete them, its links, disks and marker."""
    pat = re.compile(rf"lct{run_id}h\d+")
    names = [n for n in _netns_names() if pat.fullmatch(n)]
    for _ in range(5):  # processes may fork while we kill
        procs = []
        for ns in names:
            for pid in _netns_pids(ns):
                with contextlib.suppress(psutil.Error):
                    procs.append(psutil.Process(pid))
        if not procs:
            break
        _kill_and_wait(procs)
    for ns in names:
        _run(["ip", "netns", "del", ns], check=False)
    deadline = time.monotonic() + 5
    while True:  # veths vanish with their namespace, asynchronously
        links = _run_links(run_id)
        if not links or time.monotonic() > deadline:
            break
        for link in links:
            _run(["ip", "link", "del", link], check=False)
        time.sleep(0.05)
    for point in _run_mounts(run_id):
        _run(["umount", point], check=False)
    _remove_user(f"lct{run_id}")
    with contextlib.suppress(OSError):
        (MARKER_DIR / f"lct-{run_id}.owner").unlink()


def _owner_alive(run_id: str) -> bool:
    try:
        pid_s, created_s = (MARKER_DIR / f"lct-{run_id}.owner").read_text().split()
        return abs(psutil.Process(int(pid_s)).create_time() - float(created_s)) < 1.0
    except (OSError, ValueError, psutil.Error):
        return False


def _cleanup_stale(own_id: str) -> None:
    ids: set[str] = set()
    for n in _netns_names():
        if m := re.fullmatch(r"lct([0-9a-f]{4})h\d+", n):
            ids.add(m.group(1))
    for n in os.listdir("/sys/class/net"):
        if m := re.fullmatch(r"lct([0-9a-f]{4})(br|v\d+|p\d+)", n):
            ids.add(m.group(1))
    for entry in pwd.getpwall():  # the accounts of runs (TestHosts(user=True))
        if m := re.fullmatch(r"lct([0-9a-f]{4})", entry.pw_name):
            ids.add(m.group(1))
    for row in Path("/proc/self/mountinfo").read_text().splitlines():
        if m := re.search(r" - tmpfs lct([0-9a-f]{4})ssh ", row):
            ids.add(m.group(1))
    for f in MARKER_DIR.glob("lct-*.owner"):
        if m := re.fullmatch(r"lct-([0-9a-f]{4})\.owner", f.name):
            ids.add(m.group(1))
    for run_id in sorted(ids - {own_id}):
        if not _owner_alive(run_id):
            log.info("removing stale test hosts of run %s", run_id)
            _destroy_run(run_id)


def _pick_subnet() -> ipaddress.IPv4Network:
    used = []
    for line in (_run(["ip", "-4", "route"]) + _run(["ip", "-4", "addr"])).splitlines():
        for word in line.split():
            if re.fullmatch(r"\d+\.\d+\.\d+\.\d+(/\d+)?", word):
                used.append(ipaddress.ip_network(word, strict=False))
    for _ in range(500):
        net = ipaddress.IPv4Network(f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("no free 10.200-250.x.0/24 subnet")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> str:
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)])
    return " ".join(path.with_name(path.name + ".pub").read_text().split()[:2])


class TestHosts:
    """SSH test hosts; see the module docstring. Use as a context manager or start()/stop()."""

    __test__ = False  # not a pytest test class

    hosts: list[TestHost]
    base_dir: Path
    ssh_config_path: Path
    known_hosts_path: Path
    identity_file: Path
    controller_address: str
    namespaced: bool

    def __init__(
        self,
        count: int = 4,
        base_dir: str | os.PathLike[str] | None = None,
        shared_home: bool = False,
        hidden: Sequence[str] = (),
        user: bool = False,
        shells: Mapping[str, str] | None = None,
        private: bool = False,
        gpus: Mapping[str, int] | None = None,
    ) -> None:
        """Shapes of hosts as sites have them (network-namespace hosts only):

        ``shared_home``: every host has the same ``~/.ssh`` (a home shared over NFS);
        ``hidden``: commands that do not run on the hosts (``flock``, say: missing on macOS,
        BSD and minimal images); ``user``: the login user is an unprivileged account of its own
        (made for the run, removed after), not root; ``shells``: host -> the login user's login
        shell there (tcsh, fish, ...); ``private``: each host has a filesystem of its own —
        empty tmpfs disks over /tmp, /root, /home, /work and the folders of this machine's
        checkout and interpreters (see private_dirs): only the system's Python, nothing
        installed, nothing shared;
        ``gpus``: host -> GPUs its ``nvidia-smi`` reports (a fake one on its PATH, in
        /usr/local/bin: no GPU is needed to test what a cluster does with them)."""
        mode = os.environ.get(MODE_ENV, "").strip().lower()
        if mode not in ("", "netns", "loopback"):
            raise ValueError(f"{MODE_ENV} must be 'netns' or 'loopback', not {mode!r}")
        self.namespaced = mode != "loopback" and _netns_possible()
        if mode == "netns" and not self.namespaced:
            raise RuntimeError(f"{MODE_ENV}=netns needs root, {SSHD}, ip, nsenter, unshare and nft")
        if not 1 <= count <= 200:
            raise ValueError(f"count must be 1..200, not {count}")
        if not self.namespaced and count > 1:
            log.warning(
                "loopback mode (no root or no `ip netns`): %d test hosts clamped to 1", count
            )
            count = 1
        self.count = count
        self.run_id = secrets.token_hex(2)
        self.hosts = []
        self.controller_address = "127.0.0.1"
        self._base_arg = base_dir
        self._own_base = False
        self._sshd: dict[str, subprocess.Popen[bytes]] = {}
        self._host_pubkey: dict[str, str] = {}
        self._network: tuple[str, str, bool] = ("open", "icmp", False)
        self._allowed: dict[str, list[str] | None] = {}
        self._cut: set[str] = set()  # hosts whose cable is pulled (cut_host)
        self._user_keys = True  # sshd reads ~/.ssh/authorized_keys (user_keys)
        self._forwarding: dict[str, str] = {}  # host -> its AllowTcpForwarding (tcp_forwarding)
        self._no_tty: set[str] = set()  # hosts whose sshd grants no terminal (permit_tty)
        self.shared_home = shared_home
        self.hidden = tuple(hidden)
        self.gpus = dict(gpus or {})
        self.private = private
        self.shells = dict(shells or {})
        #: the login user of every host: this process's user, or the account made for the run
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self._own_user = user
        self._started = False
        self._stopped = False
        self._marked = False  # our owner marker exists: the run id is ours to destroy

    def __enter__(self) -> TestHosts:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> TestHosts:
        if self._started:
            return self
        self._started = True
        atexit.register(self.stop)
        try:
            self._prepare_files()
            if self.namespaced:
                self._build_namespaces()
                if self._own_user:
                    self._make_user()
            else:
                self.hosts = [TestHost("host1", "127.0.0.1", _free_port(), None)]
            for h in self.hosts:
                self._write_host_files(h)
            self._write_client_files()
            for h in self.hosts:
                self._launch_sshd(h)
            for h in self.hosts:
                self._wait_listening(h)
        except BaseException:
            self.stop()
            raise
        log.info("test hosts %s up (run %s)", [h.name for h in self.hosts], self.run_id)
        return self

    def stop(self) -> None:
        if not self._started or self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        if self.namespaced:
            if self._marked:
                _destroy_run(self.run_id)
        else:
            procs = []
            for proc in self._sshd.values():
                with contextlib.suppress(psutil.Error):
                    procs.append(psutil.Process(proc.pid))
                    procs += psutil.Process(proc.pid).children(recursive=True)
            if self.hosts and hasattr(self, "base_dir"):
                procs += self.processes(self.hosts[0].name)
            _kill_and_wait(procs)
        for proc in self._sshd.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        if self._own_base and hasattr(self, "base_dir"):
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _prepare_files(self) -> None:
        if self._base_arg is None:
            # short: socket paths live below; under /run where the hosts hide /tmp
            where = "/run" if self.private else None
            self.base_dir = Path(tempfile.mkdtemp(prefix="lcth", dir=where))
            self._own_base = True
        else:
            self.base_dir = Path(self._base_arg).absolute()
            self._own_base = not self.base_dir.exists()
            self.base_dir.mkdir(parents=True, exist_ok=True)
        self.ssh_config_path = self.base_dir / "ssh_config"
        self.known_hosts_path = self.base_dir / "known_hosts"
        self.identity_file = self.base_dir / "id_ed25519"
        # The hosts' temp dir (TMPDIR in every SSH session): what a test leaves there is
        # visible, and nothing outside the run is ever taken for its leftovers.
        self.tmp_dir = self.base_dir / "t"
        self.tmp_dir.mkdir(mode=0o1777, exist_ok=True)
        self.tmp_dir.chmod(0o1777)
        (self.base_dir / "hidden").write_text("")  # no execute bit: what hides a command
        self._authorized_keys = self.base_dir / "authorized_keys"
        self._authorized_keys.write_text(_keygen(self.identity_file) + "\n")
        if self._own_user:  # sshd reads the key file as the user: it must reach it
            self.base_dir.chmod(0o755)
            self._authorized_keys.chmod(0o644)
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

    def _build_namespaces(self) -> None:
        _cleanup_stale(self.run_id)
        taken = {n[3:7] for n in _netns_names() + os.listdir("/sys/class/net") if n[:3] == "lct"}
        while self.run_id in taken or (MARKER_DIR / f"lct-{self.run_id}.owner").exists():
            self.run_id = secrets.token_hex(2)
        me = psutil.Process()
        (MARKER_DIR / f"lct-{self.run_id}.owner").write_text(f"{me.pid} {me.create_time()}\n")
        self._marked = True
        net = _pick_subnet()
        prefix = str(net.network_address).rsplit(".", 1)[0]
        self.controller_address = f"{prefix}.1"
        br = f"lct{self.run_id}br"
        _run(["ip", "link", "add", br, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.controller_address}/24", "dev", br])
        _run(["ip", "link", "set", br, "up"])
        for k in range(1, self.count + 1):
            ns, veth, peer = (f"lct{self.run_id}{c}{k}" for c in "hvp")
            address = f"{prefix}.{10 + k}"
            _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", peer, "netns", ns])
            _run(["ip", "link", "set", veth, "master", br, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", peer])
            _run(["ip", "-n", ns, "link", "set", peer, "up"])
            self.hosts.append(TestHost(f"host{k}", address, 22, ns))

    def _host_dir(self, name: str) -> Path:
        return self.base_dir / name

    @staticmethod
    def private_dirs() -> dict[str, int]:
        """Folders a private host has empty disks over: PRIVATE_DIRS and the top-level folder
        of wherever this checkout and its interpreters live (a CI clone in /check, a venv in
        /opt), measured here, so no host ever sees this machine's code or packages."""
        dirs = dict(PRIVATE_DIRS)
        here = [Path(__file__), Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable)]
        for path in here:
            top = path.resolve().parts[1]
            if top not in SYSTEM_DIRS:
                dirs.setdefault(top, 0o755)
        return dirs

    def _write_host_files(self, h: TestHost) -> None:
        d = self._host_dir(h.name)
        d.mkdir()
        key = d / "ssh_host_ed25519_key"
        self._host_pubkey[h.name] = _keygen(key)
        self._write_config(h)
        if h.netns is None:
            return
        if self.private:  # the host's own disks, mounted here so the harness sees them
            for folder, mode in self.private_dirs().items():
                self._small_disk(d / "fs" / folder, PRIVATE_SIZE, mode)
        if self._own_user:
            home = self.home_dir(h.name)
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
            entry = pwd.getpwnam(self.user)
            os.chown(home, entry.pw_uid, entry.pw_gid)
        if self._own_user or h.name in self.shells:
            self._write_passwd(h)

    def home_dir(self, name: str) -> Path:
        """Host ``name``'s login home, as seen from this machine (where it is a host's own)."""
        d = self._host_dir(name)
        home = Path(pwd.getpwnam(self.user).pw_dir)
        if self.private:
            return d / "fs" / home.relative_to("/")
        return d / "home" if self._own_user else home

    def _write_passwd(self, h: TestHost) -> None:
        """The host's /etc/passwd: this machine's, with the login user's shell for the host."""
        lines = []
        for line in Path("/etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if len(fields) == 7 and fields[0] == self.user and h.name in self.shells:
                fields[6] = self.shells[h.name]
            lines.append(":".join(fields))
        (self._host_dir(h.name) / "passwd").write_text("\n".join(lines) + "\n")
        (self._host_dir(h.name) / "passwd").chmod(0o644)

    def _host_steps(self, h: TestHost) -> list[str]:
        """What makes a namespace this host, before its sshd starts (in its mount namespace)."""
        d = self._host_dir(h.name)
        quote = shlex.quote
        steps = [f"hostname {quote(h.name)}"]
        if self.private:  # its own disks over this machine's folders
            for folder in self.private_dirs():
                steps.append(f"mount --bind {quote(str(d / 'fs' / folder))} /{folder}")
        else:
            bashrc = Path.home() / ".bashrc"
            if bashrc.exists():
                # A host of its own needs no share of this machine's shell setup: all hosts
                # sharing one ~/.bashrc (pyenv's rehash lock) would serialize their commands.
                (d / "bashrc").write_text("# test host: plain non-interactive shell\n")
                steps.append(f"mount --bind {quote(str(d / 'bashrc'))} {quote(str(bashrc))}")
        if (d / "passwd").exists():  # the login user's shell on this host
            steps.append(f"mount --bind {quote(str(d / 'passwd'))} /etc/passwd")
        home = Path(pwd.getpwnam(self.user).pw_dir)
        if self._own_user and not self.private:  # a home of its own on this host
            steps.append(f"mount --bind {quote(str(self.home_dir(h.name)))} {quote(str(home))}")
        # Each host has a ~/.ssh of its own, as separate machines do (host-to-host SSH
        # authorizes its key there), on a small disk of its own (a test can fill it); the
        # machine's own is hidden, never touched.
        ssh_dir = self.ssh_dir(h.name)
        if self.private:
            ssh_dir.mkdir(mode=0o700, exist_ok=True)
        else:
            self._small_disk(ssh_dir)
            dot_ssh = home / ".ssh"
            steps.append(f"mkdir -p {quote(str(dot_ssh))}")
            steps.append(f"mount --bind {quote(str(ssh_dir))} {quote(str(dot_ssh))}")
        entry = pwd.getpwnam(self.user)
        os.chown(ssh_dir, entry.pw_uid, entry.pw_gid)
        if self.gpus.get(h.name):  # its own /usr/local/bin, with an nvidia-smi that has GPUs
            tools = d / "bin"
            tools.mkdir(exist_ok=True)
            fake = tools / "nvidia-smi"
            names = "".join(f"Fake GPU {i}\n" for i in range(self.gpus[h.name]))
            fake.write_text(f"#!/bin/sh\nprintf '%s' {quote(names)}\n")
            fake.chmod(0o755)
            tools.chmod(0o755)
            steps.append(f"mount --bind {quote(str(tools))} /usr/local/bin")
        for command in self.hidden:  # what runs it finds a file it cannot execute
            steps.append(
                f"if p=$(command -v {quote(command)}); then "
                f'mount --bind {quote(str(self.base_dir / "hidden"))} "$p"; fi'
            )
        return steps

    def _write_config(self, h: TestHost) -> None:
        d = self._host_dir(h.name)
        key = d / "ssh_host_ed25519_key"
        # A non-root sshd cannot read /etc/shadow and, without PAM, then refuses every account as
        # "locked"; with PAM it asks the setgid helper. As root PAM is not needed.
        use_pam = "no" if os.geteuid() == 0 else "yes"
        user_keys = " .ssh/authorized_keys" if self._user_keys else ""
        # sshd's own limits stay at their defaults (MaxSessions 10 per connection, MaxStartups
        # 10:30:100 handshakes at once), as on the sites users have
        (d / "sshd_config").write_text(
            f"Port {h.port}\n"
            f"ListenAddress {h.address}\n"
            "AddressFamily inet\n"
            f"HostKey {key}\n"
            f"PidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self._authorized_keys}{user_keys}\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\n"
            f"UsePAM {use_pam}\n"
            "StrictModes no\n"
            f"AllowTcpForwarding {self._forwarding.get(h.name, 'yes')}\n"
            f"PermitTTY {'no' if h.name in self._no_tty else 'yes'}\n"
            "GatewayPorts no\n"
            "LogLevel ERROR\n"
            "X11Forwarding no\n"
            "PrintMotd no\n"
            "Subsystem sftp internal-sftp\n"
            f"SetEnv TMPDIR={'/tmp' if self.private else self.tmp_dir}\n"
        )

    def _make_user(self) -> None:
        """An unprivileged account for the run: its home is each host's own (under /home there),
        its password field ``*`` (not locked: sshd refuses locked accounts, key logins too)."""
        self.user = f"lct{self.run_id}"
        home = f"/home/{self.user}"
        _run(["useradd", "--no-create-home", "--home-dir", home, "--shell", "/bin/sh", self.user])
        _run(["usermod", "--password", "*", self.user])
        if not self.private:  # the mount point of each host's own home
            os.makedirs(home, mode=0o755, exist_ok=True)

    def _write_client_files(self) -> None:
        user = self.user
        known, config = [], []
        for h in self.hosts:
            where = h.address if h.port == 22 else f"[{h.address}]:{h.port}"
            known.append(f"{where} {self._host_pubkey[h.name]}\n")
            config.append(
                f"Host {h.name}\n"
                f"  HostName {h.address}\n"
                f"  Port {h.port}\n"
                f"  User {user}\n"
                f"  IdentityFile {self.identity_file}\n"
                "  IdentitiesOnly yes\n"
                f"  UserKnownHostsFile {self.known_hosts_path}\n"
                "  GlobalKnownHostsFile /dev/null\n"
                "  StrictHostKeyChecking yes\n"
                "  BatchMode yes\n"
                "  ConnectTimeout 5\n"
            )
        self.known_hosts_path.write_text("".join(known))
        self.ssh_config_path.write_text("\n".join(config))

    def _launch_sshd(self, h: TestHost) -> None:
        d = self._host_dir(h.name)
        sshd = [SSHD, "-D", "-e", "-f", str(d / "sshd_config")]
        argv = sshd
        if h.netns is not None:
            steps = self._host_steps(h)
            served = [REAPER, "-s", "--", *sshd] if REAPER else sshd
            script = " && ".join([*steps, f"exec {shlex.join(served)}"])
            argv = [
                "ip",
                "netns",
                "exec",
                h.netns,
                "unshare",
                "--uts",
                "--mount",
                "sh",
                "-c",
                script,
            ]
        with open(d / "sshd.log", "ab") as out:
            self._sshd[h.name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )

    def _wait_listening(self, h: TestHost, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        proc = self._sshd[h.name]
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"sshd of {h.name} exited ({proc.returncode}): {self._log(h)}")
            try:
                socket.create_connection((h.address, h.port), timeout=0.5).close()
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"sshd of {h.name} not listening on {h.address}:{h.port} after "
                        f"{timeout:.0f}s ({e}): {self._log(h)}"
                    ) from e
            time.sleep(0.02)

    def _log(self, h: TestHost) -> str:
        try:
            lines = (self._host_dir(h.name) / "sshd.log").read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "log tail: " + " | ".join(lines[-10:])

    # -- queries ---------------------------------------------------------------------------------

    def host(self, name: str) -> TestHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise UnknownHostError(f"no test host {name!r} (have {[h.name for h in self.hosts]})")

    def _listener(self, name: str) -> psutil.Process | None:
        """The listening sshd of host ``name`` (under its reaper, if it has one). The reaper's
        other sshd children are sessions orphaned by a killed monitor, on their way out: the
        listener is the one whose command line names the host's config."""
        proc = self._sshd.get(name)
        if proc is None or proc.poll() is not None:
            return None
        config = str(self._host_dir(name) / "sshd_config")
        try:
            top = psutil.Process(proc.pid)
            if _is_sshd(top):
                return top
            for child in top.children():
                with contextlib.suppress(psutil.Error):
                    if _is_sshd(child) and config in " ".join(child.cmdline()):
                        return child
            return None
        except psutil.Error:
            return None

    def processes(self, name: str, pids: Sequence[int] | None = None) -> list[psutil.Process]:
        """Processes inside host `name` that are not sshd: what code under test left there
        (``pids``: those in its namespace, when known)."""
        h = self.host(name)
        found: dict[int, psutil.Process] = {}
        if h.netns is not None:
            for pid in _netns_pids(h.netns) if pids is None else pids:
                with contextlib.suppress(psutil.Error):
                    found[pid] = psutil.Process(pid)
        else:
            listener = self._listener(name)
            if listener is not None:
                with contextlib.suppress(psutil.Error):
                    found.update((p.pid, p) for p in listener.children(recursive=True))
            base = str(self.base_dir)
            for p in psutil.process_iter(["cmdline"]):
                if base in " ".join(p.info["cmdline"] or []):
                    found[p.pid] = p
            me = psutil.Process()
            for p in [me, *me.parents()]:
                found.pop(p.pid, None)
        reaper = self._sshd.get(name)
        skip = {os.getpid(), reaper.pid if reaper is not None else -1}
        return [p for p in found.values() if p.pid not in skip and not _is_sshd(p)]

    def ssh_dir(self, name: str) -> Path:
        """Host ``name``'s ``~/.ssh``, as seen from this machine (one for all hosts with
        ``shared_home``): a tmpfs of SSH_DIR_SIZE where the hosts are namespaces."""
        self.host(name)
        if self.private:
            return self.home_dir(name) / ".ssh"
        return self.base_dir / "dot-ssh" if self.shared_home else self._host_dir(name) / "dot-ssh"

    def authorized_keys(self, name: str) -> str:
        """The text of host ``name``'s ~/.ssh/authorized_keys ("" when there is none)."""
        return self.authorized_keys_bytes(name).decode(errors="replace")

    def authorized_keys_bytes(self, name: str) -> bytes:
        """The bytes of host ``name``'s ~/.ssh/authorized_keys (b"" when there is none)."""
        path = self.ssh_dir(name) / "authorized_keys"
        return path.read_bytes() if path.is_file() else b""

    def _small_disk(self, folder: Path, size: str = "", mode: int = 0o700) -> None:
        """``folder`` on a tmpfs of ``size`` (default SSH_DIR_SIZE; once), named after the run:
        unmounted at stop, or by the next run if this one was killed."""
        folder.mkdir(mode=mode, parents=True, exist_ok=True)
        if os.path.ismount(folder):
            return
        source = f"lct{self.run_id}ssh"
        options = f"size={size or SSH_DIR_SIZE},mode={mode:o}"
        _run(["mount", "-t", "tmpfs", "-o", options, source, str(folder)])

    def leftovers(self) -> dict[str, list[str]]:
        """Processes still running on each host, and under ``TEMP`` what is left in the hosts'
        temp dir; ``{}`` when the hosts are clean."""
        out = self.leftover_processes()
        files = self.leftover_files()
        if files:
            out[TEMP] = files
        return out

    def leftover_processes(self) -> dict[str, list[str]]:
        """Processes still running on each host (hosts with none are not listed)."""
        out = {}
        inside = _netns_pids_of([h.netns for h in self.hosts if h.netns is not None])
        for h in self.hosts:
            pids = inside[h.netns] if h.netns is not None else None
            items = [d for d in map(_describe, self.processes(h.name, pids)) if d is not None]
            if items:
                out[h.name] = items
        return out

    def temp_dirs(self) -> list[Path]:
        """The hosts' temp dirs (``TMPDIR`` of their sessions), as seen from this machine: one
        shared, or each private host's own /tmp."""
        if self.private:
            return [self._host_dir(h.name) / "fs" / "tmp" for h in self.hosts]
        return [self.tmp_dir]

    def leftover_files(self) -> list[str]:
        """Entries left in the hosts' temp dir (``TMPDIR`` of their sessions)."""
        found = []
        for folder in self.temp_dirs():
            with contextlib.suppress(FileNotFoundError):
                found += [str(p) for p in folder.iterdir()]
        return sorted(found)

    def kill_leftovers(self) -> None:
        _kill_and_wait([p for h in self.hosts for p in self.processes(h.name)])
        for path in self.leftover_files():
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    # -- processes inside a host -----------------------------------------------------------------

    def run_in(self, name: str, argv: list[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start argv inside host `name` (its network and UTS namespace)."""
        h = self.host(name)
        if h.netns is not None:
            listener = self._listener(name)
            if listener is not None:
                argv = [
                    "nsenter",
                    "--target",
                    str(listener.pid),
                    "--uts",
                    "--net",
                    "--mount",
                    "--",
                    *argv,
                ]
            else:  # sshd is down: a fresh UTS namespace with the same hostname
                script = 'hostname "$0" && exec "$@"'
                unshare = ["ip", "netns", "exec", h.netns, "unshare", "--uts", "sh", "-c", script]
                argv = [*unshare, h.name, *argv]
        return subprocess.Popen(argv, **popen_kwargs)

    # -- sshd faults -----------------------------------------------------------------------------

    def user_keys(self, enabled: bool) -> None:
        """Whether sshd reads the users' ~/.ssh/authorized_keys too (as by default), or only the
        harness's own key file, as sites that manage keys centrally. Open sessions stay."""
        self._user_keys = enabled
        for h in self.hosts:
            self._write_config(h)
            self.stop_sshd(h.name)  # a new listener reads the new config
            self.start_sshd(h.name)

    def tcp_forwarding(self, name: str, allowed: str = "yes") -> None:
        """Host ``name``'s sshd ``AllowTcpForwarding``: ``yes`` (the default), ``no``, ``local``
        (-L only) or ``remote`` (-R only), as hardened sites set it. Open sessions keep theirs."""
        if allowed not in ("yes", "no", "local", "remote", "all"):
            raise ValueError(f"AllowTcpForwarding takes yes, no, local, remote or all: {allowed!r}")
        h = self.host(name)
        self._forwarding[h.name] = allowed
        self._write_config(h)
        self.stop_sshd(h.name)  # a new listener reads the new config
        self.start_sshd(h.name)

    def permit_tty(self, name: str, allowed: bool = True) -> None:
        """Host ``name``'s sshd ``PermitTTY``: ``no`` grants no terminal to any session, as
        sites set it for service accounts. Open sessions keep theirs."""
        h = self.host(name)
        if allowed:
            self._no_tty.discard(h.name)
        else:
            self._no_tty.add(h.name)
        self._write_config(h)
        self.stop_sshd(h.name)  # a new listener reads the new config
        self.start_sshd(h.name)

    def _signal_listener(self, name: str, sig: int) -> None:
        listener = self._listener(self.host(name).name)
        if listener is None:
            raise RuntimeError(f"sshd of {name} is not running")
        listener.send_signal(sig)

    def pause_sshd(self, name: str) -> None:
        """SIGSTOP the listener: TCP connects still succeed but no banner comes."""
        self._signal_listener(name, signal.SIGSTOP)

    def resume_sshd(self, name: str) -> None:
        self._signal_listener(name, signal.SIGCONT)

    def stop_sshd(self, name: str) -> None:
        """Listener down (connection refused); open sessions survive."""
        self.host(name)
        proc = self._sshd.get(name)
        if proc is None or proc.poll() is not None:
            return
        listener = self._listener(name)
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            proc.terminate()  # the reaper passes it on to sshd, and ends with it
            if listener is not None:
                listener.send_signal(signal.SIGCONT)  # in case it was paused
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def start_sshd(self, name: str) -> None:
        """Listener back up with the same host keys and port."""
        h = self.host(name)
        if self._listener(name) is not None:
            return
        if name in self._cut:  # it could never be seen listening
            raise RuntimeError(f"{name} is cut off the network: restore_host({name!r}) first")
        self._launch_sshd(h)
        self._wait_listening(h)

    @contextlib.contextmanager
    def process_limit(self, name: str) -> Iterator[None]:
        """While in the block, the SSH sessions host ``name`` serves now cannot start a process
        (a site at its process limit): they are put in a cgroup whose pids limit is what they
        already run. New sessions are not limited."""
        self._require_root("a process limit")
        root = Path("/sys/fs/cgroup/pids")  # cgroup v1
        if not (root / "cgroup.procs").exists():  # v2: the pids controller given to children
            root = Path("/sys/fs/cgroup")
            enabled = root / "cgroup.subtree_control"
            if not enabled.exists() or "pids" not in enabled.read_text().split():
                raise RuntimeError(
                    "a process limit needs the pids cgroup controller (cgroup v1's, or enabled "
                    "in /sys/fs/cgroup/cgroup.subtree_control)"
                )
        listener = self._listener(self.host(name).name)
        if listener is None:
            raise RuntimeError(f"sshd of {name} is not running")
        group = root / f"lcth-{os.getpid()}-{name}"
        group.mkdir()
        try:
            for session in listener.children():
                for proc in [session, *session.children(recursive=True)]:
                    with contextlib.suppress(OSError):
                        (group / "cgroup.procs").write_text(str(proc.pid))
            (group / "pids.max").write_text((group / "pids.current").read_text())
            yield
        finally:
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (root / "cgroup.procs").write_text(pid)
            group.rmdir()

    def sshd_option(self, name: str, keyword: str) -> str:
        """The value host ``name``'s sshd runs with for ``keyword`` (``sshd -T``: its config
        with every default filled in), e.g. ``maxsessions``."""
        config = str(self._host_dir(name) / "sshd_config")
        for line in _run([SSHD, "-T", "-f", config]).splitlines():
            key, _, value = line.partition(" ")
            if key == keyword.lower():
                return value
        raise KeyError(f"sshd -T of {name} has no {keyword!r}")

    def sessions(self, name: str) -> int:
        """How many SSH sessions host `name` serves now (sshd children of its listener)."""
        listener = self._listener(self.host(name).name)
        if listener is None:
            return 0
        try:
            return len([c for c in listener.children() if _is_sshd(c)])
        except psutil.Error:
            return 0

    def kill_sessions(self, name: str) -> int:
        """SIGKILL the sshd session processes under the listener; returns how many sessions."""
        listener = self._listener(self.host(name).name)
        if listener is None:
            return 0
        sessions = [c for c in listener.children() if _is_sshd(c)]
        victims = []
        for s in sessions:
            with contextlib.suppress(psutil.Error):
                victims += [s, *(c for c in s.children(recursive=True) if _is_sshd(c))]
        _kill_and_wait(victims)
        return len(sessions)

    # -- firewall --------------------------------------------------------------------------------

    def _require_root(self, what: str) -> None:
        if not self.namespaced:
            raise RuntimeError(f"needs root: {what} works on network-namespace hosts only")

    def set_network(
        self, topology: str = "open", closed: str = "icmp", cut_established: bool = False
    ) -> None:
        """Shape the test network as sites do. ``topology``: which paths are open —
        ``open``; ``isolated`` (hosts reach the controller and vice versa, not each other except
        on port 22); ``ssh-only`` (only port 22, either way); ``no-connect-back`` (hosts open no
        connection to this machine). ``closed``: how a closed port answers — ``drop``
        (silence), ``reset`` (TCP reset, what a port without listener says too) or ``icmp``
        (ICMP admin-prohibited). ``cut_established`` also cuts connections already open (a
        firewall closed mid-run), not only new ones; SSH itself is never cut."""
        self._require_root("set_network")
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}, not {topology!r}")
        if closed not in CLOSED_STYLES:
            raise ValueError(f"closed must be one of {tuple(CLOSED_STYLES)}, not {closed!r}")
        self._network = (topology, closed, cut_established)
        for h in self.hosts:
            self._apply_rules(h)

    @property
    def network(self) -> tuple[str, str, bool]:
        """(topology, closed-port style, cut_established) in force."""
        return self._network

    def ssh_only(self, enabled: bool = True) -> None:
        """On: every host accepts and opens only TCP port 22 (others rejected, not dropped)."""
        self.set_network("ssh-only" if enabled else "open")

    def restrict_ssh(self, name: str, allowed_from: list[str] | None) -> None:
        """Host `name` accepts port 22 only from these hosts (or "controller"); None lifts it."""
        self._require_root("restrict_ssh")
        h = self.host(name)
        if allowed_from is None:
            self._allowed[name] = None
        else:
            self._allowed[name] = [
                self.controller_address if n == "controller" else self.host(n).address
                for n in allowed_from
            ]
        self._apply_rules(h)

    def cut_host(self, name: str) -> None:
        """Pull host `name`'s cable: every packet to and from it (any protocol, open
        connections too, from this machine and from the other hosts) is dropped silently, and
        its sshd listener is stopped. Its processes keep running and can still talk to each
        other over loopback. ARP is still answered, so peers see timeouts as with a host behind
        a router, never "no route to host". Stays cut across set_network/restrict_ssh until
        restore_host. Idempotent."""
        self.host(name)
        self._require_root("cut_host")
        self._cut.add(name)
        self._apply_rules(self.host(name))  # silence first: the stopping sshd sends no reset
        self.stop_sshd(name)

    def restore_host(self, name: str) -> None:
        """Plug host `name` back in: the current network shape again and its sshd listening
        (waits for it). Idempotent."""
        self.host(name)
        self._require_root("restore_host")
        self._cut.discard(name)
        self._apply_rules(self.host(name))
        self.start_sshd(name)

    def forget_connections(self, name: str) -> int:
        """While host ``name`` is cut: this machine drops its TCP connections to the host's
        sshd without the host learning of it (the reset is lost on the cut path), as a machine
        does that stopped retrying during a long outage. The host's sshd keeps those sessions
        until it next sends something. Returns how many connections were dropped."""
        host = self.host(name)
        if name not in self._cut:
            raise RuntimeError(f"forget_connections({name!r}): cut the host first")
        match = ["dst", host.address, "dport", "=", "22"]
        count = subprocess.run(["ss", "-Htn", *match], capture_output=True, text=True, check=True)
        subprocess.run(["ss", "-HtnK", *match], capture_output=True, check=True)
        return len(count.stdout.splitlines())

    @property
    def cut_hosts(self) -> frozenset[str]:
        """Names of the hosts cut off the network now (cut_host)."""
        return frozenset(self._cut)

    def _ruleset(self, name: str) -> str:
        # add+delete makes the delete safe when the table is absent; one file is one transaction
        text = "add table inet lct\ndelete table inet lct\n"
        if name in self._cut:  # the pulled cable: nothing passes but the host's own loopback
            chains = "".join(
                f"  chain {chain} {{\n"
                f"    type filter hook {chain} priority 0; policy drop;\n"
                f"    {lo} lo accept\n"
                "  }\n"
                for chain, lo in (("input", "iif"), ("output", "oif"))
            )
            return text + "table inet lct {\n" + chains + "}\n"
        topology, closed, cut = self._network
        action = CLOSED_STYLES[closed]
        allowed = self._allowed.get(name)
        first, inp, out = [], [], []  # first: restrict_ssh, ahead of the SSH pass rules
        if allowed is not None:
            if allowed:
                first.append(f"tcp dport 22 ip saddr {{ {', '.join(allowed)} }} accept")
            first.append(f"tcp dport 22 {CLOSED_STYLES['icmp']}")
        others = [h.address for h in self.hosts if h.name != name]
        if topology == "isolated" and others:
            inp.append(f"ip saddr {{ {', '.join(others)} }} tcp dport != 22 {action}")
        elif topology == "ssh-only":
            inp.append(f"tcp dport != 22 {action}")
            out.append(f"{SYN} tcp dport != 22 {action}")
        elif topology == "no-connect-back":
            out.append(f"{SYN} ip daddr {self.controller_address} tcp dport != 22 {action}")
        if not (first or inp or out):
            return text
        # open connections pass unless the rules are meant to cut them; SSH (either end at
        # port 22) always passes
        held = [] if cut else ["ct state established,related accept"]
        ssh = ["tcp dport 22 accept", "tcp sport 22 accept"]
        text += "table inet lct {\n"
        for chain, lo, rules in (
            ("input", "iif", held + first + ssh + inp),
            ("output", "oif", held + ssh + out),
        ):
            text += f"  chain {chain} {{\n    type filter hook {chain} priority 0; policy accept;\n"
            text += f"    {lo} lo accept\n"
            text += "".join(f"    {r}\n" for r in rules) + "  }\n"
        return text + "}\n"

    def _apply_rules(self, h: TestHost) -> None:
        assert h.netns is not None
        _run(["ip", "netns", "exec", h.netns, "nft", "-f", "-"], input=self._ruleset(h.name))
