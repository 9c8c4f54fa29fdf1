"""The local leak checks can fail: a thread, a listening socket, a file descriptor or a temp file
left behind each makes its check name it; what goes within the grace time is no leak."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from lazycluster_tasks.testing.leaks import LocalState, tmp_entries, wait_tmp_clean

#: Short: a leak here stays, so each failing check waits all of it.
GRACE = 0.3


def test_nothing_left_passes() -> None:
    before = LocalState.take()
    before.assert_none_left(grace=GRACE)


def test_a_thread_that_ends_within_the_grace_time_is_no_leak() -> None:
    before = LocalState.take()
    threading.Thread(target=time.sleep, args=(0.1,), name="short-lived").start()
    before.assert_none_left(grace=5)


def test_a_thread_left_running_is_named() -> None:
    stop = threading.Event()
    before = LocalState.take()
    thread = threading.Thread(target=stop.wait, name="left-behind")
    thread.start()
    try:
        with pytest.raises(AssertionError, match=r"threads left running: \['left-behind'\]"):
            before.assert_none_left(grace=GRACE)
    finally:
        stop.set()
        thread.join()


def test_a_socket_left_listening_is_named() -> None:
    before = LocalState.take()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(AssertionError, match=rf"sockets left listening: \[{port}\]"):
            before.assert_none_left(grace=GRACE)


def test_a_file_descriptor_left_open_is_named() -> None:
    before = LocalState.take()
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        message = rf"1 file descriptors leaked: {{.*'{fd}': '{re.escape(os.devnull)}'"
        with pytest.raises(AssertionError, match=message):
            before.assert_none_left(grace=GRACE)
    finally:
        os.close(fd)


def test_a_temp_file_left_is_named_unless_ignored(tmp_path: Path) -> None:
    (tmp_path / "old").touch()
    before = set(tmp_entries(str(tmp_path)))
    (tmp_path / "lcth-host").mkdir()
    (tmp_path / "left").touch()
    assert wait_tmp_clean(str(tmp_path), before, grace=GRACE, ignore="lcth") == ["left"]
    (tmp_path / "left").unlink()
    assert wait_tmp_clean(str(tmp_path), before, grace=GRACE, ignore="lcth") == []
