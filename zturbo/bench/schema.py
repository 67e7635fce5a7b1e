"""The bench report's JSON schema (``schema.json``, shipped with the package) and its check."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any


class SchemaError(ValueError):
    """A report does not match the schema; the message names the first offending field."""


@lru_cache(maxsize=1)
def report_schema() -> dict[str, Any]:
    return json.loads((resources.files("zturbo.bench") / "schema.json").read_text(encoding="utf-8"))


def validate_report(report: Any) -> None:
    """Raise SchemaError unless ``report`` matches the schema.

    With ``jsonschema`` installed (the dev extra) the full schema is checked;
    without it, the fields the baseline gate reads are.
    """
    try:
        import jsonschema
    except ImportError:
        _check_gate_fields(report)
        return
    validator = jsonschema.Draft202012Validator(report_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(report))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise SchemaError(f"{where}: {error.message}")


def _check_gate_fields(report: Any) -> None:
    if not isinstance(report, dict) or report.get("schema") != report_schema()["properties"]["schema"]["const"]:
        raise SchemaError("schema: not a zturbo-bench/1 report")
    cases = report.get("cases")
    if not isinstance(cases, list):
        raise SchemaError("cases: missing or not a list")
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or not isinstance(case.get("key"), str) or case.get("status") not in (
            "ok", "skipped", "failed"
        ):
            raise SchemaError(f"cases/{i}: needs a key and a status of ok, skipped or failed")
        if case["status"] == "ok" and not (isinstance(case.get("median_ms"), (int, float)) and case["median_ms"] > 0):
            raise SchemaError(f"cases/{i}/median_ms: a measured case needs a positive median")
