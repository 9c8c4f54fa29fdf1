"""Programs that run on the hosts, and how they get there.

Each module here runs on a host with nothing but that host's Python and its standard library
(3.8 or newer), and nothing in it imports the rest of the package: ``authorized_keys`` (the one
edit of a user's ``~/.ssh/authorized_keys``), ``envs`` (the host's environments made of what the
controller sends), ``guard`` (what a host does by itself once no process of a cluster is left
on it), ``probe`` (the preflight), ``ready`` (a server's readiness wait), ``importable`` (the
worker class check), ``run_function`` (``RuntimeTask.run_function``'s call), ``sweep``
(what we left on a host); ``watch`` runs in the scheduler
(its preload) and ``code`` in each worker (``sync_code``). They are linted, typed and tested
as the rest.

They travel as their source (``python -c SOURCE ARGS``, or on a command's stdin as
``python - ARGS``), or the first three as one zip application in the cluster folder
(``python -I -S hostside.pyz guard ARGS``), with the package layout kept, so their imports are
the same here and there.
"""

from __future__ import annotations

import functools
import os

#: The modules shipped in the zip application (``__main__`` dispatches to them).
MODULES = ("__init__", "__main__", "authorized_keys", "envs", "guard")
#: Run by their source alone (``python -c``), never from the zip application.
SOURCES = ("importable", "probe", "ready", "run_function", "sweep", "watch")
#: Its name in a cluster folder.
BUNDLE = "hostside.pyz"


def source(module: str) -> str:
    """The text of one of the host programs (to run as ``python - ARGS`` on its stdin)."""
    if module not in MODULES + SOURCES:
        raise ValueError(f"not a host program: {module!r}")
    with open(os.path.join(os.path.dirname(__file__), f"{module}.py"), encoding="utf-8") as file:
        return file.read()


@functools.lru_cache(maxsize=None)  # noqa: UP033 - the package runs on hosts with 3.8
def bundle() -> bytes:
    """Every host program as one zip application: ``python hostside.pyz <program> ARGS``.

    Each module also goes compiled by this interpreter (an unchecked hash-based ``.pyc``): a
    host whose Python is of this minor version loads it without compiling (a guard's start is
    a third cheaper), any other finds the magic number is not its own and compiles the source.
    """
    import importlib.util
    import io
    import marshal
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(
            "__main__.py", "from lazycluster_tasks.hostside.__main__ import main\nmain()\n"
        )
        archive.writestr("lazycluster_tasks/__init__.py", "")
        for module in MODULES:
            where = f"lazycluster_tasks/hostside/{module}"
            text = source(module)
            code = compile(text, f"{BUNDLE}/{where}.py", "exec", dont_inherit=True)
            # PEP 552: magic, flags (hash-based, unchecked), the source's hash, the code
            header = importlib.util.MAGIC_NUMBER + (1).to_bytes(4, "little")
            compiled = header + importlib.util.source_hash(text.encode()) + marshal.dumps(code)
            archive.writestr(f"{where}.py", text)
            archive.writestr(f"{where}.pyc", compiled)
    return buffer.getvalue()
