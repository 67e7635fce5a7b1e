"""`zturbo export` (ONNX / TensorRT / diffusers folder / single file) and `zturbo import` (`import-diffusers`)."""

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
    say_line,
    settings_from,
    with_flags,
)


def _triple(text: str | None, name: str) -> tuple[int, int, int] | None:
    from zturbo.errors import UsageError

    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(":"))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise UsageError(f"{name} must be MIN:OPT:MAX (or one number), got '{text}'", f"e.g. {name} 1:8:24")
    return values  # type: ignore[return-value]


FLAGS = [
    Flag("--format -f", "export.format", str, "onnx | trt | diffusers | single-file (one .safetensors for ComfyUI, "
         "Forge, InvokeAI, diffusers)."),
    Flag("--part", "export.parts", str, "encoder,decoder (default both).", parse=parse_list),
    Flag("--precision", "export.precision", str, "fp32 | fp16 (| bf16 for single-file)."),
    Flag("--layout", "export.layout", str, "single-file key names: ldm (LDM/BFL, default) | diffusers."),
    Flag("--force/--no-force", "export.force", bool,
         "single-file: write a model the other tools' loaders cannot express (zturbo still reads it)."),
    Flag("--opset", "export.opset", int, "ONNX opset (18-23)."),
    Flag("--batch", "export.batch", str, "MIN:OPT:MAX batch (TRT profile).", parse=lambda t: _triple(t, "--batch")),
    Flag("--size", "export.size", str, "MIN:OPT:MAX image side in pixels.", parse=lambda t: _triple(t, "--size")),
    Flag("--scaled/--unscaled", "export.apply_scaling", bool, "Graphs apply scaling/shift factors."),
    Flag("--verify/--no-verify", "export.verify", bool, "Compare with torch."),
    Flag("--fp16-headroom", "export.fp16_headroom", float, "Keep fp32 where |x| > 65504 / this."),
]
# --trt: shorthand for these, each unless given explicitly.
TRT_SHORTHAND = {"format": "trt", "precision": "fp16"}


