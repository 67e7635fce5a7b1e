"""`zturbo train`: train a VAE on a folder of images (single process, or DDP under torchrun)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from zturbo.commands._common import ConfigOpt, JsonOpt, ProfileOpt, QuietOpt, parse_int_list, settings_from

# The seed's profile menu: (name, resolution, batch, what it needs). Memory is the
# peak of one training step at micro-batch 1 measured on an H100 (bf16, LPIPS-VGG
# on); larger batches accumulate gradients, so the peak does not grow with the batch
# (see zturbo.train.memory for which figures predate the current checkpointing).
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


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        profile: ProfileOpt = None,
        config: ConfigOpt = None,
        data: Annotated[
            Path | None,
            typer.Option(
                "--data", "--data_path", "--data-path", help="Image folder or `zturbo prepare` output."
            ),
        ] = None,
        output: Annotated[
            Path | None, typer.Option("--output", "--output_dir", "--output-dir", "-o", help="Run folder.")
        ] = None,
        resume: Annotated[
            str | None,
            typer.Option(
                "--resume", help="'auto' (newest checkpoint in the run folder) or a checkpoint path."
            ),
        ] = None,
        image_size: Annotated[
            int | None, typer.Option("--image-size", "--image_size", help="Training crop size.")
        ] = None,
        batch_size: Annotated[
            int | None,
            typer.Option(
                "--batch-size", "--batch_size", help="Effective batch (all processes, all micro-batches)."
            ),
        ] = None,
        micro_batch_size: Annotated[
            int | None,
            typer.Option("--micro-batch-size", "--micro_batch_size", help="Default: the largest that fits."),
        ] = None,
        z_channels: Annotated[
            int | None,
            typer.Option("--z-channels", "--z_channels", "--latent-channels", help="Latent channels."),
        ] = None,
        block_out_channels: Annotated[
            str | None,
            typer.Option("--block-out-channels", "--block_out_channels", help="e.g. 96,192,384,384"),
        ] = None,
        learning_rate: Annotated[
            float | None, typer.Option("--learning-rate", "--learning_rate", "--lr")
        ] = None,
        perceptual_weight: Annotated[
            float | None, typer.Option("--perceptual-weight", "--perceptual_weight")
        ] = None,
        reconstruction_weight: Annotated[
            float | None, typer.Option("--reconstruction-weight", "--reconstruction_weight")
        ] = None,
        kl_weight: Annotated[float | None, typer.Option("--kl-weight", "--kl_weight")] = None,
        disc_weight: Annotated[
            float | None, typer.Option("--disc-weight", "--disc_weight", help="0 disables the GAN.")
        ] = None,
        disc_start: Annotated[int | None, typer.Option("--disc-start", "--disc_start")] = None,
        mixed_precision: Annotated[
            bool | None,
            typer.Option(
                "--mixed-precision/--no-mixed-precision",
                "--mixed_precision/--no_mixed_precision",
                help="Best autocast the device supports (bf16, else fp16; fp32 on CPU).",
            ),
        ] = None,
        precision: Annotated[
            str | None, typer.Option("--precision", help="bf16 | fp16 | fp32 (overrides --mixed-precision).")
        ] = None,
        num_workers: Annotated[int | None, typer.Option("--num-workers", "--num_workers")] = None,
        warmup_epochs: Annotated[float | None, typer.Option("--warmup-epochs", "--warmup_epochs")] = None,
        warmup_steps: Annotated[int | None, typer.Option("--warmup-steps", "--warmup_steps")] = None,
        epochs: Annotated[int | None, typer.Option("--epochs")] = None,
        max_steps: Annotated[int | None, typer.Option("--max-steps", "--max_steps")] = None,
        compile: Annotated[
            bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")
        ] = None,
        gradient_checkpointing: Annotated[
            bool | None,
            typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", "--gradient_checkpointing"),
        ] = None,
        device: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N")] = None,
        seed: Annotated[int | None, typer.Option("--seed")] = None,
        checkpoint_every: Annotated[int | None, typer.Option("--checkpoint-every", "--save_steps")] = None,
        keep_last: Annotated[int | None, typer.Option("--keep-last")] = None,
        sample_every: Annotated[int | None, typer.Option("--sample-every")] = None,
        log_every: Annotated[int | None, typer.Option("--log-every")] = None,
        teacher: Annotated[
            Path | None,
            typer.Option("--teacher", help="Distil into this VAE's latent space (model, diffusers or pipeline folder)."),
        ] = None,
        distill: Annotated[
            str | None, typer.Option("--distill", help="decoder (default) | encoder | both: what the student trains.")
        ] = None,
        decoder_channels: Annotated[
            str | None, typer.Option("--decoder-channels", help="Student decoder widths, e.g. 96,192,384,384.")
        ] = None,
        encoder_channels: Annotated[
            str | None, typer.Option("--encoder-channels", help="Student encoder widths (encoder / both).")
        ] = None,
        init: Annotated[
            str | None, typer.Option("--init", help="prune (default: from the teacher's channels) | random.")
        ] = None,
        teacher_weight: Annotated[
            float | None, typer.Option("--teacher-weight", help="L1 weight to the teacher's reconstruction.")
        ] = None,
        latents: Annotated[
            Path | None,
            typer.Option("--latents", help="`serve-batch encode` output of --data by the teacher (decoder mode)."),
        ] = None,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Resolve and print the plan; do not train.")
        ] = False,
        json_out: JsonOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Train a VAE: `zturbo train --profile fast --data DIR --output RUN_DIR` (try `--profile demo`)."""
        from zturbo.console import print_json

        if profile is None and config is None:
            profile = choose_profile() if _interactive() else None  # None: the default profile (fast)
        overrides = {
            "model": {
                "latent_channels": z_channels,
                "block_out_channels": parse_int_list(block_out_channels, "--block-out-channels"),
            },
            "data": {"data_dir": data, "image_size": image_size, "num_workers": num_workers},
            "train": {
                "output_dir": output,
                "batch_size": batch_size,
                "micro_batch_size": micro_batch_size,
                "learning_rate": learning_rate,
                "mixed_precision": mixed_precision,
                "precision": precision,
                "warmup_epochs": warmup_epochs,
                "warmup_steps": warmup_steps,
                "epochs": epochs,
                "max_steps": max_steps,
                "compile": compile,
                "gradient_checkpointing": gradient_checkpointing,
                "device": device,
                "seed": seed,
                "checkpoint_every": checkpoint_every,
                "keep_last": keep_last,
                "sample_every": sample_every,
                "log_every": log_every,
            },
            "distill": {
                "teacher": teacher,
                "mode": distill,
                "decoder_channels": parse_int_list(decoder_channels, "--decoder-channels"),
                "encoder_channels": parse_int_list(encoder_channels, "--encoder-channels"),
                "init": init,
                "teacher_weight": teacher_weight,
                "latents_dir": latents,
                "latent_channels": z_channels if teacher is not None else None,
            },
            "loss": {
                "perceptual_weight": perceptual_weight,
                "reconstruction_weight": reconstruction_weight,
                "kl_weight": kl_weight,
                "disc_weight": disc_weight,
                "disc_start": disc_start,
            },
        }
        if image_size is not None:  # the model's nominal size follows the training size unless set elsewhere
            overrides["model"]["sample_size"] = image_size
        settings = settings_from(profile, config, overrides)
        if epochs is not None and max_steps is None:
            settings.train.max_steps = None  # an explicit --epochs beats a step count from the profile
        if settings.data.data_dir is None and settings.profile == "demo":
            from zturbo.data import demo_dir

            settings.data.data_dir = demo_dir()

        from zturbo.train.distributed import DistContext

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

        result = run_training(settings, resume=resume, dist_ctx=dist_ctx, quiet=quiet)
        if not dist_ctx.is_main:
            return
        if json_out:
            print_json(result.to_dict())
        elif not quiet:
            _summary(result)


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
