"""`zturbo train`: train a VAE on a folder of images (single process, or DDP under torchrun)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from zturbo.commands._common import (
    LATENT_FAMILY_HELP,
    ConfigOpt,
    Flag,
    JsonOpt,
    ProfileOpt,
    QuietOpt,
    parse_int_list,
    say_line,
    settings_from,
    with_flags,
)

# The seed's profile menu: (profile name, one-line description). Resolution, batch and
# expected GPU memory come from the profile and zturbo.train.memory when it is shown.
MENU = [
    ("ultrafast", "fastest to train and run; slim channels"),
    ("fast", "the default turbo VAE"),
    ("highres", "1536 px, gradient checkpointing"),
    ("ultra", "2048 px, gradient checkpointing"),
]


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def choose_profile() -> str:
    """Show the profile menu on stderr and read a choice (number or name) from stdin."""
    from rich.table import Table

    from zturbo.config import load_settings
    from zturbo.console import stderr
    from zturbo.train.memory import expected_memory_gib

    table = Table(title="Choose a training profile", title_justify="left")
    for col in ("#", "profile", "resolution", "batch", "expected GPU memory", ""):
        table.add_column(col, no_wrap=col != "")
    for i, (name, blurb) in enumerate(MENU, 1):
        s = load_settings(name)
        table.add_row(
            str(i), name, f"{s.data.image_size}px", str(s.train.batch_size), expected_memory_gib(name), blurb
        )
    stderr.print(table)
    names = [name for name, _ in MENU]
    for _ in range(3):
        stderr.print("profile [1-4 or name, Enter for fast]: ", end="")
        answer = sys.stdin.readline()
        if not answer:  # end of input
            break
        answer = answer.strip().lower()
        if not answer:
            return "fast"
        if answer.isdigit() and 1 <= int(answer) <= len(names):
            return names[int(answer) - 1]
        if answer in names:
            return answer
        stderr.print(f"[red]'{answer}' is not one of 1-{len(names)} or {', '.join(names)}[/]")
    from zturbo.errors import UsageError

    raise UsageError("no profile chosen", "pass --profile NAME")


def _int_list(text: str) -> list[int]:
    return parse_int_list(text, "--block-out-channels")


# Every setting flag of `zturbo train`, with the seed script's underscore spellings.
FLAGS = [
    Flag("--data", "data.data_dir", Path, "Image folder or `zturbo prepare` output."),
    Flag("--output --output_dir --output-dir -o", "train.output_dir", Path, "Run folder."),
    # The model's nominal size follows the training size unless set elsewhere.
    Flag("--image-size --image_size", "data.image_size model.sample_size", int, "Training crop size."),
    Flag("--batch-size --batch_size", "train.batch_size", int, "Effective batch (all processes, all micro-batches)."),
    Flag("--micro-batch-size --micro_batch_size", "train.micro_batch_size", int, "Default: the largest that fits."),
    # distill.latent_channels: what a distillation's student was asked for (checked against the teacher's).
    Flag("--z-channels --z_channels --latent-channels", "model.latent_channels distill.latent_channels", int,
         "Latent channels."),
    Flag("--block-out-channels --block_out_channels", "model.block_out_channels", str, "e.g. 96,192,384,384",
         parse=_int_list),
    Flag("--learning-rate --learning_rate --lr", "train.learning_rate", float),
    Flag("--perceptual-weight --perceptual_weight", "loss.perceptual_weight", float),
    Flag("--reconstruction-weight --reconstruction_weight", "loss.reconstruction_weight", float),
    Flag("--kl-weight --kl_weight", "loss.kl_weight", float),
    Flag("--disc-weight --disc_weight", "loss.disc_weight", float, "0 disables the GAN."),
    Flag("--disc-start --disc_start", "loss.disc_start", int),
    Flag("--mixed-precision/--no-mixed-precision --mixed_precision/--no_mixed_precision", "train.mixed_precision",
         bool, "Best autocast the device supports (bf16, else fp16; fp32 on CPU)."),
    Flag("--precision", "train.precision", str, "bf16 | fp16 | fp32 (overrides --mixed-precision)."),
    Flag("--num-workers --num_workers", "data.num_workers", int),
    Flag("--warmup-epochs --warmup_epochs", "train.warmup_epochs", float),
    Flag("--warmup-steps --warmup_steps", "train.warmup_steps", int),
    Flag("--epochs", "train.epochs", int, "Epochs; beats a step count from the profile unless --max-steps is given."),
    Flag("--max-steps --max_steps", "train.max_steps", int),
    Flag("--compile", "train.compile", str,
         "auto (default: compiled on CUDA, eager elsewhere) | on | off: torch.compile the training step."),
    Flag("--gradient-checkpointing/--no-gradient-checkpointing --gradient_checkpointing", "train.gradient_checkpointing",
         bool),
    Flag("--device", "train.device", str, "auto | cpu | cuda | cuda:N"),
    Flag("--seed", "train.seed", int),
    Flag("--checkpoint-every", "train.checkpoint_every", int),
    Flag("--keep-last", "train.keep_last", int),
    Flag("--sample-every", "train.sample_every", int),
    Flag("--log-every", "train.log_every", int),
    # Distillation into an existing VAE's latent space (zturbo.distill).
    Flag("--teacher", "distill.teacher", Path,
         "Distil into this VAE's latent space (a single .safetensors file such as ae.safetensors, a model, "
         "diffusers or pipeline folder, a run)."),
    Flag("--latent-family", "distill.latent_family", str, LATENT_FAMILY_HELP),
    Flag("--distill", "distill.mode", str, "decoder (default) | encoder | both: what the student trains."),
    Flag("--decoder-channels", "distill.decoder_channels", str, "Student decoder widths, e.g. 96,192,384,384.",
         parse=lambda text: parse_int_list(text, "--decoder-channels")),
    Flag("--encoder-channels", "distill.encoder_channels", str, "Student encoder widths (encoder / both).",
         parse=lambda text: parse_int_list(text, "--encoder-channels")),
    Flag("--init", "distill.init", str, "prune (default: from the teacher's channels) | random."),
    Flag("--calibration-images", "distill.calibration_images", int,
         "--init prune: training images whose activations refit the pruned layers (0: weights only)."),
    Flag("--teacher-weight", "distill.teacher_weight", float, "L1 weight to the teacher's reconstruction."),
    Flag("--latents", "distill.latents_dir", Path,
         "`serve-batch encode` output of --data by the teacher (decoder mode)."),
]


def register(app: typer.Typer) -> None:
    @app.command("train")
    @with_flags(FLAGS)
    def train(
        overrides: dict,
        profile: ProfileOpt = None,
        config: ConfigOpt = None,
        resume: Annotated[
            str | None,
            typer.Option(
                "--resume", help="'auto' (newest checkpoint in the run folder), a run folder or a step-N checkpoint."
            ),
        ] = None,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Resolve and print the plan; do not train.")
        ] = False,
        json_out: JsonOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Train a VAE: `zturbo train --profile fast --data DIR --output RUN_DIR` (try `--profile demo`)."""
        from zturbo.artifacts import RESUME_KINDS, TORCH_KINDS, require
        from zturbo.console import print_json
        from zturbo.train.distributed import DistContext

        if profile is None and config is None:
            profile = choose_profile() if _interactive() else None  # None: the default profile (fast)
        if resume not in (None, "auto"):
            require(resume, RESUME_KINDS, "train --resume")
        settings = settings_from(profile, config, overrides)
        if settings.distill.teacher is not None:  # the library takes the teacher's weights: a model folder or a file
            teacher = require(settings.distill.teacher, TORCH_KINDS, "train --teacher", settings.distill.latent_family)
            settings.distill.teacher = teacher.source
            if teacher.single_file is not None:
                say_line(teacher.single_file.note, quiet)
            from zturbo.distill import student_settings

            settings = student_settings(settings)  # the teacher's config, the student's widths
        dist_ctx = DistContext.from_env(os.environ)
        if dry_run:
            plan = {
                "profile": settings.profile,
                "data_dir": str(settings.data.data_dir) if settings.data.data_dir else None,
                "output_dir": str(settings.train.output_dir),
                "image_size": settings.data.image_size,
                "batch_size": settings.train.batch_size,
                "world_size": dist_ctx.world_size,
                "settings": settings.model_dump(mode="json"),
            }
            if json_out:
                print_json(plan)
            else:
                from zturbo.console import stdout

                stdout.print(
                    f"profile {plan['profile']}: {plan['image_size']}px, batch {plan['batch_size']}, "
                    f"data {plan['data_dir']}, output {plan['output_dir']}",
                    highlight=False,
                )
            return

        from zturbo.train import train as run_training

        _check_before_loading(settings, dist_ctx.world_size, profile is None and config is None)
        result = run_training(settings, resume=resume, dist_ctx=dist_ctx, quiet=quiet)
        if not dist_ctx.is_main:
            return
        if json_out:
            print_json(result.to_dict())
        elif not quiet:
            _summary(result)


