"""`zturbo bench`: latency, throughput, memory and MFU per case, comparisons, and a baseline gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zturbo.commands._common import ConfigOpt, ProfileOpt, QuietOpt, parse_int_list, parse_list, settings_from


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench(
        profile: ProfileOpt = None,
        config: ConfigOpt = None,
        model: Annotated[Path | None, typer.Option(
            "--model", help="Time a saved model (model, run, step-N, diffusers folder or an export) "
                            "instead of the profile's random init.")] = None,
        against: Annotated[str | None, typer.Option(
            "--against", help="Also time 'standard' (or any profile / .toml) or 'diffusers' (same config), "
                              "interleaved, and print the speedup next to the FLOP ratio.")] = None,
        resolutions: Annotated[str | None, typer.Option(
            "--resolutions", help="Comma-separated sizes (default: 256,512 on CPU, 512,1024 on GPU).")] = None,
        batch_sizes: Annotated[str | None, typer.Option(
            "--batch-sizes", help="Comma-separated batch sizes (default: 1,4 on CPU, 1,8,24 on GPU).")] = None,
        backend: Annotated[str | None, typer.Option(
            "--backend", help="Comma-separated: auto, torch, compile, onnx, trt (default: auto, what --model is).")] = None,
        precision: Annotated[str | None, typer.Option("--precision", help="fp32, bf16 or fp16 (default: fp32).")] = None,
        what: Annotated[str | None, typer.Option(
            "--what", help="Comma-separated: encode, decode, train (default: encode,decode).")] = None,
        repeats: Annotated[int | None, typer.Option("--repeats", help="Timed calls per case (default: 3 on CPU, 10 on GPU).")] = None,
        warmup: Annotated[int | None, typer.Option("--warmup", help="Untimed calls first (default: 2).")] = None,
        channels_last: Annotated[bool | None, typer.Option(
            "--channels-last/--no-channels-last", help="NHWC memory layout for weights and inputs.")] = None,
        device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N (default: auto).")] = None,
        json_file: Annotated[str | None, typer.Option(
            "--json", help="Write the report as JSON to FILE ('-': stdout); rewritten after every case.")] = None,
        markdown_file: Annotated[str | None, typer.Option(
            "--markdown", help="Write a Markdown summary to FILE ('-': stdout), e.g. $GITHUB_STEP_SUMMARY.")] = None,
        baseline: Annotated[Path | None, typer.Option(
            "--baseline", help="Stored bench JSON to compare with; exit 1 if a case regressed.")] = None,
        max_regression: Annotated[str | None, typer.Option(
            "--max-regression", help="Allowed slow-down per case for --baseline, e.g. 10% or 0.1 (default: 10%).")] = None,
        quiet: QuietOpt = False,
    ) -> None:
        """Benchmark encode/decode (and train) per resolution, batch, backend and precision."""
        from zturbo.bench import (
            compare_with_baseline,
            load_report,
            parse_tolerance,
            print_report,
            run_bench,
            to_markdown,
            write_json,
            write_markdown,
        )
        from zturbo.bench.gate import gate_error
        from zturbo.console import info, stderr, stdout
        from zturbo.errors import UsageError

        if json_file == "-" and markdown_file == "-":
            raise UsageError("--json - and --markdown - both want stdout", "write one of them to a file")
        tolerance = parse_tolerance(max_regression) if max_regression is not None else None
        overrides = {"bench": {
            "resolutions": parse_int_list(resolutions, "--resolutions"),
            "batch_sizes": parse_int_list(batch_sizes, "--batch-sizes"),
            "backends": parse_list(backend),
            "precision": precision,
            "what": parse_list(what),
            "repeats": repeats,
            "warmup": warmup,
            "channels_last": channels_last,
            "device": device,
            "against": against,
            "max_regression": tolerance,
        }}
        settings = settings_from(profile, config, overrides)
        stored = load_report(baseline) if baseline is not None else None
        to_file = json_file not in (None, "-")

        report = run_bench(
            settings,
            profile_name=profile,
            model_path=model,
            on_update=(lambda r: write_json(r, json_file)) if to_file else None,
            log=lambda line: info(line, quiet),
        )
        if stored is not None:
            report["gate"] = {"baseline": str(baseline),
                              **compare_with_baseline(report, stored, settings.bench.max_regression)}
        if to_file:
            write_json(report, json_file)
        if markdown_file not in (None, "-"):
            write_markdown(report, markdown_file)

        if json_file == "-":
            from zturbo.console import print_json

            print_json(report)
        elif markdown_file == "-":
            stdout.out(to_markdown(report), end="", highlight=False)
        if json_file == "-" or markdown_file == "-":
            if not quiet:
                print_report(report, stderr)
        else:
            print_report(report, stdout)
        if stored is not None and not report["gate"]["passed"]:
            raise gate_error(report["gate"])
