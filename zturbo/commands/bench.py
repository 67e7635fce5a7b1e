"""`zturbo bench`: latency, throughput, memory and MFU per case, comparisons, and a baseline gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zturbo.commands._common import (
    ConfigOpt,
    Flag,
    LatentFamilyOpt,
    ProfileOpt,
    QuietOpt,
    model_arg,
    parse_int_list,
    parse_list,
    settings_from,
    tile_flags,
    with_flags,
)


def _tolerance(text: str) -> float:
    from zturbo.bench import parse_tolerance

    return parse_tolerance(text)


FLAGS = [
    Flag("--against", "bench.against", str, "Also time 'standard' (or any profile / .toml) or 'diffusers' (same "
         "config), interleaved, and print the speedup next to the FLOP ratio."),
    Flag("--resolutions", "bench.resolutions", str, "Comma-separated sizes (default: 256,512 on CPU, 512,1024 on GPU).",
         parse=lambda text: parse_int_list(text, "--resolutions")),
    Flag("--batch-sizes", "bench.batch_sizes", str, "Comma-separated batch sizes (default: 1,4 on CPU, 1,8,24 on GPU).",
         parse=lambda text: parse_int_list(text, "--batch-sizes")),
    Flag("--backend", "bench.backends", str,
         "Comma-separated: auto, torch, compile, onnx, trt (default: auto, what --model is).", parse=parse_list),
    Flag("--precision", "bench.precision", str, "fp32, bf16 or fp16 (default: fp32)."),
    Flag("--what", "bench.what", str, "Comma-separated: encode, decode, train (default: encode,decode).",
         parse=parse_list),
    Flag("--repeats", "bench.repeats", int, "Timed calls per case (default: 3 on CPU, 10 on GPU)."),
    Flag("--warmup", "bench.warmup", int, "Untimed calls first (default: 2)."),
    Flag("--channels-last/--no-channels-last", "bench.channels_last", bool, "NHWC memory layout for weights and inputs."),
    Flag("--device", "bench.device", str, "auto, cpu, cuda, cuda:N (default: auto)."),
    Flag("--max-regression", "bench.max_regression", str,
         "Allowed slow-down per case for --baseline, e.g. 10% or 0.1 (default: 10%).", parse=_tolerance),
    *tile_flags("bench"),
]


def register(app: typer.Typer) -> None:
    @app.command("bench")
    @with_flags(FLAGS)
    def bench(
        overrides: dict,
        profile: ProfileOpt = None,
        config: ConfigOpt = None,
        model: Annotated[Path | None, typer.Option(
            "--model", help="Time a saved model (model, run, step-N, diffusers folder, single .safetensors file or "
                            "an export) instead of the profile's random init.")] = None,
        latent_family: LatentFamilyOpt = None,
        json_file: Annotated[str | None, typer.Option(
            "--json", help="Write the report as JSON to FILE ('-': stdout); rewritten after every case.")] = None,
        markdown_file: Annotated[str | None, typer.Option(
            "--markdown", help="Write a Markdown summary to FILE ('-': stdout), e.g. $GITHUB_STEP_SUMMARY.")] = None,
        baseline: Annotated[Path | None, typer.Option(
            "--baseline", help="Stored bench JSON to compare with; exit 1 if a case regressed.")] = None,
        quiet: QuietOpt = False,
    ) -> None:
        """Benchmark encode/decode (and train) per resolution, batch, backend and precision."""
        from zturbo.bench import (
            compare_with_baseline,
            load_report,
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
        settings = settings_from(profile, config, overrides)
        model = model_arg(model, latent_family, "bench --model", quiet)
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
