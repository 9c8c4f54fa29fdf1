"""A real ``prefect server start`` for tests and benchmarks: API, services and UI, on 127.0.0.1.

Prefect's own test harness runs the API without the UI; a browser test needs the pages too, so
the session runs the server its users run, less the polling services no test uses. It lives in
its own process group under a private ``PREFECT_HOME`` (database, UI build) and is stopped with
everything it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Services no test uses, each polling every 5-60 s (late runs, paused runs' expiry, the work
#: pools' foreman, concurrency leases' repossessor, deployment schedules, the cleanup
#: reconciler, the cancelled runs' cleanup, the events' vacuum): off. Measured on an idle
#: server: the first six took 40 % off its CPU (2.4 -> 1.4 % of a core); the last two, with
#: Prefect 3's later services, another third (4.9 -> 3.2 %, 2026-12-07).
UNUSED_SERVICES = (
    "LATE_RUNS",
    "PAUSE_EXPIRATIONS",
    "FOREMAN",
    "REPOSSESSOR",
    "SCHEDULER",
    "CLEANUP_RECONCILER",
    "CANCELLATION_CLEANUP",
    "DB_VACUUM",
)


class PrefectServer:
    """``with PrefectServer(home) as server:`` gives ``server.api_url`` and ``server.ui_url``.

    ``PrefectServer.at(port)`` is one that another process launched and stops (pytest-xdist's
    sessions share the run's server): it is waited for like one's own, and never stopped."""

    def __init__(
        self,
        home: str | os.PathLike[str],
        startup_timeout: float = 120.0,
        port: int | None = None,
    ) -> None:
        self.home = Path(home)
        self.port = port or _free_port()
        self.ui_url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.ui_url}/api"
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._launched = 0.0
        self._log = self.home / "server.log"
        self.owned = port is None

    @classmethod
    def at(cls, port: int, startup_timeout: float = 120.0) -> PrefectServer:
        """The server another process launched on ``port`` (its home is that process's)."""
        server = cls(tempfile.gettempdir(), startup_timeout, port)
        server._launched = time.monotonic()
        return server

    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        return {
            **keep,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(self.port),
            "PREFECT_UI_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in UNUSED_SERVICES},
        }

    def start(self) -> PrefectServer:
        """Launch the server and wait until its API is healthy."""
        self.launch()
        return self.wait_healthy()

    def launch(self) -> PrefectServer:
        """Launch the server without waiting for it (it boots while the caller goes on; see
        :meth:`wait_healthy`). A second call, or one on another process's server, does
        nothing."""
        if self._process is not None or not self.owned:
            return self
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self._log, "wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start"],
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=tempfile.gettempdir(),
            )
        self._launched = time.monotonic()
        return self

    def wait_healthy(self) -> PrefectServer:
        """Until the launched server's API answers (stopped, and an error, when it exits or
        is not healthy within ``startup_timeout`` of its launch)."""
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = self._launched + self.startup_timeout
        while True:  # asked at least once: a server launched long ago may be up already
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"prefect server exited at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"prefect server not healthy {self.startup_timeout:.0f} s after its launch:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.25)

    def log_tail(self, lines: int = 30) -> str:
        if not self.owned:
            return f"(the log is with the process that launched the server on port {self.port})"
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the whole process group; SIGKILL what is still there after ``timeout``
        (nothing for a server of another process)."""
        process, self._process = self._process, None
        if process is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        _wait_group_gone(process.pid, 5.0)

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _wait_group_gone(pgid: int, timeout: float) -> None:
    """Children (uvicorn workers, services) share the group; make sure none outlives us."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
