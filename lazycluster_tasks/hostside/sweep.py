"""What lazycluster left on this host, found without changing anything (``lazycluster sweep``).

``python -c <this file> [DIR…]`` prints one JSON line: the cluster folders
(``lazycluster-<12 hex>``, directly in the temp dir or in one of our working dirs there, or in a
DIR given) with the pids their pid files name and whether each still runs, and the markers of
the links' keys in ``~/.ssh/authorized_keys``. Standard library only.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from typing import Dict, Iterator, List  # noqa: UP035 - the package runs on hosts with 3.8

FOLDER = re.compile(r"lazycluster-[0-9a-f]{12}\Z")
WORKING_DIR = re.compile(r"lazycluster-[A-Za-z0-9]{8}\Z")  # mktemp's lazycluster-XXXXXXXX
MARKER = re.compile(rb"lazycluster-link-[A-Za-z0-9_-]+")


def _dirs(path: str) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    yield entry
    except OSError:
        return


def folders(roots: List[str]) -> List[str]:  # noqa: UP006
    found: List[str] = []  # noqa: UP006
    for root in roots:
        candidates = [root]
        for entry in _dirs(root):
            if WORKING_DIR.match(entry.name):
                candidates.append(entry.path)
        for place in candidates:
            for entry in _dirs(place):
                if FOLDER.match(entry.name) and entry.path not in found:
                    found.append(entry.path)
    return found


def pids(folder: str) -> Dict[str, bool]:  # noqa: UP006
    """pid -> whether it runs, for each pid file of the folder."""
    found: Dict[str, bool] = {}  # noqa: UP006
    for entry in sorted(os.listdir(folder)):
        if not entry.endswith(".pid"):
            continue
        try:
            with open(os.path.join(folder, entry)) as handle:
                pid = handle.read().strip()
        except OSError:
            continue
        if pid.isdigit():
            found[pid] = os.path.exists(f"/proc/{pid}")
    return found


def markers(path: str) -> List[str]:  # noqa: UP006
    """The links' key markers (one per cluster) in the file's comments."""
    try:
        with open(path, "rb") as handle:
            text = handle.read()
    except OSError:
        return []
    found = set()
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[-1].startswith(b"lazycluster-link-"):
            match = MARKER.match(fields[-1])
            if match:
                found.add(match.group(0).decode())
    return sorted(found)


def main() -> None:
    roots = []
    for root in [tempfile.gettempdir(), "/tmp", *sys.argv[1:]]:
        path = os.path.realpath(os.path.expanduser(root))
        if os.path.isdir(path) and path not in roots:
            roots.append(path)
    keys = os.path.join(os.path.expanduser("~"), ".ssh", "authorized_keys")
    answer = {
        "folders": [{"path": f, "pids": pids(f)} for f in folders(roots)],
        "markers": markers(keys),
        "python": sys.executable,
    }
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
