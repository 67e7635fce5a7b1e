"""The CI regression gate: compare a run with a stored baseline report.

A case regresses when its median latency grew by more than the tolerance over
the baseline's same case (same subject, what, backend, precision, layout,
resolution and batch). A case measured in the baseline that did not run now
(skipped, failed or absent) also fails the gate: losing a backend is a
regression too. Cases new in this run are listed and pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zturbo.bench.schema import SchemaError, validate_report
from zturbo.errors import InputError, UsageError, ZTurboError


class RegressionError(ZTurboError):
    """At least one case is slower than the baseline allows (exit code 1)."""


def parse_tolerance(text: str) -> float:
    """'10%' -> 0.10, '0.1' -> 0.10. Bare numbers are fractions."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise UsageError(f"--max-regression must be a percentage like 10% or a fraction like 0.1, got '{text}'") \
            from None
    if not 0 <= value < 10:
        raise UsageError(f"--max-regression must be between 0% and 1000%, got '{text}'")
    return value


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a stored bench JSON and check it against the schema."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"baseline file not found: {path}", "write one with: zturbo bench --json FILE")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read baseline {path}: {exc}") from exc
    try:
        validate_report(data)
    except SchemaError as exc:
        raise InputError(f"{path} is not a zturbo bench report: {exc}") from exc
    return data


def compare_with_baseline(current: dict[str, Any], baseline: dict[str, Any], max_regression: float) -> dict[str, Any]:
    """The gate's verdict: every matched case with its change, and whether all are within tolerance."""
    before = {c["key"]: c for c in baseline["cases"]}
    now = {c["key"]: c for c in current["cases"]}
    rows = []
    for key, old in before.items():
        if old["status"] != "ok":
            continue
        new = now.get(key)
        if new is None or new["status"] != "ok":
            why = "not run" if new is None else f"{new['status']}: {new['reason']}"
            rows.append({"key": key, "baseline_ms": old["median_ms"], "current_ms": None, "change": None,
                         "verdict": "missing", "note": why})
            continue
        change = new["median_ms"] / old["median_ms"] - 1.0
        verdict = "regressed" if change > max_regression else ("improved" if change < -max_regression else "ok")
        rows.append({"key": key, "baseline_ms": old["median_ms"], "current_ms": new["median_ms"], "change": change,
                     "verdict": verdict, "note": None})
    for key, new in now.items():
        if key not in before and new["status"] == "ok":
            rows.append({"key": key, "baseline_ms": None, "current_ms": new["median_ms"], "change": None,
                         "verdict": "new", "note": None})
    failures = [r for r in rows if r["verdict"] in ("regressed", "missing")]
    matched = [r for r in rows if r["verdict"] in ("ok", "improved", "regressed")]
    notes = []
    old_dev, new_dev = _device_name(baseline), _device_name(current)
    if old_dev != new_dev:
        notes.append(f"baseline was measured on {old_dev}, this run on {new_dev}: latencies are not comparable")
    if not matched and not failures:
        notes.append("no case of this run matches a measured baseline case")
    return {
        "max_regression": max_regression,
        "passed": not failures and bool(matched),
        "regressed": sum(r["verdict"] == "regressed" for r in rows),
        "missing": sum(r["verdict"] == "missing" for r in rows),
        "compared": len(matched),
        "notes": notes,
        "rows": rows,
    }


def _device_name(report: dict[str, Any]) -> str:
    env = report.get("environment", {})
    gpus = env.get("gpus") or []
    if report.get("plan", {}).get("device", "cpu").startswith("cuda") and gpus:
        return gpus[0]
    return env.get("cpu") or "unknown CPU"


def gate_error(verdict: dict[str, Any]) -> RegressionError:
    tol = f"{verdict['max_regression'] * 100:g}%"
    if not verdict["compared"] and not verdict["missing"]:
        return RegressionError("the baseline gate compared nothing: no case matches the baseline",
                               "run the same resolutions, batch sizes, backends and precision as the baseline")
    parts = []
    if verdict["regressed"]:
        parts.append(f"{verdict['regressed']} case(s) slower than the baseline by more than {tol}")
    if verdict["missing"]:
        parts.append(f"{verdict['missing']} baseline case(s) did not run")
    return RegressionError("benchmark regression: " + "; ".join(parts),
                           "see the gate table; if the change is intended, store this run's JSON as the new baseline")