def register(app: typer.Typer) -> None:
    @app.command("export")
    @with_flags(FLAGS)
    def export(
        overrides: dict,
        checkpoint: Annotated[
            Path,
            typer.Argument(help="Model, run (its EMA weights), step-N, diffusers or diffusers pipeline folder, or a "
                                "single .safetensors file."),
        ],
        out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (a .safetensors file for single-file).")],
        trt: Annotated[
            bool, typer.Option("--trt", help="Shorthand for --format trt --precision fp16.")
        ] = False,
        latent_family: LatentFamilyOpt = None,
        profile: ProfileOpt = None,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Export a checkpoint's EMA weights as ONNX graphs, TensorRT FP16 engines, a diffusers folder or one file."""
        from zturbo.backends.verify import export_checkpoint
        from zturbo.console import info, print_json
        from zturbo.errors import UsageError

        if trt:
            given = overrides.get("export", {})
            if given.get("format", "trt") != "trt":
                raise UsageError(f"--trt contradicts --format {given['format']}")
            overrides = {**overrides, "export": {**TRT_SHORTHAND, **given}}
        settings = settings_from(profile, config, overrides)
        checkpoint = model_arg(checkpoint, latent_family, "export", quiet)
        meta = export_checkpoint(checkpoint, out, settings.export, log=lambda m: info(m, quiet))
        if json_out:
            print_json(meta)
        else:
            _print_summary(meta, out)

    def import_cmd(
        source: Annotated[
            Path,
            typer.Argument(help="A single .safetensors file, a diffusers AutoencoderKL folder, a pipeline with vae/, "
                                "or any model / run / step-N."),
        ],
        out: Annotated[Path, typer.Option("--out", "-o", help="zturbo model folder to write.")],
        encoder_from: Annotated[
            Path | None,
            typer.Option("--encoder-from", help="For a decoder-only file: the VAE whose encoder (and latent factors) "
                                                "complete it, e.g. the teacher it was distilled from."),
        ] = None,
        verify: Annotated[bool, typer.Option("--verify", help="Compare outputs with diffusers.")] = False,
        latent_family: LatentFamilyOpt = None,
        json_out: JsonOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Import a VAE (a single file such as ae.safetensors, or a diffusers folder) as a zturbo model folder."""
        from zturbo.artifacts import TORCH_KINDS, require
        from zturbo.console import info, print_json, stdout
        from zturbo.errors import UsageError
        from zturbo.export import import_model
        from zturbo.model.single_file import open_single_file

        if encoder_from is not None:
            if not source.is_file():
                raise UsageError(f"--encoder-from completes a decoder-only single file; {source} is no file")
            teacher = model_arg(encoder_from, latent_family, "import --encoder-from", quiet)
            single = open_single_file(source, latent_family, require(teacher, TORCH_KINDS, "import --encoder-from")
                                      .load_vae())
            say_line(single.note, quiet)
            vae, weights = single.load(), source
        else:
            artifact = require(model_arg(source, latent_family, "import", quiet), TORCH_KINDS, "import")
            vae, weights = artifact.load_vae(), artifact.source
        report = import_model(vae, weights, out, verify=verify, log=lambda m: info(m, quiet))
        if json_out:
            print_json(report)
            return
        stdout.print(
            f"wrote {report['out']} ({report['parameters'] / 1e6:.1f} M parameters)", highlight=False
        )
        for part, stats in report.get("verify", {}).items():
            stdout.print(f"  {part} vs diffusers: max abs {stats['max_abs']:.3g}", highlight=False)

    app.command("import")(import_cmd)
    # The command's name before it read single files; kept so existing scripts keep working.
    app.command("import-diffusers", hidden=True)(import_cmd)


def _print_summary(meta: dict, out: Path) -> None:
    from rich.table import Table

    from zturbo.console import stdout

    if meta.get("format") == "single-file":
        layout = {"ldm": "LDM/BFL", "bfl-flux2": "BFL FLUX.2", "diffusers": "diffusers"}[meta["layout"]]
        stdout.print(f"wrote {out} ({layout} layout, {meta['precision']}, {meta['bytes'] / 1e6:.1f} MB; "
                     f"scaling {meta['scaling_factor']:g}, shift {meta['shift_factor']:g})", highlight=False)
        if meta["loader_limits"]:
            stdout.print(f"  written with --force; other tools cannot load it: {'; '.join(meta['loader_limits'])}",
                         highlight=False, soft_wrap=True)
        if meta.get("verify"):
            stdout.print(f"  read back: {meta['verify']['read_back']}", highlight=False)
        return
    if meta.get("format") == "diffusers":
        stdout.print(f"wrote diffusers folder {out}", highlight=False)
        for part, stats in meta.get("verify", {}).items():
            stdout.print(f"  {part} vs diffusers: max abs {stats['max_abs']:.3g}", highlight=False)
        return
    table = Table(
        title=f"zturbo export -> {out} ({meta['format']}, {meta['precision']}, opset {meta['opset']})"
    )
    for col in ("part", "file", "MB", "fp32 layers", "max abs err", "mean abs err", "PSNR dB"):
        table.add_column(col, justify="left" if col in ("part", "file") else "right")
    verify = meta.get("verify", {})
    for part, info in meta["parts"].items():
        stats = verify.get(part)
        kept = info.get("fp16", {}).get("kept_fp32_layers")
        table.add_row(
            part,
            info.get("plan") or info["onnx"],
            f"{info['bytes'] / 1e6:.1f}",
            "-" if kept is None else str(len(kept)),
            f"{stats['max_abs']:.2e}" if stats else "-",
            f"{stats['mean_abs']:.2e}" if stats else "-",
            f"{stats['psnr_db']:.1f}" if stats else "-",
        )
    stdout.print(table)
