"""`zturbo eval`: reconstruction quality of a checkpoint, alone or side by side with another."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zturbo.commands._common import (
    ConfigOpt,
    Flag,
    JsonOpt,
    LatentFamilyOpt,
    ProfileOpt,
    QuietOpt,
    model_arg,
    parse_list,
    settings_from,
    tile_flags,
    with_flags,
)

_METRIC_ALIASES = {
    "psnr": ("psnr", None),
    "ssim": ("ssim", None),
    "ms-ssim": ("ssim", None),
    "ms_ssim": ("ssim", None),
    "lpips": ("lpips", None),
    "lpips-alex": ("lpips", "alex"),
    "lpips_alex": ("lpips", "alex"),
    "lpips-vgg": ("lpips", "vgg"),
    "lpips_vgg": ("lpips", "vgg"),
    "rfid": ("rfid", None),
    "fid": ("rfid", None),
    "chroma_outlier": ("chroma_outlier", None),
    "chroma-outlier": ("chroma_outlier", None),
}


def parse_metrics(text: str | None) -> tuple[list[str] | None, list[str] | None]:
    """'psnr,ssim,lpips-alex' -> (['psnr', 'ssim', 'lpips'], ['alex']); plain 'lpips' keeps the configured nets."""
    from zturbo.errors import UsageError

    tokens = parse_list(text)
    if tokens is None:
        return None, None
    if not tokens:
        raise UsageError("--metrics is empty", f"choose from: {', '.join(_METRIC_ALIASES)}")
    metrics: list[str] = []
    nets: list[str] = []
    plain_lpips = False
    for token in tokens:
        try:
            metric, net = _METRIC_ALIASES[token.lower()]
        except KeyError:
            raise UsageError(
                f"unknown metric '{token}'", f"choose from: {', '.join(_METRIC_ALIASES)}"
            ) from None
        if metric not in metrics:
            metrics.append(metric)
        if net is None and metric == "lpips":
            plain_lpips = True
        elif net is not None and net not in nets:
            nets.append(net)
    return metrics, (nets if nets and not plain_lpips else None)


def parse_size(text: str | None) -> int | str | None:
    from zturbo.errors import UsageError

    if text is None or text == "native":
        return text
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--size must be an integer or 'native', got '{text}'") from None


def _metrics(text: str) -> dict[str, list[str] | None]:
    metrics, nets = parse_metrics(text)
    return {"eval.metrics": metrics, "eval.lpips_nets": nets}


FLAGS = [
    Flag("--size -s", "eval.size", str, "N: shorter side to N, center crop (default 256); 'native': padded, "
         "cropped back.", parse=parse_size),
    Flag("--metrics", "eval.metrics eval.lpips_nets", str,
         "psnr, ssim (+MS-SSIM), lpips (or lpips-alex, lpips-vgg), rfid, chroma_outlier (largest local "
         "colour outlier). Default psnr,ssim,lpips.", parse=_metrics),
    Flag("--backend", "eval.backend", str,
         "auto (default: what CHECKPOINT is; exports pick onnx / trt), torch, compile, onnx, trt."),
    Flag("--batch-size -b", "eval.batch_size", int, "Images per batch (default 8)."),
    Flag("--device", "eval.device", str, "auto, cpu, cuda, cuda:N or mps."),
    Flag("--precision", "eval.precision", str, "fp32, bf16 or fp16."),
    Flag("--max-images -n", "eval.max_images", int, "Evaluate the first N."),
    Flag("--image-column", "eval.image_column", str, "Parquet data: the column holding the image bytes."),
    *tile_flags("eval"),
]


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @with_flags(FLAGS)
    def eval_cmd(
        overrides: dict,
        checkpoint: Annotated[
            Path,
            typer.Argument(help="Model, run, step-N, diffusers or pipeline folder, a single .safetensors file, or an "
                                "ONNX / TensorRT export."),
        ],
        data: Annotated[Path, typer.Option("--data", "-d", help="Folder of images (subfolders included), or shards: "
                                           ".tar (WebDataset) or .parquet files, a folder of them, a glob or a brace "
                                           "pattern.")],
        compare: Annotated[
            Path | None, typer.Option("--compare", help="A second model evaluated on the same images.")
        ] = None,
        out: Annotated[
            Path | None,
            typer.Option("--out", "-o", help="Folder for per_image.csv, summary.json, contact sheet."),
        ] = None,
        latent_stats: Annotated[
            bool,
            typer.Option("--latent-stats", help="Per-channel latent mean/std and the implied scaling/shift factors."),
        ] = False,
        write: Annotated[
            bool, typer.Option(
                "--write",
                help="With --latent-stats: store them in the model's config.json (FLUX.2 layout: in its bn statistics).",
            )
        ] = False,
        latent_family: LatentFamilyOpt = None,
        profile: ProfileOpt = None,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Measure PSNR, SSIM / MS-SSIM, LPIPS and rFID of reconstructions, optionally against another model."""
        from zturbo.console import info, print_json, progress, stderr, stdout, warn
        from zturbo.eval import evaluate, render_tables, report_json, write_report
        from zturbo.paths import check_output_folder

        settings = settings_from(profile, config, overrides)
        checkpoint = model_arg(checkpoint, latent_family, "eval", quiet)
        compare = model_arg(compare, latent_family, "eval --compare", quiet)
        if latent_stats or write:
            _latent_stats(checkpoint, data, settings.eval, write, json_out, quiet)
            return
        if out is not None:
            check_output_folder(out, "--out")  # before the evaluation, not after it
        with progress(quiet or json_out) as bar:
            task = bar.add_task("eval", total=None)
            report = evaluate(
                checkpoint,
                data,
                settings.eval,
                compare=compare,
                # Metrics asked for by name must run; the default set drops what has no weights here.
                missing_weights="error" if "metrics" in overrides.get("eval", {}) else "skip",
                on_start=lambda total: bar.update(task, total=total),
                on_batch=lambda done, total: bar.update(task, completed=done),
            )
        for metric in report.unavailable:
            warn(
                f"{metric} left out: {report.unavailable[metric]} (name it in --metrics to make this an error)"
            )
        written = write_report(report, out) if out is not None else {}
        if json_out:
            payload = report_json(report)
            payload["written"] = {k: str(v) for k, v in written.items()}
            print_json(payload)
        else:
            render_tables(report, stdout)
            if written:
                info(f"wrote {', '.join(str(p) for p in written.values())}", quiet)
            elif not quiet:
                stderr.print("[dim]add --out DIR for the per-image CSV, summary.json and the contact sheet[/]")
        failed = report.data["failed"]
        if failed:
            from rich.markup import escape

            stderr.print(f"[bold red]error:[/] {len(failed)} image(s) failed and are left out of every metric "
                         f"({escape(failed[0]['name'])}: {escape(failed[0]['detail'])})", highlight=False,
                         soft_wrap=True)
            raise typer.Exit(1)


