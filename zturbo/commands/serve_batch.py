"""`zturbo serve-batch encode|decode|merge`: whole collections through the VAE, exactly once."""

from __future__ import annotations

import contextlib
import os
import time
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
    settings_from,
    tile_flags,
    with_flags,
)

ShardOpt = Annotated[
    str | None, typer.Option("--shard", help="I/N: take only part I of N (one per machine); merge after.")
]


def _batch_size(text: str | None):
    from zturbo.errors import UsageError

    if text is None or text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"--batch-size must be 'auto' or a positive integer, got '{text}'") from None
    if value < 1:
        raise UsageError(f"--batch-size must be at least 1, got {value}")
    return value



# The settings flags of `serve-batch encode` and `decode`: flag -> serve.* setting.
_COMMON = [
    Flag("--batch-size -b", "serve.batch_size", str, "'auto' (largest that fits) or a number.", parse=_batch_size),
    Flag("--backend", "serve.backend", str, "auto (default: what MODEL is), torch, compile, onnx or trt."),
    Flag("--precision", "serve.precision", str, "fp32, bf16 or fp16."),
    Flag("--device", "serve.device", str, "auto, cpu, cuda, cuda:N."),
    Flag("--reading", "serve.reading", str,
         "auto | threads | streams | phased: read in a thread pool beside compute (threads), in CPU compute streams "
         "that each read then compute their own batches (streams), or just before each batch is computed, on every "
         "core (phased). auto picks streams when the model computes on a multi-core CPU with every core, phased on "
         "one core, threads otherwise (a GPU)."),
    Flag("--streams", "serve.streams", int,
         "CPU compute streams for --reading streams (default: 2 up to 8 cores, then one per 4, at most 4)."),
    *tile_flags("serve"),
]
ENCODE_FLAGS = [
    Flag("--size", "serve.size", int, "Target side in pixels (default: the model's)."),
    Flag("--mean/--sample", "serve.latent_mode", bool, "Store the posterior mean, or a sample of it.",
         parse=lambda mean: "mean" if mean else "sample"),
    Flag("--resize", "serve.resize", str, "aspect (size buckets) or square (center-crop)."),
    Flag("--shard-size", "serve.shard_size", int, "Latents per shard file."),
    *_COMMON,
]
DECODE_FLAGS = [
    Flag("--format", "serve.image_format", str, "png, jpeg or webp."),
    Flag("--quality", "serve.quality", int, "jpeg / webp quality."),
    Flag("--restore-size/--decoded-size", "serve.restore_size", bool,
         "Write each image at the source resolution of the region it was encoded from (latents from an encode "
         "run), or at the decoded size (default)."),
    *_COMMON,
]

def _distributed():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    from zturbo.train.distributed import DistContext

    ctx = DistContext.from_env(os.environ)
    return ctx.rank, ctx.world_size, ctx.local_rank


@contextlib.contextmanager
def _process_group(world: int):
    """Under torchrun: a gloo group for the final barrier (ranks may finish far apart)."""
    if world <= 1:
        yield None
        return
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(hours=48))
    try:
        yield dist.barrier
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _progress(description: str, quiet: bool):
    from rich.progress import TextColumn

    from zturbo.console import progress

    bar = progress(quiet, TextColumn("{task.fields[rate]}"))
    with bar:

        def start(total: int, done: int):
            task = bar.add_task(description, total=total, completed=done, rate="")
            t0, count = time.perf_counter(), [0]

            def advance(n: int) -> None:
                count[0] += n
                elapsed = time.perf_counter() - t0
                bar.update(task, advance=n, rate=f"{count[0] / elapsed:.1f} img/s" if elapsed > 0 else "")

            return advance

        yield start


def _print_report(report, json_out: bool) -> None:
    from zturbo.console import print_json, stdout

    if json_out:
        print_json(report.to_dict())
        return
    from rich.markup import escape
    from rich.table import Table

    r = report
    table = Table(title=f"serve-batch {r.operation} -> {r.output}", title_justify="left", show_header=False)
    rows = [
        ("images done", f"{r.processed}"),
        ("failed", f"{r.failed}"),
        ("already done before", f"{r.already_done}"),
        ("batch size / reader threads", f"{r.batch_size} / {r.reader_threads}"),
        ("reading", r.reading or "-"),
        ("backend", ", ".join(f"{k}={v}" for k, v in r.backend.items())),
        ("wall time", f"{r.wall_seconds:.2f} s"),
        ("throughput", f"{r.images_per_second:.1f} images/s"),
        ("reading (CPU time, summed)", f"{r.read_seconds:.2f} s"),
        # Compute streams read in turn with computing: their times are per stream.
        ("reading, per stream" if r.reading == "streams" else "waiting for input", f"{r.wait_seconds:.2f} s"),
        ("computing, per stream" if r.reading == "streams" else "computing", f"{r.compute_seconds:.2f} s"),
        ("writing (background)", f"{r.write_seconds:.2f} s"),
    ]
    if r.index is not None:
        rows.append(("index", f"{r.index} ({r.index_count} latents)"))
    for key, value in rows:
        table.add_row(key, value)
    stdout.print(table)
    for f in r.failures[:20]:
        detail = f" ({f['detail']})" if f.get("detail") else ""
        verb = "failed" if f["reason"] in _OUTPUT_FAILURES else "skipped"
        stdout.print(f"  {verb} {escape(f['source'])}: {f['reason']}{escape(detail)}", highlight=False)
    if len(r.failures) > 20:
        where = "report.json / index.json" if r.operation == "encode" else "--json"
        stdout.print(f"  ... and {len(r.failures) - 20} more (see {where})", highlight=False)


