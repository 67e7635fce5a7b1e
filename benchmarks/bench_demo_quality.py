"""What the demo profile's training reaches: PSNR and SSIM at 128 px, in-sample and held out.

    python benchmarks/bench_demo_quality.py                     # train `--profile demo`, then evaluate
    python benchmarks/bench_demo_quality.py --run runs/demo     # evaluate an existing demo run folder
    python benchmarks/bench_demo_quality.py --set train.max_steps=600 --set loss.kl_weight=0
    python benchmarks/bench_demo_quality.py --json out.json

Held-out photos. The demo trains on a plain folder, so the trainer's own split
(``split_data`` with ``data.val_images``) keeps that many evenly spaced photos
out of training; those are the photos of the sample grid. The benchmark asks
the trainer for that split and reports the photos it trained on and the
held-out ones separately, next to the mean over all fifteen that ``zturbo eval
RUN --data zturbo/data/demo --size 128`` prints. The held-out photos were never
seen in any crop or flip during training: the loader only draws from
``split.train``. (The larger originals in ``shared/data/samples`` are the same
fifteen photos, so they are no held-out set.)

The curve. While training, the EMA model (what the samples, eval and export
use) is scored every ``--curve-every`` steps on the same centre crops eval uses,
so it shows whether quality is still climbing when the step budget runs out.
Scoring time is kept out of the training wall time reported.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from _common import parse_set

from zturbo.config import EvalConfig, load_settings
from zturbo.data import demo_dir
from zturbo.data.datasets import split_data
from zturbo.data.images import DEFAULT_MAX_PIXELS
from zturbo.eval import evaluate
from zturbo.eval.data import load_pixels
from zturbo.eval.metrics import psnr_uint8
from zturbo.eval.report import report_json
from zturbo.model.vae import VAE
from zturbo.train import Trainer
from zturbo.train.checkpoint import step_folders
from zturbo.utils import atomic_write_text


def crops_uint8(paths: list[Path], size: int) -> torch.Tensor:
    """The centre crops eval scores (shorter side resized with Lanczos, then centre-cropped)."""
    return torch.stack([load_pixels(p, size, DEFAULT_MAX_PIXELS)[0] for p in paths])


@torch.no_grad()
def score(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR (dB) of the model's mode reconstructions, rounded to 8 bits as eval does, and the
    posterior's mean standard deviation: training decodes mean + std * noise, so a std that is not
    small against the latent means is noise the decoder must learn to see through."""
    model.eval()
    x = pixels.float() / 127.5 - 1.0
    posterior = model.encode(x)
    recon = model.decode(posterior.mode()).clamp(-1, 1)
    recon_u8 = ((recon + 1.0) * 127.5).round()
    return float(psnr_uint8(recon_u8, pixels.float()).mean()), float(posterior.std.mean())


def split_means(report: dict, names: set[str], metric: str) -> float | None:
    values = [row["model"][metric] for row in report["per_image"] if Path(row["name"]).name in names]
    return sum(values) / len(values) if values else None


def run_settings(run_dir: Path):
    """The settings a run trained with (its newest checkpoint's settings.json)."""
    steps = step_folders(run_dir / "checkpoints")
    if not steps:
        raise SystemExit(f"{run_dir} holds no checkpoints/step-N folder to read its settings from")
    return load_settings(None, steps[-1][1] / "settings.json", default_profile=None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, help="evaluate this existing demo run folder instead of training")
    parser.add_argument(
        "--output", type=Path, default=Path("runs/bench-demo-quality"), help="run folder to train into"
    )
    parser.add_argument(
        "--set", action="append", default=[], help="profile override, e.g. train.max_steps=600"
    )
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument(
        "--curve-every", type=int, default=50, help="score the EMA model every N steps (0: off)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    data = demo_dir()
    if args.run is not None:
        settings = run_settings(args.run)
    else:
        overrides = parse_set(args.set)
        overrides.setdefault("train", {})["output_dir"] = str(args.output)
        overrides.setdefault("data", {})["data_dir"] = str(data)
        settings = load_settings("demo", None, overrides)
    split = split_data(settings.data.data_dir or data, settings.data.val_images)
    trained_names = {p.name for p in split.train}
    held_names = {p.name for p in split.val} - trained_names
    print(f"trained on {len(split.train)} photos; held out {len(split.val)}: {', '.join(sorted(held_names))}")
    seen = crops_uint8(split.train, args.size)
    unseen = crops_uint8(sorted(p for p in split.val if p.name in held_names), args.size) if held_names else None

    curve: list[dict] = []

    def record(step: int, ema: torch.nn.Module, rec_loss: float | None) -> None:
        psnr, std = score(ema, seen)
        row = {"step": step, "trained_psnr": psnr, "latent_std": std, "rec_loss": rec_loss}
        if unseen is not None:
            row["held_out_psnr"] = score(ema, unseen)[0]
        curve.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    train_wall = None
    if args.run is None:
        scoring_s = 0.0

        def on_step(step: int, result) -> None:
            nonlocal scoring_s
            if not args.curve_every or (step % args.curve_every and step != trainer.total_steps):
                return
            t = time.perf_counter()
            record(step, trainer.engine.ema.model, result.terms.get("rec"))
            scoring_s += time.perf_counter() - t

        print(
            f"load: {os.getloadavg()[0]:.2f} (1-min average) on {os.cpu_count()} cores; "
            f"torch threads {torch.get_num_threads()}"
        )
        trainer = Trainer(settings, quiet=True, on_step=on_step)
        result = trainer.fit()
        train_wall = result.wall_s - scoring_s
        print(
            f"trained {result.steps} steps in {train_wall:.1f} s (scoring excluded; {scoring_s:.1f} s scoring), "
            f"load now {os.getloadavg()[0]:.2f}"
        )
        run_dir = Path(result.run_dir)
    else:
        run_dir = args.run
        for step, folder in step_folders(run_dir / "checkpoints"):
            record(step, VAE.from_pretrained(folder / "ema"), None)

    config = EvalConfig(size=args.size, metrics=["psnr", "ssim"], device="cpu", sheet_images=0)
    report = report_json(evaluate(run_dir, data, config))
    summary: dict[str, dict] = {"all": {}, "trained": {}, "held_out": {}}
    for metric in ("psnr", "ssim"):
        summary["all"][metric] = report["summary"]["model"][metric]["mean"]
        summary["trained"][metric] = split_means(report, trained_names, metric)
        summary["held_out"][metric] = split_means(report, held_names, metric)
    print(f"\n{'photos':<10}{'n':>3}{'PSNR dB':>10}{'SSIM':>8}   (zturbo eval, {args.size} px, EMA model)")
    counts = {"all": len(report["per_image"]), "trained": len(trained_names), "held_out": len(held_names)}
    for key, row in summary.items():
        if row["psnr"] is not None:
            print(f"{key:<10}{counts[key]:>3}{row['psnr']:>10.2f}{row['ssim']:>8.4f}")
    if args.json:
        out = {
            "run": str(run_dir),
            "settings": settings.model_dump(mode="json"),
            "train_wall_s": train_wall,
            "summary": summary,
            "curve": curve,
            "per_image": report["per_image"],
        }
        atomic_write_text(args.json, json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
