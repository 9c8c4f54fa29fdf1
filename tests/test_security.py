"""Secure by default: TLS between every process of a cluster, nothing an outsider can use, no
secret on a command line, private files that go with the cluster."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from distributed import Client

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

HOSTS = ["host1", "host2"]
OUTSIDER = "host4"  # a test host that is not part of the cluster

#: Tries to use a scheduler and a worker the way an attacker would: plain tcp://, and TLS with a
#: certificate of its own (another cluster's). Prints one JSON line: attempt -> "ok: <uid>" or
#: "refused: <error>".
PROBE = r"""
import asyncio, json, os, sys
from distributed import Client, Security
from distributed.comm import connect

scheduler, worker = sys.argv[1], sys.argv[2]
host_port = lambda a: a.split("://", 1)[1]
foreign = Security.temporary()

def run_code(address, security):
    try:
        with Client(address, security=security, timeout=5, set_as_default=False) as c:
            return f"ok: {c.submit(os.getuid, pure=False).result(timeout=10)}"
    except BaseException as exc:
        return f"refused: {type(exc).__name__}"

def unverified(cert):
    # TLS that trusts any server, with a certificate (cert, key) or none at all
    import ssl, tempfile
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if cert:
        with tempfile.TemporaryDirectory() as d:
            open(d + "/c.pem", "w").write(cert[0])
            open(d + "/k.pem", "w").write(cert[1])
            ctx.load_cert_chain(d + "/c.pem", d + "/k.pem")
    return {"ssl_context": ctx, "require_encryption": True}

async def talk(address, security, args=None):
    try:
        args = args or security.get_connection_args("client")
        comm = await connect(address, timeout=5, **args)
        await asyncio.wait_for(comm.write({"op": "identity"}), 5)
        reply = await asyncio.wait_for(comm.read(), 5)
        await comm.close()
        return f"ok: {str(reply)[:40]}"
    except BaseException as exc:
        return f"refused: {type(exc).__name__}"

from concurrent.futures import ThreadPoolExecutor
attempts = {
    "scheduler plain": lambda: run_code("tcp://" + host_port(scheduler), Security()),
    "scheduler foreign cert": lambda: run_code("tls://" + host_port(scheduler), foreign),
    "worker plain": lambda: asyncio.run(talk("tcp://" + host_port(worker), Security())),
    "worker foreign cert": lambda: asyncio.run(talk("tls://" + host_port(worker), foreign)),
}
ours = json.loads(sys.stdin.read() or "null")  # the cluster's own (cert, key): the control
certs = {"own cert": (foreign.tls_client_cert, foreign.tls_client_key), "no cert": None}
if ours:
    certs["the cluster's cert (control)"] = ours
else:  # no TLS on the cluster: plain tcp is what an attacker uses
    attempts = {k: v for k, v in attempts.items() if "plain" in k}
    certs = {}
for target, address in (("scheduler", scheduler), ("worker", worker)):
    for label, cert in certs.items():
        tls = "tls://" + host_port(address)
        attempts[f"{target} trusting any server, {label}"] = (
            lambda tls=tls, cert=cert: asyncio.run(talk(tls, None, unverified(cert))))
with ThreadPoolExecutor(len(attempts)) as pool:  # at once: each refusal may take its timeout
    found = {name: pool.submit(attempt) for name, attempt in attempts.items()}
    print(json.dumps({name: f.result() for name, f in found.items()}), flush=True)
"""


def probe_from(
    multi_hosts, host: str, scheduler: str, worker: str, as_nobody: bool, control=None
) -> dict:
    """What an attacker on ``host`` gets; ``control`` (cert, key) is also tried, as the cluster's
    own certificate must work the same way."""
    argv = [sys.executable, "-c", PROBE, scheduler, worker]
    if as_nobody:  # an unprivileged local user of that host
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    proc = multi_hosts.run_in(
        host,
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    out, err = proc.communicate(json.dumps(control), timeout=90)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("mode", "security"),
    [("direct", True), ("tunnelled", True), ("direct", False), ("tunnelled", False)],
)
def test_outsiders_cannot_use_the_cluster_and_no_secret_is_on_a_command_line(
    make_cluster, multi_hosts, mode, security
):
    token = "pnu_" + os.urandom(12).hex()  # as a Prefect Cloud API key would reach workers
    seen: set[str] = set()
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_command_lines, args=(stop, seen), daemon=True)
    sampler.start()
    try:
        cluster = make_cluster(
            HOSTS, nanny=False, network_mode=mode, security=security, env={"PREFECT_API_KEY": token}
        )
        with Client(cluster) as client:  # ours works: the cluster's own certificate
            keys = client.run(lambda: os.environ.get("PREFECT_API_KEY"))
            assert set(keys.values()) == {token}  # the workers got it
            worker = next(iter(client.scheduler_info(n_workers=-1)["workers"]))
            folders = [Path(f.folder) for f in cluster.record().folders.values()]
            check_private(folders, tls=security)
            scheduler = cluster.scheduler_address
            tls = cluster.engine.tls
            control = (tls.client_cert, tls.client_key) if tls is not None else None
            # direct: a host outside the cluster that reaches its ports; tunnelled: an
            # unprivileged user on a cluster host, where the ports are on its 127.0.0.1
            where, nobody = (OUTSIDER, False) if mode == "direct" else ("host1", True)
            found = probe_from(multi_hosts, where, scheduler, worker, nobody, control)
    finally:
        stop.set()
        sampler.join()
    print(mode, security, found)
    assert scheduler.startswith("tls://" if security else "tcp://")
    if security:
        controls = {k: found.pop(k) for k in list(found) if "(control)" in k}
        assert len(controls) == 2 and all(v.startswith("ok") for v in controls.values())
        assert len(found) == 8 and all(v.startswith("refused") for v in found.values()), found
    else:  # the same attacker runs code: the test can fail
        assert found["scheduler plain"].startswith("ok"), found
        assert found["worker plain"].startswith("ok"), found
    lines = "\n".join(seen)
    assert "distributed.cli.dask_worker" in lines  # the sampler saw the processes start
    assert token not in lines and "PRIVATE KEY" not in lines
    if security:
        key = cluster.engine.tls.worker_key  # type: ignore[union-attr]
        assert key.splitlines()[1] not in lines
    cluster.close()
    assert not any(f.exists() for f in folders)  # certificates and env files went with them


def check_private(folders: list[Path], tls: bool) -> None:
    """Cluster folders 0700; certificates, env files and logs 0600."""
    assert folders
    for folder in folders:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
        files = [*folder.glob("*.env"), *folder.glob("*.log")]
        if tls:
            assert stat.S_IMODE((folder / "tls").stat().st_mode) == 0o700
            files += list((folder / "tls").iterdir())
        assert files
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    env_files = [p for f in folders for p in f.glob("*.env")]
    assert any("PREFECT_API_KEY" in p.read_text() for p in env_files)


def _sample_command_lines(stop: threading.Event, seen: set[str]) -> None:
    """Every command line on this machine (the test hosts' processes included: they share its
    process table), sampled until ``stop``."""
    while not stop.is_set():
        for proc in psutil.process_iter(["cmdline"]):
            line = " ".join(proc.info["cmdline"] or [])
            if line:
                seen.add(line)
        stop.wait(0.02)
