"""Benchmark runner: suites, a method registry and results tables."""

from posthoc.bench.methods import METHODS, BenchContext, MethodSpec, get_methods, register_method
from posthoc.bench.runner import BenchReport, run_bench
from posthoc.bench.suites import BENCH_SUITES, BenchSuite, get_bench_suite

__all__ = [
    "METHODS",
    "BENCH_SUITES",
    "BenchContext",
    "BenchReport",
    "BenchSuite",
    "MethodSpec",
    "get_bench_suite",
    "get_methods",
    "register_method",
    "run_bench",
]

# the method families register their bench rows on import
from posthoc.bench import (  # noqa: E402,F401
    fiber_methods,  # noqa: E402,F401  (registers fiber_lastlayer, fiber_all)
    scalla_methods,
    streamlined_methods,
)
