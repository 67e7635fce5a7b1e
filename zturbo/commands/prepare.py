"""`zturbo prepare INPUT OUTPUT`: any image folder -> size x size train/val folders, resumable."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from zturbo.commands._common import ConfigOpt, Flag, JsonOpt, ProfileOpt, QuietOpt, settings_from, with_flags
from zturbo.errors import UsageError

_HIDDEN = {"hidden": True}


# Every setting flag of `zturbo prepare`, with the seed script's spellings.
FLAGS = [
    Flag("--size --target-size --target_size", "prepare.size", int,
         "Output side in pixels (default: data.image_size of the profile)."),
    Flag("--val-fraction", "prepare.val_fraction", float,
         "Share of images for val/, chosen by content hash (default: 0.02)."),
    Flag("--format", "prepare.format", str, "png, jpeg or webp (default: png)."),
    Flag("--quality", "prepare.quality", int, "JPEG / WebP quality (default: 95)."),
    Flag("--resize", "prepare.resize", str, "center-crop or pad (black bars) (default: center-crop)."),
    Flag("--min-size", "prepare.min_size", int,
         "Skip (never upscale) images whose scaled side is smaller (default: size/2)."),
    Flag("--workers -j", "prepare.workers", int, "Worker processes (default: all cores)."),
    Flag("--dedupe/--no-dedupe", "prepare.dedupe", bool, "Drop exact duplicates (same bytes) (default: keep)."),
    Flag("--max-pixels", "prepare.max_pixels", int, "Skip images with more pixels (decompression bombs)."),
    Flag("--image-column", "prepare.image_column", str, "Parquet input: the column holding the image bytes."),
]


def register(app: typer.Typer) -> None:
    @app.command("prepare", no_args_is_help=True)
    @with_flags(FLAGS)
    def prepare(
        overrides: dict,
        input_dir: Annotated[
            Path | None, typer.Argument(metavar="INPUT", help="Folder of images (recursed), or shards: .tar "
                                        "(WebDataset) or .parquet files, a folder of them, a glob or a brace pattern.")
        ] = None,
        output_dir: Annotated[
            Path | None,
            typer.Argument(metavar="OUTPUT", help="Folder for train/, val/, manifest and report."),
        ] = None,
        demo: Annotated[
            bool,
            typer.Option("--demo", help="Prepare the bundled sample photos: zturbo prepare --demo OUTPUT."),
        ] = False,
        input_opt: Annotated[Path | None, typer.Option("--input-dir", "--input_dir", **_HIDDEN)] = None,
        output_opt: Annotated[Path | None, typer.Option("--output-dir", "--output_dir", **_HIDDEN)] = None,
        mode: Annotated[str | None, typer.Option("--mode", **_HIDDEN)] = None,
        profile: ProfileOpt = None,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Resize, crop and split a folder of images for training: fast, parallel, safe to kill and re-run.

        Reads any Pillow format (JPEG, PNG, WebP, BMP, TIFF, GIF...), applies EXIF orientation,
        converts every mode and ICC profile to 8-bit sRGB, and writes OUTPUT/train, OUTPUT/val,
        manifest.jsonl and prepare-report.json. Bad files are skipped and reported. Re-runs only
        redo what changed; OUTPUT mirrors INPUT (outputs of removed sources are removed).
        Hidden files and folders are ignored. Seed spellings --input_dir, --output_dir and
        --target_size are accepted.
        """
        from zturbo.data import prepare as lib

        if mode not in (None, "preprocess"):
            raise UsageError(
                f"--mode {mode} is not supported", "zturbo prepare only preprocesses: drop --mode"
            )
        source, target = _paths(input_dir, output_dir, input_opt, output_opt, demo)
        settings = settings_from(profile if profile is not None or not demo else "demo", config, overrides)
        cfg = settings.prepare

        bar = _ProgressBar(quiet or json_out)
        try:
            if demo:
                report = lib.prepare_demo(target, cfg, on_progress=bar.update)
            else:
                report = lib.prepare_dataset(source, target, cfg, on_progress=bar.update)
        finally:
            bar.close()

        if json_out:
            from zturbo.console import print_json

            print_json(report.to_dict())
        else:
            _print_summary(report)
        _warn_skipped(report, quiet)
        if report.damaged:
            from rich.markup import escape

            from zturbo.console import stderr

            more = f" (and {len(report.damaged) - 1} more)" if len(report.damaged) > 1 else ""
            stderr.print(f"[bold red]error:[/] damaged input shard {escape(report.damaged[0])}{more}; everything "
                         "readable was prepared", highlight=False, soft_wrap=True)
            raise typer.Exit(2)


