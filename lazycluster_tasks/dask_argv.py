"""The Dask processes' command lines: ``dask scheduler`` and ``dask worker`` as argv, with our
options, the user's (in Dask's list or keyword form) and TLS. Pure: nothing here does I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lazycluster_tasks import hostside
from lazycluster_tasks.dask_commands import parameters
from lazycluster_tasks.dask_options import DaskOptions

if TYPE_CHECKING:
    from lazycluster_tasks.security import TLSPaths

SCHEDULER_MODULE = "distributed.cli.dask_scheduler"
WORKER_MODULE = "distributed.cli.dask_worker"
#: dask-cuda's worker command, as ``dask-cuda-worker`` and ``dask cuda worker`` run it
#: (``python -m dask_cuda.cli``: dask-cuda >= 23.06). Its CUDAWorker is no Worker: it starts
#: one Nanny per GPU it sees, so lazycluster gives each such process one GPU.
CUDA_WORKER_MODULE = "dask_cuda.cli"
CUDA_WORKER_CLASSES = ("dask_cuda.CUDAWorker", "dask_cuda.cuda_worker.CUDAWorker")
#: Seconds the scheduler lives on after its last client left (read by WATCH_PRELOAD).
CLIENT_TIMEOUT_ENV = "LAZYCLUSTER_CLIENT_TIMEOUT"


def server_env(folder: str, env: Mapping[str, str]) -> dict[str, str]:
    """Environment of a scheduler or worker: its temp files (a text preload becomes a .py file
    and a __pycache__, Dask's scratch space) go in the cluster folder and leave with it, never
    in the host's /tmp. The user's ``env`` comes last and wins."""
    return {"TMPDIR": folder, "DASK_TEMPORARY_DIRECTORY": folder, **env}


#: Scheduler preload, given as text (see hostside/watch.py).
WATCH_PRELOAD = hostside.source("watch")


def option_flags(role: str, given: Mapping[str, Any] | Sequence[Any]) -> list[str]:
    """The command-line arguments of ``given`` (see ``dask_commands.check_options``): a list
    as it is; each keyword option as its flag — ``True``/``False`` for on/off flags, a mapping as
    ``k=v`` pairs (resources), a list repeated for options taken many times (preload)."""
    if not isinstance(given, Mapping):
        return [str(item) for item in given]
    known = parameters(role)
    argv: list[str] = []
    for key, value in given.items():
        parameter = known[key.replace("-", "_")]
        flag = parameter.opts[0]
        if getattr(parameter, "is_flag", False) and parameter.secondary_opts:
            argv.append(flag if value else parameter.secondary_opts[0])
        elif isinstance(value, Mapping):
            argv += [flag, " ".join(f"{k}={v}" for k, v in value.items())]
        elif getattr(parameter, "multiple", False) and not isinstance(value, str):
            for item in value if isinstance(value, Sequence) else [value]:
                argv += [flag, str(item)]
        elif parameter.name == "dashboard_address" and str(value).startswith(":"):
            argv += [flag, f"127.0.0.1{value}"]  # a port only: still this host's own loopback
        else:
            argv += [flag, str(value)]
    return argv


def scheduler_argv(
    python: str,
    address: str,
    port: int,
    folder: str,
    options: DaskOptions,
    tls: TLSPaths | None = None,
) -> list[str]:
    """``dask scheduler`` bound to ``address:port``, dashboard pinned to 127.0.0.1; with
    ``tls`` it speaks only ``tls://`` and requires client certificates."""
    argv = [
        python,
        "-m",
        SCHEDULER_MODULE,
        "--host",
        address,
        "--port",
        str(port),
        "--dashboard-address",
        "127.0.0.1:0",
        "--scheduler-file",  # written once the scheduler listens: our readiness signal
        f"{folder}/scheduler.json",
        "--preload",
        WATCH_PRELOAD,
    ]
    if not options.dashboard:
        argv.append("--no-dashboard")
    return argv + tls_args(tls) + option_flags("scheduler", options.scheduler_options)


def tls_args(tls: TLSPaths | None) -> list[str]:
    """Dask's TLS flags: file paths only, never their contents."""
    if tls is None:
        return []
    return [
        "--protocol",
        "tls",
        "--tls-ca-file",
        tls.ca,
        "--tls-cert",
        tls.cert,
        "--tls-key",
        tls.key,
    ]


def cuda_worker(options: DaskOptions) -> bool:
    """Whether the workers are dask-cuda's (``worker_class="dask_cuda.CUDAWorker"``): started
    by its own command, one GPU each. ValueError with ``nanny=False`` (CUDAWorker always runs
    its workers under a nanny)."""
    if options.worker_class not in CUDA_WORKER_CLASSES:
        return False
    if not options.nanny:
        raise ValueError(
            f"worker_class {options.worker_class!r} runs each worker under a nanny of its own: "
            "nanny=False does not apply"
        )
    return True


def worker_argv(
    python: str,
    scheduler_address: str,
    name: str,
    folder: str,
    options: DaskOptions,
    *,
    address: str,
    port: int,
    nanny_port: int | None,
    loopback: bool,
    resources: Mapping[str, float] | None = None,
    tls: TLSPaths | None = None,
) -> list[str]:
    """``dask worker`` with explicit addresses: the host's own address (direct) or 127.0.0.1 with
    the same port on every node (``loopback``: tunnelled). For dask-cuda's CUDAWorker its own
    command with the same options, less those it has not: its nanny picks its port."""
    cuda = cuda_worker(options)
    module = CUDA_WORKER_MODULE if cuda else WORKER_MODULE
    argv = [python, "-m", module, scheduler_address, "--name", name]
    if loopback:
        contact = f"{'tls' if tls else 'tcp'}://127.0.0.1:{port}"
        argv += ["--listen-address", contact, "--contact-address", contact]
    else:
        argv += ["--host", address, "--worker-port", str(port)]
    if cuda:
        pass  # no --nanny/--nanny-port there: CUDAWorker starts its nanny itself
    elif options.nanny:
        argv += ["--nanny", "--nanny-port", str(nanny_port)]
    else:
        argv.append("--no-nanny")
    argv += [
        "--no-dashboard",
        "--death-timeout",
        str(options.death_timeout),
        "--local-directory",
        f"{folder}/{name}",
    ]
    if options.threads_per_worker:
        argv += ["--nthreads", str(options.threads_per_worker)]
    if options.memory_limit is not None:
        argv += ["--memory-limit", str(options.memory_limit)]
    if resources:
        argv += ["--resources", " ".join(f"{k}={v}" for k, v in resources.items())]
    if options.worker_class and not cuda:
        argv += ["--worker-class", options.worker_class]
    return argv + tls_args(tls) + option_flags("worker", options.worker_options)
