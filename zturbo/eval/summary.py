"""Statistics over an evaluation's per-image values: each metric's summary, and two models side by side."""

from __future__ import annotations

import math
import statistics
from typing import Any

from zturbo.eval.metrics import higher_is_better


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def summarize(values: list[float], names: list[str], metric: str, worst: int) -> dict[str, Any] | None:
    """Mean, median, std, range and the worst images of one metric.

    PSNR of an exact reconstruction is +inf: such images are counted as
    ``identical``, kept in the median (they sort above every finite value) and
    left out of the mean, which would otherwise be inf for the whole set.
    """
    valid = [(v, n) for v, n in zip(values, names) if v is not None and not math.isnan(v)]
    if not valid:
        return None
    finite = _finite([v for v, _ in valid])
    up = higher_is_better(metric)
    ordered = sorted(valid, key=lambda vn: vn[0], reverse=not up)  # worst first
    out = {
        "count": len(valid),
        "mean": statistics.fmean(finite) if finite else math.inf,
        "median": statistics.median(v for v, _ in valid),
        "std": statistics.pstdev(finite) if len(finite) > 1 else 0.0,
        "worst_value": ordered[0][0],
        "best_value": ordered[-1][0],
        "identical": sum(1 for v, _ in valid if math.isinf(v)),
        "worst": [{"name": n, "value": v} for v, n in ordered[:worst]],
    }
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return a / b


def compare_summaries(
    report_summary: dict, models: dict, dataset: dict, per_image: list[dict]
) -> dict[str, Any]:
    """Each metric's mean for both models, model / other, and how often the model wins image by image."""
    metrics: dict[str, Any] = {}
    ours, theirs = report_summary.get("model", {}), report_summary.get("other", {})
    for metric in ours:
        if metric not in theirs:
            continue
        a, b = ours[metric]["mean"], theirs[metric]["mean"]
        up = higher_is_better(metric)
        wins = ties = counted = 0
        for row in per_image:
            va, vb = row["model"].get(metric), row["other"].get(metric)
            if va is None or vb is None or math.isnan(va) or math.isnan(vb):
                continue
            counted += 1
            if va == vb:
                ties += 1
            elif (va > vb) == up:
                wins += 1
        metrics[metric] = {
            "model": a,
            "other": b,
            "ratio": _ratio(a, b),
            "difference": a - b if math.isfinite(a) and math.isfinite(b) else None,
            "higher_is_better": up,
            "model_better_images": wins,
            "tied_images": ties,
            "images": counted,
        }
    for metric in dataset.get("model", {}):
        if metric in dataset.get("other", {}):
            a, b = dataset["model"][metric], dataset["other"][metric]
            metrics[metric] = {
                "model": a,
                "other": b,
                "ratio": _ratio(a, b),
                "difference": a - b,
                "higher_is_better": higher_is_better(metric),
            }
    speed_a, speed_b = models["model"]["images_per_s"], models["other"]["images_per_s"]
    return {
        "metrics": metrics,
        "speed": {
            "model_images_per_s": speed_a,
            "other_images_per_s": speed_b,
            "ratio": _ratio(speed_a, speed_b),
            "what": "encode + decode throughput on the same batches, interleaved, after one warm-up batch each",
        },
    }
