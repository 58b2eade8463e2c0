"""Benchmarks of elastic-sgd (measurements, not timed tests).

``python -m bench.throughput`` and ``python -m bench.straggler`` each run their jobs on one
local Ray instance, write their numbers to ``bench/results/<name>.json`` together with the
machine they ran on, and regenerate their own table in ``docs/benchmarks.md``.
"""
