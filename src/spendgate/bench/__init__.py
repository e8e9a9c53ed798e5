"""The load-test harness: ``spendgate bench`` (``make bench``, ``python -m spendgate.bench``).

It starts (or drives) a spendgate server and measures, in the same run, the two ceilings its results are
ratios of: an empty gRPC handler on the same server stack, and the raw Redis rate of the authorize script.
See :mod:`spendgate.bench.runner` for the phases, :mod:`spendgate.bench.loadgen` for the load generator
and :mod:`spendgate.bench.check` for the end-of-run check that no limit was exceeded.
"""

from __future__ import annotations

from spendgate.bench.runner import ALL_PHASES, DEFAULT_PHASES, BenchOptions, BenchReport, run_bench

__all__ = ["ALL_PHASES", "DEFAULT_PHASES", "BenchOptions", "BenchReport", "run_bench"]