def _paths(
    input_dir: Path | None,
    output_dir: Path | None,
    input_opt: Path | None,
    output_opt: Path | None,
    demo: bool,
) -> tuple[Path | None, Path]:
    positional = [p for p in (input_dir, output_dir) if p is not None]
    if demo:
        if input_opt is not None or len(positional) > 1:
            raise UsageError(
                "--demo prepares the bundled photos and takes only OUTPUT", "zturbo prepare --demo OUTPUT"
            )
        target = output_opt or (positional[0] if positional else None)
        if target is None:
            raise UsageError("--demo needs an OUTPUT folder", "zturbo prepare --demo OUTPUT")
        return None, target
    source = input_opt or (positional.pop(0) if positional else None)
    target = output_opt or (positional.pop(0) if positional else None)
    if positional:
        raise UsageError("too many folders given", "zturbo prepare INPUT OUTPUT")
    if source is None or target is None:
        raise UsageError("prepare needs INPUT and OUTPUT folders", "zturbo prepare INPUT OUTPUT --size 1024")
    return source, target


class _ProgressBar:
    """Progress on stderr: a rich bar (images/s, skipped so far) on a terminal, a log line every
    30 s otherwise (batch jobs). Started at the first update, after the worker processes are
    forked, so the bar's refresh thread never exists at fork time."""

    LOG_EVERY_S = 30.0

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = None
        self.task = None
        self.started: tuple[float, int] | None = None  # (time, images done) at the first update
        self.last_log = 0.0

    def update(self, p) -> None:
        if self.quiet:
            return
        from zturbo.console import stderr

        now = time.monotonic()
        if self.started is None:
            self.started = (now, p.done)
            self.last_log = now
        if not stderr.is_terminal:
            if now - self.last_log >= self.LOG_EVERY_S:
                rate = (p.done - self.started[1]) / max(now - self.started[0], 1e-9)
                stderr.print(f"prepare: {p.done}/{p.total} images, {rate:.1f} img/s, {p.skipped} skipped")
                self.last_log = now
            return
        if self.progress is None:
            from rich.progress import TextColumn

            from zturbo.console import progress

            self.progress = progress(
                False,
                TextColumn("{task.fields[rate]} img/s"),
                TextColumn("[yellow]{task.fields[skipped]} skipped"),
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "prepare", total=p.total, completed=p.done, rate="-", skipped=p.skipped
            )
        speed = self.progress.tasks[0].speed
        self.progress.update(
            self.task, completed=p.done, skipped=p.skipped, rate=f"{speed:.1f}" if speed else "-"
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _print_summary(report) -> None:
    from rich.table import Table

    from zturbo.console import stdout

    table = Table(
        title=f"prepared {report.input} -> {report.output}", title_justify="left", show_header=False
    )
    table.add_column(justify="left")
    table.add_column(justify="right")
    rows = [
        ("images seen", report.seen),
        ("written this run", report.written),
        ("already up to date", report.up_to_date),
        ("outputs (train / val)", f"{report.outputs} ({report.train} / {report.val})"),
        ("size / format / resize", f"{report.size} / {report.format} / {report.resize}"),
    ]
    rows += [(f"skipped: {reason}", n) for reason, n in report.skipped.items()]
    rows += [
        ("duplicates" + (" (dropped)" if report.dedupe else " (kept)"), report.duplicates),
        ("stale outputs removed", report.removed),
        (
            "time / throughput",
            f"{report.elapsed_s:.1f} s / {report.images_per_s:.1f} img/s ({report.workers} workers)",
        ),
    ]
    for label, value in rows:
        table.add_row(label, str(value))
    stdout.print(table)


def _warn_skipped(report, quiet: bool) -> None:
    from zturbo.console import warn

    if report.skipped_total and not quiet:
        reasons = ", ".join(f"{n} {r}" for r, n in report.skipped.items())
        examples = "; ".join(f"{s['source']} ({s['reason']})" for s in report.skipped_files[:3])
        more = ", ..." if len(report.skipped_files) > 3 else ""
        warn(
            f"skipped {report.skipped_total} of {report.seen} files: {reasons} (e.g. {examples}{more}); "
            f"every one is listed in {Path(report.output) / 'prepare-report.json'}"
        )