def _latent_stats(checkpoint, data, ecfg, write: bool, json_out: bool, quiet: bool) -> None:
    from zturbo.console import info, print_json, stdout
    from zturbo.errors import UsageError
    from zturbo.eval.latent_stats import latent_statistics, write_latent_stats
    from zturbo.utils import resolve_device

    if ecfg.size == "native":
        raise UsageError("--latent-stats needs a fixed --size (images are batched at one size)")
    stats = latent_statistics(
        checkpoint, data, size=ecfg.size, batch_size=ecfg.batch_size, device=str(resolve_device(ecfg.device)),
        max_images=ecfg.max_images,
    )
    written = str(write_latent_stats(stats)) if write else None
    if json_out:
        print_json({**stats.to_dict(), "written": written})
        return
    stdout.print(
        f"{stats.images} images, {stats.positions} latent positions per channel\n"
        f"latents_mean  {[round(v, 4) for v in stats.latents_mean]}\n"
        f"latents_std   {[round(v, 4) for v in stats.latents_std]}\n"
        f"shift_factor  {stats.shift_factor:.6g}\nscaling_factor {stats.scaling_factor:.6g}",
        highlight=False,
    )
    if stats.bn_running_mean is not None:
        stdout.print(
            f"bn.running_mean {[round(v, 4) for v in stats.bn_running_mean]}\n"
            f"bn.running_var  {[round(v, 4) for v in stats.bn_running_var]}",
            highlight=False,
        )
    if written:
        info(f"wrote the statistics to {written}", quiet)