def _check_before_loading(settings, world_size: int, default_profile: bool) -> None:
    """What can be checked in a moment, before any model (a teacher takes a while) is loaded:
    the run folder can be one, and the data holds at least one batch."""
    from zturbo.data.datasets import check_batch_fits
    from zturbo.paths import check_output_folder

    check_output_folder(settings.train.output_dir)
    if settings.data.data_dir is None:
        return  # the trainer says so
    hint = "add images or lower --batch-size"
    if default_profile:
        hint += (f" (no --profile was given: the default profile '{settings.profile}' trains with batch "
                 f"{settings.train.batch_size}; `zturbo config profiles` lists the others)")
    check_batch_fits(settings.data.data_dir, settings.data.val_images, settings.train.batch_size, world_size, hint)


def _summary(result) -> None:
    from rich.table import Table

    from zturbo.console import stderr

    table = Table(title="training summary", title_justify="left", show_header=False, box=None)
    first = f"{result.first_loss:.4f}" if result.first_loss is not None else "-"
    last = f"{result.last_loss:.4f}" if result.last_loss is not None else "-"
    rows = [
        ("steps", f"{result.start_step} -> {result.steps}" if result.start_step else str(result.steps)),
        ("loss", f"{first} -> {last}"),
        ("terms", "  ".join(f"{k} {v:.4g}" for k, v in result.last_terms.items())),
        ("wall time", f"{result.wall_s:.1f} s ({result.images_per_s:.1f} images/s)"),
        (
            "device",
            f"{result.device} [{result.precision}] x{result.world_size}, micro-batch {result.micro_batch}",
        ),
        ("skipped steps", str(result.skipped_steps)),
        ("final model", str(result.final_dir)),
    ]
    if result.peak_memory_gib is not None:
        rows.append(("peak memory", f"{result.peak_memory_gib:.2f} GiB"))
    for key, value in rows:
        table.add_row(key, value)
    stderr.print(table)
