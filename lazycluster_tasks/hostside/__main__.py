"""``python hostside.pyz <program> ARGS``: run one of the host programs.

Only the program asked for is imported: a guard starts at every cluster start on every host,
beside the booting workers, and need not load the environments' builder."""

from __future__ import annotations

import importlib
import sys

PROGRAMS = ("authorized_keys", "envs", "guard")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in PROGRAMS:
        print(f"usage: hostside.pyz {{{','.join(PROGRAMS)}}} ARGS", file=sys.stderr)
        sys.exit(2)
    program = importlib.import_module(f"lazycluster_tasks.hostside.{sys.argv[1]}")
    sys.exit(program.main(sys.argv[2:]))


if __name__ == "__main__":
    main()
