"""Rendering a bench report: a rich table for people, Markdown for CI job summaries, JSON for machines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zturbo.utils import atomic_write_text

CASE_COLUMNS = ("subject", "what", "backend", "prec", "res", "batch", "median ms", "p90 ms", "img/s", "peak MiB",
                "GFLOP/img", "TFLOP/s", "MFU", "speedup", "FLOP ratio", "note")



def write_json(report: dict[str, Any], path: str | Path) -> None:
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _speedups(report: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
    out = {}
    for c in report.get("comparisons", []):
        out[(c["what"], c["backend"], c["precision"], c["channels_last"], c["resolution"], c["batch"])] = c
    return out


def _joined(values) -> str:
    return ",".join(str(v) for v in dict.fromkeys(values))


def case_rows(report: dict[str, Any]) -> list[list[str]]:
    """One list of cell strings per measured case, in CASE_COLUMNS order."""
    speedups = _speedups(report)
    rows = []
    for c in report["cases"]:
        if c["status"] != "ok":
            continue
        comp = speedups.get((c["what"], c["backend"], c["precision"], c["channels_last"], c["resolution"], c["batch"]))
        mine = comp is not None and c["role"] == "ours"
        gflop = c["flops_per_image"] / 1e9 if c["flops_per_image"] is not None else None
        rows.append([
            c["subject"], c["what"], c["backend"], c["precision"] + ("/cl" if c["channels_last"] else ""),
            str(c["resolution"]), str(c["batch"]),
            _num(c["median_ms"], ".2f"), _num(c["p90_ms"], ".2f"), _num(c["images_per_s"], ".2f"),
            _num(c["peak_memory_mb"], ".0f"), _num(gflop, ".1f"), _num(c["tflops"], ".3g"),
            "-" if c["mfu"] is None else f"{c['mfu'] * 100:.1f}%",
            f"{comp['speedup']:.2f}x" if mine else "-",
            _num(comp["flop_ratio"], ".2f") + "x" if mine and comp["flop_ratio"] else "-",
            f"micro-batch {c['micro_batch']}" if c.get("micro_batch") else "",
        ])
    return rows


def unrun_lines(report: dict[str, Any]) -> list[str]:
    """Cases that did not run, one line per (subject, backend, precision, reason)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in report["cases"]:
        if c["status"] != "ok":
            key = (c["subject"], c["backend"], c["precision"] + ("/cl" if c["channels_last"] else ""), c["status"],
                   c["reason"])
            groups.setdefault(key, []).append(c)
    return [
        f"{status}: {subject} {backend} {prec} {_joined(c['what'] for c in cases)} at "
        f"{_joined(c['resolution'] for c in cases)} px, batch {_joined(c['batch'] for c in cases)}: {reason}"
        for (subject, backend, prec, status, reason), cases in groups.items()
    ]


def comparison_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for c in report.get("comparisons", []):
        rows.append([
            f"{c['ours']} vs {c['against']}", c["what"], c["backend"],
            c["precision"] + ("/cl" if c["channels_last"] else ""), str(c["resolution"]), str(c["batch"]),
            f"{c['ours_ms']:.2f}", f"{c['against_ms']:.2f}", f"{c['speedup']:.2f}x",
            _num(c["flop_ratio"], ".2f") + ("x" if c["flop_ratio"] else ""),
            "-" if c["efficiency"] is None else f"{c['efficiency'] * 100:.0f}%",
        ])
    return rows


COMPARISON_COLUMNS = ("pair", "what", "backend", "prec", "res", "batch", "ours ms", "theirs ms", "speedup",
                      "FLOP ratio", "speedup / FLOP ratio")
GATE_COLUMNS = ("case", "baseline ms", "now ms", "change", "verdict")


def gate_rows(gate: dict[str, Any]) -> list[list[str]]:
    return [
        [r["key"], _num(r["baseline_ms"], ".2f"), _num(r["current_ms"], ".2f"),
         "-" if r["change"] is None else f"{r['change'] * 100:+.1f}%",
         r["verdict"] + (f" ({r['note']})" if r.get("note") else "")]
        for r in gate["rows"]
    ]


