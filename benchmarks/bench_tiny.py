"""Tiny students: quality per step with the demo model as teacher (CPU), against the teacher's held-out PSNR.

    zturbo train --profile demo --output runs/demo                    # the teacher
    python benchmarks/bench_tiny.py --teacher runs/demo/final --steps 300 --eval-every 25 --out tiny.json

A tiny decoder (madebyollin's TAESD architecture, 64 channels, ``zturbo train --architecture tiny``)
learns the demo teacher's latent space on the 11 bundled training photos, as ``zturbo train``
builds it (``student_settings`` / ``load_student``; the demo profile's L2 loss, batch 4 and EMA
decay). Every ``--eval-every`` steps its EMA weights (what a run's ``final/`` holds) decode the
teacher's latents of the 4 held-out photos; the curve is their PSNR / SSIM, next to the teacher's
own reconstruction of them. The target: the tiny decoder
within 1.5 dB of the teacher in at most 300 steps. With ``--mode both`` the tiny encoder trains
too and the curve adds the tiny model's own round trip.

The tiny model decodes the teacher's latent as a diffusion model would see it, ``(z - shift) * scale``,
and its input clamp (``tanh(z / 3) * 3``) assumes latents of about unit variance. A teacher whose
config says scale 1, shift 0 (the demo model's) gets its factors measured first on the training
photos (``zturbo eval --latent-stats``), in a copy under ``--work``; the teacher itself is not touched.

``--layout-only RES`` times instead the TAEF1-shape decoder at RES px as the model computes it
(channels-last) against the same layers on NCHW maps, interleaved (why ``zturbo/model/tiny.py``
converts to channels-last).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from zturbo.bench.timing import time_interleaved
from zturbo.config import load_settings
from zturbo.data import demo_dir
from zturbo.data.datasets import ImageFolderDataset, augment_seed, load_batch, split_data
from zturbo.distill import load_student, load_teacher, student_settings
from zturbo.eval.latent_stats import latent_statistics, write_latent_stats
from zturbo.eval.metrics import psnr_uint8, ssim_uint8
from zturbo.model import TinyConfig, TinyVAE
from zturbo.train.engine import TrainEngine


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round()


def scores(recon: torch.Tensor, val: torch.Tensor) -> dict[str, float]:
    out, ref = to_uint8(recon), to_uint8(val)
    return {"psnr": round(float(psnr_uint8(out, ref).mean()), 3), "ssim": round(float(ssim_uint8(out, ref).mean()), 4)}


def normalised_teacher(teacher: Path, work: Path, size: int) -> tuple[Path, dict]:
    """The teacher, or (when its factors are 1 and 0) a copy with its latent factors measured on the training photos."""
    model = load_teacher(teacher)
    if (model.config.scaling_factor, model.config.shift_factor) != (1.0, 0.0):
        return teacher, {"measured": False}
    copy = work / "teacher"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(teacher, copy)
    train = work / "train-photos"  # the training photos alone: the held-out ones stay unseen
    shutil.rmtree(train, ignore_errors=True)
    train.mkdir(parents=True)
    for path in split_data(demo_dir(), 4).train:
        shutil.copy(path, train / path.name)
    stats = latent_statistics(copy, train, size=size, batch_size=4)
    write_latent_stats(stats)
    return copy, {"measured": True, "scaling_factor": stats.scaling_factor, "shift_factor": stats.shift_factor}


@torch.inference_mode()
def layout_speed(resolution: int, repeats: int) -> dict:
    """Median decode ms of a 16-channel TAESD decoder in channels-last (its own forward) and in NCHW."""
    torch.manual_seed(0)
    decoder = TinyVAE(TinyConfig(latent_channels=16)).eval().decoder
    z = torch.randn(1, 16, resolution // 8, resolution // 8)

    def nchw() -> torch.Tensor:
        x = z
        for module in decoder.chain():
            x = module(x)
        return x

    cl, plain = time_interleaved([lambda: decoder(z), nchw], torch.device("cpu"), warmup=1, repeats=repeats)
    return {"resolution": resolution, "channels_last_ms": round(cl.median_ms, 1), "nchw_ms": round(plain.median_ms, 1),
            "speedup": round(plain.median_ms / cl.median_ms, 3), "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, help="the trained demo model, e.g. runs/demo/final")
    p.add_argument("--work", type=Path, default=Path("runs/bench-tiny"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--mode", choices=["decoder", "both"], default="decoder")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=128, help="training crop")
    p.add_argument("--val-size", type=int, default=128)
    p.add_argument("--teacher-weight", type=float, default=0.0,
                   help="weight of the L1 term to the teacher's reconstruction (distill.teacher_weight)")
    p.add_argument("--grad-clip", type=float, default=None, help="train.grad_clip (default: the demo profile's)")
    p.add_argument("--margin-db", type=float, default=1.5, help="the target: teacher PSNR minus this")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ema", type=float, default=0.99,
                   help="EMA decay (the demo profile's); the curve scores the EMA weights, what a run's final/ holds")
    p.add_argument("--layout-only", type=int, metavar="RES", help="time channels-last against NCHW decode instead")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.layout_only:
        result = layout_speed(args.layout_only, args.repeats)
        print(result, flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return
    if args.teacher is None:
        p.error("--teacher is required (the trained demo model, e.g. runs/demo/final)")
    device = torch.device(args.device)
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    teacher_dir, factors = normalised_teacher(args.teacher, args.work, args.size)
    split = split_data(demo_dir(), 4)
    val = load_batch(split.val, args.val_size).to(device)

    settings = load_settings("demo", None, {
        "model": {"architecture": "tiny"},
        "data": {"data_dir": demo_dir(), "image_size": args.size, "num_workers": 0},
        "train": {"output_dir": args.work / "run", "batch_size": args.batch, "max_steps": args.steps,
                  "warmup_steps": 10, "learning_rate": args.lr, "ema_decay": args.ema, "seed": args.seed,
                  **({} if args.grad_clip is None else {"grad_clip": args.grad_clip})},
        "distill": {"teacher": teacher_dir, "mode": args.mode, "teacher_weight": args.teacher_weight},
    })
    student = load_student(student_settings(settings), device, split.train)
    tiny, teacher = student.model, load_teacher(teacher_dir, device)
    engine = TrainEngine(student.settings, device, model=tiny, forward_module=student.forward,
                         total_steps=args.steps, warmup_steps=10)
    with torch.no_grad():
        z = tiny.from_teacher_latents(teacher.encode(val).mean)
        report = {"teacher": {"path": str(args.teacher), "factors": factors, **scores(teacher(val), val)},
                  "tiny": {"config": tiny.config.model_dump(mode="json"), "parameters": tiny.num_parameters},
                  "settings": {k: getattr(args, k) for k in ("steps", "mode", "lr", "batch", "size", "val_size", "seed", "ema", "teacher_weight", "grad_clip")}}
    target = report["teacher"]["psnr"] - args.margin_db
    print(f"teacher {report['teacher']}; target {target:.2f} dB", flush=True)

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        shipped = engine.ema.model  # eval mode, never trained directly
        row = {"step": step, "decoder": scores(shipped.decode(z), val), "s": round(time.perf_counter() - t_train, 1)}
        if args.mode == "both":
            row["round_trip"] = scores(shipped(val), val)
        print(row, flush=True)
        return row

    data = ImageFolderDataset(split.train, args.size)
    gen = torch.Generator().manual_seed(args.seed)
    t_train = time.perf_counter()
    curve = [evaluate(0)]
    for step in range(args.steps):
        idx = torch.randint(0, len(data), (args.batch,), generator=gen).tolist()
        engine.step(torch.stack([data[(i, augment_seed(args.seed, step, i))] for i in idx]), step)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append(evaluate(step + 1))
    reached = next((row["step"] for row in curve if row["decoder"]["psnr"] >= target), None)
    report.update(curve=curve, target_psnr=round(target, 3), steps_to_target=reached,
                  target_met=reached is not None and reached <= 300,
                  train_s=round(time.perf_counter() - t_train, 1), wall_s=round(time.perf_counter() - t0, 1),
                  threads=torch.get_num_threads())
    print(f"tiny decoder reaches {target:.2f} dB at step {reached}; training {report['train_s']} s "
          f"on {report['threads']} threads", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