# Failures where asked-for output is missing: the run exits 1. Unreadable inputs of encode are skipped,
# listed, and exit 0 (a collection with a few broken files still encodes).
_OUTPUT_FAILURES = {"non-finite", "unwritable", "outside-output"}


def _exit_status(report) -> None:
    """Exit 1, after the report, when an image's output could not be made (``_OUTPUT_FAILURES``)."""
    from rich.markup import escape

    from zturbo.console import stderr

    failed = [f for f in report.failures if f["reason"] in _OUTPUT_FAILURES]
    if failed:
        first = f"{failed[0]['reason']}: {failed[0]['source']}{', ...' if len(failed) > 1 else ''}"
        stderr.print(f"[bold red]error:[/] {len(failed)} image(s) failed ({escape(first)}); nothing was written "
                     "for them", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Encode image collections to latent shards, or decode latents to images, exactly once.",
        no_args_is_help=True,
    )

    @group.command("encode")
    @with_flags(ENCODE_FLAGS)
    def encode(
        overrides: dict,
        model: Annotated[str, typer.Argument(help="Model folder, run folder, checkpoint, single .safetensors file "
                                                  "or export.")],
        input: Annotated[Path, typer.Option("--input", "-i", help="Folder of images or a manifest listing them.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Folder for shards, index.json, report.json.")],
        shard: ShardOpt = None,
        latent_family: LatentFamilyOpt = None,
        profile: ProfileOpt = None,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Encode every image to a latent; writes safetensors shards plus index.json. Reruns do only what is missing."""
        from zturbo.serve import encode_collection

        cfg = settings_from(profile, config, overrides).serve
        part, dev = _placement(shard, cfg.device)
        model = model_arg(model, latent_family, "serve-batch", quiet or part.rank != 0)
        with _process_group(part.world_size) as barrier, _progress("encode", quiet or part.rank != 0) as progress:
            report = encode_collection(model, input, output, cfg, part, device=dev, barrier=barrier, progress=progress)
        if part.rank == 0:
            _print_report(report, json_out)
        _exit_status(report)

    @group.command("decode")
    @with_flags(DECODE_FLAGS)
    def decode(
        overrides: dict,
        model: Annotated[str, typer.Argument(help="Model folder, run folder, checkpoint, single .safetensors file "
                                                  "or export.")],
        input: Annotated[
            Path, typer.Option("--input", "-i", help="Encode output, shards, or .safetensors / .npy files.")
        ],
        output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the images.")],
        shard: ShardOpt = None,
        latent_family: LatentFamilyOpt = None,
        profile: ProfileOpt = None,
        config: ConfigOpt = None,
        json_out: JsonOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Decode latents to images (written atomically; reruns skip images that exist)."""
        from zturbo.serve import decode_collection

        cfg = settings_from(profile, config, overrides).serve
        part, dev = _placement(shard, cfg.device)
        model = model_arg(model, latent_family, "serve-batch", quiet or part.rank != 0)
        with _progress("decode", quiet or part.rank != 0) as progress:
            report = decode_collection(model, input, output, cfg, part, device=dev, progress=progress)
        if part.rank == 0:
            _print_report(report, json_out)
        _exit_status(report)

    @group.command("merge")
    def merge(
        outputs: Annotated[list[Path], typer.Argument(help="Encode output folders (e.g. one per --shard).")],
        index_dir: Annotated[
            Path | None, typer.Option("--index-dir", help="Where to write index.json (default: the first).")
        ] = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Merge the shards of encode outputs into one index.json (after all --shard parts finished)."""
        from zturbo.console import print_json, stdout
        from zturbo.serve import merge_outputs

        index = merge_outputs(outputs, index_dir)
        summary = {k: index[k] for k in ("count", "failed", "duplicates_dropped", "unreadable_shards")}
        summary["index"] = str((index_dir or outputs[0]) / "index.json")
        if json_out:
            print_json(summary)
        else:
            stdout.print(
                f"index {summary['index']}: {index['count']} latents, {index['failed']} failed inputs"
                + (f", {index['duplicates_dropped']} duplicates dropped" if index["duplicates_dropped"] else ""),
                highlight=False,
            )

    app.add_typer(group, name="serve-batch")


def _placement(shard: str | None, device: str):
    """This process's part of the work (``--shard`` and torchrun's rank) and its device."""
    from zturbo.serve import Partition, parse_shard

    index, count = parse_shard(shard)
    rank, world, local_rank = _distributed()
    return Partition(index, count, rank, world), _rank_device(device, local_rank, world)


def _rank_device(device: str, local_rank: int, world: int) -> str:
    """Under torchrun each rank takes its own GPU."""
    if world > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device
