"""Eval outputs: the summary tables, per-image CSV, summary JSON and contact sheet.

JSON has no infinity, so an identical reconstruction's PSNR is written as the
string ``"inf"`` (and NaN, a metric that does not apply, as ``null``) in JSON;
the CSV writes ``inf`` and an empty cell.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from rich.markup import escape

from zturbo.eval.runner import EvalReport
from zturbo.eval.sheet import render_sheet
from zturbo.paths import ensure_output_folder
from zturbo.utils import atomic_write_text

CSV_NAME = "per_image.csv"
JSON_NAME = "summary.json"
SHEET_NAME = "contact_sheet.png"


def json_safe(obj: Any) -> Any:
    """Replace non-finite floats: +/-inf -> "inf" / "-inf", NaN -> None."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def report_json(report: EvalReport, per_image: bool = True) -> dict[str, Any]:
    return json_safe(report.to_dict(per_image=per_image))


def _cell(value: float | None) -> str:
    if value is None or math.isnan(value):
        return ""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.6g}"


def per_image_csv(report: EvalReport) -> str:
    keys = list(report.models)
    metrics = [m for m in report.metrics if m in {k for r in report.per_image for k in r["model"]}]
    columns = ["name", "width", "height", "source_width", "source_height"]
    if len(keys) == 1:
        columns += metrics
    else:
        columns += [f"{key}_{m}" for m in metrics for key in keys]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in report.per_image:
        cells = [row["name"], row["width"], row["height"], row["source_width"], row["source_height"]]
        for m in metrics:
            for key in keys:
                cells.append(_cell(row[key].get(m)))
        writer.writerow(cells)
    return buf.getvalue()


def write_report(report: EvalReport, out_dir: str | Path) -> dict[str, Path]:
    """per_image.csv, summary.json and contact_sheet.png in ``out_dir``, each written atomically."""
    out = ensure_output_folder(out_dir, "--out")
    written = {"csv": out / CSV_NAME, "json": out / JSON_NAME}
    atomic_write_text(written["csv"], per_image_csv(report))
    atomic_write_text(written["json"], json.dumps(report_json(report), indent=2) + "\n")
    if report.sheet is not None and report.rank_metric is not None:
        values = {r["name"]: {k: r[k][report.rank_metric] for k in report.models} for r in report.per_image}
        names = {k: v["name"] for k, v in report.models.items()}
        sheet = render_sheet(report.sheet, out / SHEET_NAME, names, values)
        if sheet is not None:
            written["sheet"] = sheet
    return written


# ---------------------------------------------------------------------------------------------------------
# Terminal tables


def fmt(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf"
    if metric.startswith(("psnr", "rfid", "chroma_outlier")):
        return f"{value:.2f}"
    return f"{value:.4f}"


def _unit(metric: str) -> str:
    arrow = "^" if metric.startswith(("psnr", "ssim", "ms_ssim")) else "v"
    return f"{metric}{' dB' if metric == 'psnr' else ''} {arrow}"


def render_tables(report: EvalReport, console) -> None:
    """The summary for people: per-metric statistics, worst images, comparison and speed."""
    from rich.table import Table

    keys = list(report.models)
    d = report.data
    console.print(
        f"[bold]eval[/] {d['evaluated']} images from {escape(d['dir'])} at size {d['size']}"
        + (f", {len(d['skipped'])} skipped" if d["skipped"] else "")
        + (f", {len(d['failed'])} failed" if d.get("failed") else ""),
        highlight=False,
    )
    for key in keys:
        m = report.models[key]
        stats = report.summary[key]
        table = Table(
            title=f"{m['name']} ({m['backend']}, {m['device']}, {m['dtype']})", title_justify="left"
        )
        for col in ("metric", "mean", "median", "std", "worst", "best", "n"):
            table.add_column(col, justify="left" if col == "metric" else "right", no_wrap=True)
        for metric, s in stats.items():
            n = f"{s['count']}" + (f" ({s['identical']} identical)" if s["identical"] else "")
            table.add_row(
                _unit(metric),
                fmt(metric, s["mean"]),
                fmt(metric, s["median"]),
                fmt(metric, s["std"]),
                fmt(metric, s["worst_value"]),
                fmt(metric, s["best_value"]),
                n,
            )
        for metric, value in report.dataset_metrics.get(key, {}).items():
            table.add_row(_unit(metric), fmt(metric, value), "", "", "", "", str(d["evaluated"]))
        console.print(table)
    rank = report.rank_metric
    if rank and report.summary["model"].get(rank, {}).get("worst"):
        worst = report.summary["model"][rank]["worst"]
        console.print(
            f"worst by {rank}: " + ", ".join(f"{escape(w['name'])} ({fmt(rank, w['value'])})" for w in worst),
            highlight=False,
        )
    if report.compare is not None:
        names = {k: report.models[k]["name"] for k in keys}
        table = Table(title=f"{names['model']} vs {names['other']} (same images)", title_justify="left")
        for col in ("metric", names["model"], names["other"], "ratio", "model better on"):
            table.add_column(col, justify="left" if col == "metric" else "right", no_wrap=True)
        for metric, c in report.compare["metrics"].items():
            better = f"{c['model_better_images']}/{c['images']}" if "images" in c else ""
            ratio = "-" if c["ratio"] is None else f"{c['ratio']:.3f}"
            table.add_row(_unit(metric), fmt(metric, c["model"]), fmt(metric, c["other"]), ratio, better)
        speed = report.compare["speed"]
        table.add_row(
            "images/s ^",
            f"{speed['model_images_per_s']:.2f}",
            f"{speed['other_images_per_s']:.2f}",
            "-" if speed["ratio"] is None else f"{speed['ratio']:.3f}",
            "",
        )
        console.print(table)
    t = report.timing
    metric_s = sum(t["metrics_s"].values())
    recon_s = sum(t["reconstruct_s"].values())
    console.print(
        f"time: {t['wall_s']:.1f} s wall, {t['images_per_s']:.2f} images/s; reconstruction {recon_s:.1f} s, "
        f"metrics {metric_s:.1f} s, image loading {t['load_s']:.1f} s",
        highlight=False,
    )
    for s in d["skipped"]:
        console.print(f"[yellow]skipped[/] {escape(s['path'])}: {s['reason']}", highlight=False)
    for f in d.get("failed", []):
        console.print(f"[red]failed[/] {escape(f['name'])}: {f['reason']} ({escape(f['detail'])})", highlight=False)
    for note in report.notes:
        console.print(f"[dim]note:[/] {note}", highlight=False)
