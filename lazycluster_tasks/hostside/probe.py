"""The preflight probe, run on each host (and on the controller for its own dials).

``python -c <this file> ARGS_JSON`` prints one JSON line: this Python's version, whether
``distributed`` imports, /proc/net/tcp{,6} (the ports in use), the port its listener got, and
for each target whether it answered with the nonce ("open") or how it failed. ARGS_JSON holds
``window`` (seconds to dial), ``nonce``, ``me`` (this node's name in answers), ``ports`` (for
the listener, the first free one), ``expect`` (dials to answer) and ``targets`` (key -> [host,
ports, expected answer]). Standard library only.
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
from typing import Any, Dict, List  # noqa: UP035 - the package runs on hosts with 3.8


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


class Probe:
    def __init__(self, args: Dict[str, Any]) -> None:  # noqa: UP006
        self.args = args
        self.deadline = time.monotonic() + float(args["window"])
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
        while self.seen < self.args["expect"] and time.monotonic() < self.deadline:
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            with contextlib.suppress(OSError):
                conn.sendall(token)
            conn.close()
            self.seen += 1

    def dial(self, key: str, host: str, ports: List[int], want: str) -> None:  # noqa: UP006
        """Dial ``host`` on each port until one answers ``want`` or the window closes."""
        state = "no answer"
        while True:
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
                    state, retry = "another program answers", True
                except OSError as exc:
                    state = _classify(exc)
                    retry = retry or state == "refused"
            if not retry or time.monotonic() >= self.deadline:
                self.reach[key] = state
                return
            time.sleep(0.05)

    def _read(self, host: str, port: int, left: float) -> str:
        with socket.create_connection((host, port), timeout=min(left, 1.0)) as conn:
            conn.settimeout(max(0.05, min(self.deadline - time.monotonic(), 1.0)))
            got = b""
            while not got.endswith(b"\n") and len(got) < 200:
                part = conn.recv(200)
                if not part:
                    break
                got += part
        return got.decode(errors="replace").strip()

    def run(self) -> Dict[str, Any]:  # noqa: UP006
        out: Dict[str, Any] = {  # noqa: UP006
            "distributed": importlib.util.find_spec("distributed") is not None,
            "python": "%d.%d.%d" % sys.version_info[:3],  # noqa: UP031
            "tcp": _tcp_tables(),
        }
        self.listen()
        threads = [threading.Thread(target=self.serve)] if self.server is not None else []
        for key, (host, ports, word) in self.args["targets"].items():
            want = "%s %s" % (self.args["nonce"], word)  # noqa: UP031
            threads.append(threading.Thread(target=self.dial, args=(key, host, ports, want)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.server is not None:
            self.server.close()
        out["reach"], out["port"] = self.reach, self.port
        return out


def main() -> None:
    print(json.dumps(Probe(json.loads(sys.argv[1])).run()))


if __name__ == "__main__":
    main()
