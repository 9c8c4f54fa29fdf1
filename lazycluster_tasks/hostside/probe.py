"""The preflight probe, run on each host (and on the controller for its own dials).

``python -c <this file> ARGS_JSON`` prints one JSON line: this Python's version, whether
``distributed`` imports, /proc/net/tcp{,6} (the ports in use), the port its listener got, and
for each target whether it answered with the nonce ("open") or how it failed. ARGS_JSON holds
``window`` (seconds to dial), ``nonce``, ``me`` (this node's name in answers), ``ports`` (for
the listener, the first free one), ``expect`` (dials to answer), ``targets`` (key -> [host,
ports, expected answer, whether it listens already]) and ``silent`` (seconds without an answer
to a connection request that make a path dropped). Standard library only.

No fixed window when a path is blocked: a dial the network drops is known after ``silent``
seconds (the far kernel answers a SYN itself, listening or not, within a round trip), an ICMP
reject at once, and a refusal at once from a target that already listens (the controller).
Only a refusal from a peer that may not listen yet is dialled again until ``window`` closes.
One blocked path decides the plan (everything goes through SSH), so the probe then stops
dialing, answers dials a moment longer (``LINGER``: paths in flight finish their measurement)
and reports; what it did not measure says so.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import socket
import sys
import threading
import time
from typing import Any, Dict, List, Optional  # noqa: UP035 - the package runs on hosts with 3.8


def _tcp_tables() -> str:
    text = ""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as handle:
                text += handle.read()
        except OSError:
            pass
    return text


def _classify(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, socket.timeout):
        return "silent"
    return "rejected (%s)" % (errno.errorcode.get(exc.errno or 0) or exc)


#: Seconds without an answer to a connection request after which a path counts as dropped.
SILENT_AFTER = 0.2
#: Seconds a probe that found a blocked path still answers the others' dials.
LINGER = 0.05
NOT_MEASURED = "not measured (another path is blocked)"
#: What a dial found that settles the plan: the path is blocked for sure.
BLOCKED = ("silent", "refused", "rejected")


class Probe:
    def __init__(self, args: Dict[str, Any]) -> None:  # noqa: UP006
        self.args = args
        self.deadline = time.monotonic() + float(args["window"])
        self.silent_after = float(args.get("silent", SILENT_AFTER))
        #: set once a path is blocked for sure (or from outside: the controller's decision)
        self.decided = threading.Event()
        self.reach: Dict[str, str] = {}  # noqa: UP006
        self.server: socket.socket | None = None
        self.port: int | None = None
        self.seen = 0

    def listen(self) -> None:
        for port in self.args["ports"]:
            try:
                self.server = socket.create_server(("", port), backlog=128)
                self.port = port
                return
            except OSError:
                pass

    def serve(self) -> None:
        """Answer the others' dials with the nonce and this node's name."""
        assert self.server is not None
        token = ("%s %s\n" % (self.args["nonce"], self.args["me"])).encode()  # noqa: UP031
        self.server.settimeout(0.05)
        stop = self.deadline
        while self.seen < self.args["expect"] and time.monotonic() < stop:
            if self.decided.is_set():
                stop = min(stop, time.monotonic() + LINGER)
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            with contextlib.suppress(OSError):
                conn.sendall(token)
            conn.close()
            self.seen += 1

    def dial(self, key: str, host: str, ports: List[int], want: str, sure: bool) -> None:  # noqa: UP006
        """Dial ``host`` on each port until one answers ``want``, the path is blocked for sure
        (``sure``: the target listens already, so a refusal is final) or the window closes."""
        state = "no answer"
        while not self.decided.is_set():
            retry = False
            for port in ports:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    got = self._read(host, port, left)
                    if got == want:
                        self.reach[key] = "open"
                        return
                    state = "connected, no answer" if got is None else "another program answers"
                    retry = True
                except OSError as exc:
                    state = _classify(exc)
                    if state != "refused" or sure:
                        # a port of the cluster's the network drops or rejects (or a refusal
                        # by a listener that is up) rules direct out: the other ports can wait
                        retry = False
                        break
                    retry = True
            if not retry or time.monotonic() >= self.deadline:
                self.reach[key] = state
                if state.startswith(BLOCKED):
                    self.decided.set()
                return
            time.sleep(0.05)
        self.reach.setdefault(key, NOT_MEASURED)

    def _read(self, host: str, port: int, left: float) -> Optional[str]:  # noqa: UP045
        """The far end's answer; raises why there was none (silence here is only the
        connection request's: a slow answer on an open connection is dialled again)."""
        with socket.create_connection((host, port), timeout=min(left, self.silent_after)) as conn:
            conn.settimeout(max(0.05, min(self.deadline - time.monotonic(), 1.0)))
            got = b""
            try:
                while not got.endswith(b"\n") and len(got) < 200:
                    part = conn.recv(200)
                    if not part:
                        break
                    got += part
            except socket.timeout:  # noqa: UP041 - not TimeoutError before 3.10
                return None
        return got.decode(errors="replace").strip()

    def dial_all(self) -> Dict[str, str]:  # noqa: UP006
        """Every target at once; key -> "open" or why not."""
        threads = []
        for key, target in self.args["targets"].items():
            host, ports, word = target[:3]
            sure = bool(target[3]) if len(target) > 3 else False
            want = "%s %s" % (self.args["nonce"], word)  # noqa: UP031
            threads.append(
                threading.Thread(
                    target=self.dial, args=(key, host, ports, want, sure), name="probe-" + key
                )
            )
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return dict(self.reach)

    def run(self) -> Dict[str, Any]:  # noqa: UP006
        out: Dict[str, Any] = {  # noqa: UP006
            "distributed": importlib.util.find_spec("distributed") is not None,
            "python": "%d.%d.%d" % sys.version_info[:3],  # noqa: UP031
            "tcp": _tcp_tables(),
        }
        self.listen()
        server = threading.Thread(target=self.serve) if self.server is not None else None
        if server is not None:
            server.start()
        self.dial_all()
        if server is not None:
            server.join()
            assert self.server is not None
            self.server.close()
        out["reach"], out["port"] = self.reach, self.port
        return out


def main() -> None:
    print(json.dumps(Probe(json.loads(sys.argv[1])).run()))


if __name__ == "__main__":
    main()
