"""Run every benchmark in turn with its default options: ``python -m benchmarks.run_all``.

Add a benchmark by appending its module name to ``MODULES``; the module needs a
``main(argv: list[str] | None)`` that parses ``argv`` with argparse and returns its targets
(objects with a ``status``). A benchmark with a FAIL target (a failed repetition) is FAILED, one
that raised is CRASHED; either makes the exit status 1. A MISS is a result, not a failure.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from collections.abc import Sequence

from benchmarks.common import exit_code, print_table

MODULES: list[str] = [
    "benchmarks.host_layer",
    "benchmarks.cluster_layer",
    "benchmarks.healing",
    "benchmarks.security",
    "benchmarks.dataplane",
    "benchmarks.prefect_layer",
    "benchmarks.environments",
    "benchmarks.scale",
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__)
    parser.add_argument(
        "--only",
        action="append",
        metavar="MODULE",
        help="run only this benchmark (short name, e.g. host_layer); may be repeated",
    )
    args = parser.parse_args(argv)
    selected = MODULES
    if args.only:
        known = {m.rsplit(".", 1)[-1]: m for m in MODULES}
        unknown = sorted(set(args.only) - set(known))
        if unknown:
            parser.error(f"unknown benchmark(s): {', '.join(unknown)} (known: {', '.join(known)})")
        selected = [known[name] for name in args.only]
    rows = []
    for name in selected:
        print(f"\n===== {name} =====", flush=True)
        start = time.perf_counter()
        try:
            targets = importlib.import_module(name).main([])
            status = "FAILED" if exit_code(targets) else "ok"
        except Exception:
            traceback.print_exc()
            status = "CRASHED"
        rows.append([name, f"{time.perf_counter() - start:.0f}", status])
    print_table("benchmarks run", ["module", "seconds", "status"], rows)
    return 0 if all(row[2] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
