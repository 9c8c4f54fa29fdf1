"""Benchmarks: ``make bench`` (``python -m benchmarks.run_all``), or one module at a time."""
