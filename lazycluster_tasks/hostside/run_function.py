"""Calls one function on a host for ``RuntimeTask.run_function``.

``python -c <this file>`` reads a cloudpickled ``(function, kwargs)`` from stdin, calls it and
prints, after whatever the function printed, a line of ``RESULT_MARK`` and the base64 of the
cloudpickled outcome: ``(True, value)`` or ``(False, (exception, traceback text))``. Exits with
``EXIT_NO_CLOUDPICKLE`` when the host's Python has no cloudpickle. Standard library otherwise.
"""

from __future__ import annotations

import base64
import sys
import traceback
from typing import Any

RESULT_MARK = "__LAZYCLUSTER_RESULT__:"
EXIT_NO_CLOUDPICKLE = 96


def outcome_of(function: Any, kwargs: dict[str, Any]) -> tuple[bool, Any]:
    """``(True, value)``, or ``(False, (exception, traceback text))`` if it raised."""
    try:
        return True, function(**kwargs)
    except BaseException as exc:  # reported to the caller, whatever it was
        return False, (exc, traceback.format_exc())


def main() -> None:
    try:
        import cloudpickle
    except ImportError as exc:
        sys.stderr.write(f"cloudpickle is not importable by {sys.executable}: {exc}\n")
        sys.exit(EXIT_NO_CLOUDPICKLE)
    function, kwargs = cloudpickle.loads(sys.stdin.buffer.read())
    outcome = outcome_of(function, kwargs)
    try:
        payload = cloudpickle.dumps(outcome)
    except Exception:  # an outcome that does not pickle: say why instead
        payload = cloudpickle.dumps((False, (None, traceback.format_exc())))
    sys.stdout.flush()
    sys.stdout.write("\n" + RESULT_MARK + base64.b64encode(payload).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
