"""Benchmarks: latency, throughput, memory and FLOP utilisation, with a CI regression gate.

    >>> from zturbo.config import load_settings
    >>> from zturbo.bench import run_bench, to_markdown
    >>> report = run_bench(load_settings("fast", overrides={"bench": {"against": "standard"}}))
    >>> print(to_markdown(report))
"""

from zturbo.bench.gate import RegressionError, compare_with_baseline, load_report, parse_tolerance
from zturbo.bench.report import print_report, to_markdown, write_json, write_markdown
from zturbo.bench.runner import SCHEMA_ID, case_key, compare, make_plan, run_bench
from zturbo.bench.schema import SchemaError, validate_report

__all__ = [
    "SCHEMA_ID",
    "RegressionError",
    "SchemaError",
    "case_key",
    "compare",
    "compare_with_baseline",
    "load_report",
    "make_plan",
    "parse_tolerance",
    "print_report",
    "run_bench",
    "to_markdown",
    "validate_report",
    "write_json",
    "write_markdown",
]
