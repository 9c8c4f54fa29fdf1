"""``python hostside.pyz <program> ARGS``: run one of the host programs."""

from __future__ import annotations

import sys

from lazycluster_tasks.hostside import authorized_keys, envs, guard

PROGRAMS = {"authorized_keys": authorized_keys.main, "envs": envs.main, "guard": guard.main}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in PROGRAMS:
        print(f"usage: hostside.pyz {{{','.join(PROGRAMS)}}} ARGS", file=sys.stderr)
        sys.exit(2)
    sys.exit(PROGRAMS[sys.argv[1]](sys.argv[2:]))


if __name__ == "__main__":
    main()
