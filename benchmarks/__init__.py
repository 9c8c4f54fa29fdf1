"""Benchmarks: ``make bench`` (``python -m benchmarks.run_all``), or one module at a time.

The functions a benchmark sends to workers live in this package, which is not installed. Our
clusters ship it with the user's code (the environment sync), but SSHCluster, run beside them,
ships nothing: its scheduler could not unpickle a task graph naming ``benchmarks`` (measured
from a fresh clone). The package is therefore pickled by value: its code travels with the tasks.
"""

import sys

import cloudpickle

cloudpickle.register_pickle_by_value(sys.modules[__name__])
