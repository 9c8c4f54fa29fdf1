"""Whether a class or function named by a dotted path imports on this host.

``python -c <this file> NAME`` prints one JSON line: {"NAME": ""} when it imports, else
{"NAME": "<the error's first line>"}; exit 0 either way. Standard library only.
"""

from __future__ import annotations

import importlib
import json
import sys


def check(name: str) -> str:
    """ "" when ``name`` ("package.module.Attribute") imports, else why not."""
    module, _, attribute = name.rpartition(".")
    try:
        getattr(importlib.import_module(module), attribute)
    except Exception as exc:  # anything the import raises is the answer
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    return ""


def main() -> None:
    print(json.dumps({name: check(name) for name in sys.argv[1:]}))


if __name__ == "__main__":
    main()
