"""The local host as a connection: subprocess and the local filesystem, no SSH."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from typing import IO

from lazycluster_tasks.connection import Connection, Input, _Collector, chunks

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def is_local_host(host: str) -> bool:
    return host in LOCAL_HOSTS


def _pump(stream: IO[bytes], collector: _Collector) -> None:
    for chunk in iter(lambda: stream.read1(65536), b""):  # type: ignore[attr-defined]
        collector.feed(chunk)
    collector.feed(b"", final=True)


class LocalConnection(Connection):
    """Runs commands with ``/bin/sh`` in a new session, copies with shutil."""

    def __init__(self, host: str = "localhost") -> None:
        super().__init__(host)

    @property
    def is_local(self) -> bool:
        return True

    def _execute(
        self,
        line: str,
        timeout: float | None,
        stdout: _Collector,
        stderr: _Collector | None,
        stdin: Input | None,
        stall: float | None = None,
    ) -> int | None:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", line],
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if stderr is not None else subprocess.STDOUT,
            start_new_session=True,
        )
        readers = [threading.Thread(target=_pump, args=(proc.stdout, stdout), daemon=True)]
        if stderr is not None:
            readers.append(threading.Thread(target=_pump, args=(proc.stderr, stderr), daemon=True))
        for reader in readers:
            reader.start()
        if stdin is not None and proc.stdin is not None:
            # the command may exit before reading its input: its exit code tells, not the pipe
            with contextlib.suppress(BrokenPipeError):
                try:
                    for block in chunks(stdin):
                        proc.stdin.write(block)
                finally:
                    proc.stdin.close()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None  # the caller kills the process group; readers end with it
        finally:
            if proc.returncode is not None:
                for reader in readers:
                    reader.join()
        return code

    def put(self, local_path: str, remote_path: str) -> None:
        _copy(local_path, remote_path)

    def get(self, remote_path: str, local_path: str) -> None:
        _copy(remote_path, local_path)

    def close(self) -> None:
        self.kill_running()


def _copy(source: str, target: str) -> None:
    if not os.path.exists(source):
        raise FileNotFoundError(f"no such file or folder: {source!r}")
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    if os.path.isdir(source):
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        shutil.copy2(source, target)
