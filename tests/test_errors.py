import subprocess
import sys
import time

import pytest

import lazycluster_tasks as lt
from lazycluster_tasks import errors
from lazycluster_tasks.runtime import Runtime


def test_every_error_derives_from_the_base_and_is_exported():
    classes = [
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type)
        and issubclass(obj, Exception)
        and obj.__module__ == errors.__name__
    ]
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, lt.LazyclusterError)
        assert getattr(lt, cls.__name__) is cls
        assert cls.__name__ in errors.__doc__, f"{cls.__name__} missing from the drawn tree"


def test_transient_classification():
    assert lt.is_transient(lt.HostConnectionError("refused", host="h"))
    assert lt.is_transient(lt.OperationTimeoutError("slow"))
    assert lt.is_transient(ConnectionResetError())
    assert not lt.is_transient(lt.AuthenticationError("denied"))
    assert not lt.is_transient(lt.HostKeyError("changed"))
    assert not lt.is_transient(ValueError("bad input"))
    mixed = lt.GroupError("run", {"a": 1}, {"b": lt.HostConnectionError("x"), "c": ValueError()})
    assert not lt.is_transient(mixed)
    only_net = lt.GroupError("run", {}, {"b": lt.HostConnectionError("x")})
    assert lt.is_transient(only_net)


def test_group_error_names_every_failed_host():
    err = lt.GroupError("echo", {"a": "ok"}, {"b": RuntimeError("boom"), "c": OSError("gone")})
    text = str(err)
    assert "2 of 3 hosts" in text and "b: RuntimeError: boom" in text and "c: OSError: gone" in text
    assert err.results == {"a": "ok"}
    assert set(err.errors) == {"b", "c"}


CONNECT_ERRORS = """
import socket, sys, threading
from lazycluster_tasks.runtime import Runtime

server = socket.create_server(("127.0.0.1", 0))  # answers, but not as sshd
def serve():
    while True:
        conn, _ = server.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\\r\\n\\r\\n")
        conn.close()
threading.Thread(target=serve, daemon=True).start()
config = sys.argv[1]
with open(config, "w") as handle:
    handle.write("Host refused\\n  HostName 127.0.0.1\\n  Port 1\\n")
    handle.write(f"Host web\\n  HostName 127.0.0.1\\n  Port {server.getsockname()[1]}\\n")
for alias in ("refused", "web"):
    try:
        Runtime(alias, ssh_config_path=config).run("true")
    except Exception as exc:
        print(f"{alias}: {type(exc).__name__}: {exc}")
"""


def test_why_a_host_cannot_be_reached_is_said_in_words(tmp_path) -> None:
    """Refused and not-an-SSH-server: our words, nothing of paramiko's, no traceback."""
    done = subprocess.run(
        [sys.executable, "-c", CONNECT_ERRORS, str(tmp_path / "config")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stdout.splitlines()
    assert lines[0].startswith("refused: HostConnectionError: cannot connect to refused")
    assert "connection refused (no sshd listens on that port" in lines[0]
    assert lines[1].startswith("web: HostConnectionError: cannot connect to web")
    assert "the port answers but not as an SSH server" in lines[1]
    assert "Unable to connect" not in done.stdout and "banner" not in done.stdout
    assert done.stderr == "", done.stderr  # no paramiko traceback


def test_a_host_that_does_not_answer_times_out_in_words(test_hosts) -> None:
    test_hosts.cut_host("host1")
    try:
        runtime = Runtime(
            "host1",
            ssh_config_path=str(test_hosts.ssh_config_path),
            connection_kwargs={"connect_timeout": 2},
        )
        started = time.monotonic()
        with pytest.raises(lt.HostConnectionError) as info:
            runtime.run("true")
        assert time.monotonic() - started < 15
        assert "timed out after 2 s (no answer: a firewall drops the packets" in str(info.value)
    finally:
        test_hosts.restore_host("host1")