def environment_line(report: dict[str, Any]) -> str:
    env = report["environment"]
    device = report["plan"]["device"]
    where = (env.get("gpus") or ["?"])[0] if device.startswith("cuda") else env.get("cpu", "?")
    bits = [f"{device}: {where}", f"torch {env.get('torch')}"]
    if env.get("cuda"):
        bits.append(f"CUDA {env['cuda']}")
    if env.get("cudnn"):
        bits.append(f"cuDNN {env['cudnn']}")
    if env.get("cuda_driver"):
        bits.append(f"driver {env['cuda_driver']}")
    trt = (env.get("backends") or {}).get("tensorrt")
    if trt:
        bits.append(f"TensorRT {trt}")
    if env.get("git_commit"):
        bits.append(f"commit {env['git_commit']}")
    return ", ".join(bits)


def peak_line(report: dict[str, Any]) -> str:
    peak = report.get("peak")
    if not peak:
        return "matmul peak: not measured"
    return (f"MFU denominator: {peak['dtype']} {peak['size']}x{peak['size']} matmul measured in this run at "
            f"{peak['tflops']:.2f} TFLOP/s")


def print_report(report: dict[str, Any], console) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"zturbo bench ({environment_line(report)})", title_justify="left")
    for col in CASE_COLUMNS:
        table.add_column(col, justify="left" if col in ("subject", "what", "backend", "prec", "note") else "right",
                         no_wrap=col != "note")
    for row in case_rows(report):
        table.add_row(*(escape(cell) for cell in row))
    console.print(table)
    for line in unrun_lines(report):
        console.print(f"  [yellow]{escape(line)}[/]", highlight=False, soft_wrap=True)
    console.print(peak_line(report), highlight=False)
    if report.get("comparisons"):
        comp = Table(title="speedup (their median / ours) next to the FLOP ratio the arithmetic predicts",
                     title_justify="left")
        for col in COMPARISON_COLUMNS:
            comp.add_column(col, justify="left" if col in ("pair", "what", "backend", "prec") else "right")
        for row in comparison_rows(report):
            comp.add_row(*row)
        console.print(comp)
    gate = report.get("gate")
    if gate:
        tol = f"{gate['max_regression'] * 100:g}%"
        verdict = "[green]passed[/]" if gate["passed"] else "[bold red]FAILED[/]"
        gtable = Table(title=f"baseline gate vs {gate['baseline']} (tolerance {tol}): {verdict}", title_justify="left")
        for col in GATE_COLUMNS:
            gtable.add_column(col, justify="left" if col in ("case", "verdict") else "right")
        for row in gate_rows(gate):
            gtable.add_row(*(escape(cell) for cell in row))
        console.print(gtable)
        for note in gate["notes"]:
            console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


def _md_table(columns, rows) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    """GitHub-flavoured Markdown, for ``$GITHUB_STEP_SUMMARY``."""
    lines = ["## zturbo bench", "", f"{environment_line(report)}  ", peak_line(report), ""]
    if not report.get("complete", True):
        lines += ["**Partial results: the run did not finish.**", ""]
    lines += _md_table(CASE_COLUMNS, case_rows(report))
    unrun = unrun_lines(report)
    if unrun:
        lines += ["", "Not run:", ""] + [f"- {line}" for line in unrun]
    if report.get("comparisons"):
        lines += ["", "### Speedup vs FLOP ratio", ""]
        lines += _md_table(COMPARISON_COLUMNS, comparison_rows(report))
    gate = report.get("gate")
    if gate:
        tol = f"{gate['max_regression'] * 100:g}%"
        status = "passed" if gate["passed"] else "**FAILED**"
        lines += ["", f"### Baseline gate: {status} (tolerance {tol}, baseline `{gate['baseline']}`)", ""]
        lines += _md_table(GATE_COLUMNS, gate_rows(gate))
        lines += [f"> {note}" for note in gate["notes"]]
    return "\n".join(lines) + "\n"


def write_markdown(report: dict[str, Any], path: str | Path) -> None:
    atomic_write_text(path, to_markdown(report))
