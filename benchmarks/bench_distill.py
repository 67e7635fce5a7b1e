"""Decoder distillation: quality per step (prune vs random init), decode speed, training memory.

    python benchmarks/bench_distill.py --teacher-steps 250 --student-steps 160 --out distill.json
    python benchmarks/bench_distill.py --teacher runs/demo/final --size 128 --student-steps 300 --eval-every 25
    python benchmarks/bench_distill.py --device cuda --teacher FLUX.1-dev/vae --speed-only --resolution 1024 \\
        --precision bf16 --compile

Quality (CPU-sized by default): a small teacher, the demo profile's widths x2, is trained
on the bundled photos; then three students with the teacher's encoder frozen and a decoder at
half its widths train on the teacher's latents from the same data and seed: one from the
pruned teacher refit on the training images (the default), one pruned by weight magnitude
alone (``calibration_images=0``), one from random weights. PSNR and SSIM on the held-out photos every
``--eval-every`` steps make the curve; the target is the pruned student reaching the
teacher's PSNR - 1 dB in at most half the steps random init needs.

Speed: the student's and the teacher's decoders on the same latents, timed interleaved,
next to their counted FLOP ratio. Memory: one training micro-batch's tensors saved for the
backward (bytes, counted exactly through autograd's saved-tensor hooks) for the decoder
alone against the frozen encoder, next to training the whole teacher; on CUDA also the
allocator's peak.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from zturbo.bench.timing import time_interleaved
from zturbo.config import load_settings
from zturbo.data import demo_dir
from zturbo.data.batch import TrainBatch
from zturbo.data.datasets import ImageFolderDataset, augment_seed, load_batch, split_data
from zturbo.distill import Student, load_student, load_teacher, student_settings
from zturbo.eval.metrics import psnr_uint8, ssim_uint8
from zturbo.model import VAE, ModelConfig
from zturbo.bench.flops import vae_flops
from zturbo.train.engine import TrainEngine

# The demo profile's model at twice its widths, with the demo's 4 GroupNorm groups: the half-width
# student decoder is then the demo's own decoder (4 channels per group at its narrowest level; with
# one channel per group the last norm would remove each channel's mean, see profiles/demo.toml).
TEACHER = ModelConfig(
    block_out_channels=[32, 64, 128, 128], norm_num_groups=4, layers_per_block=1, latent_channels=8,
    mid_block_add_attention=False, sample_size=128,
)
STUDENT_DECODER = [16, 32, 64, 64]


def settings_for(out: Path, steps: int, size: int, lr: float, **distill):
    overrides = {
        "data": {"data_dir": demo_dir(), "image_size": size, "num_workers": 0},
        "train": {"output_dir": out, "batch_size": 4, "max_steps": steps, "warmup_steps": 10, "learning_rate": lr,
                  "ema_decay": 0.0},
        "distill": distill,
    }
    return load_settings("demo", None, overrides)


def student_for(settings, train: list[Path], device: torch.device) -> Student:
    """The student as `zturbo train` builds it, calibrated on the training photos ``train``."""
    return load_student(student_settings(settings), device, train)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round()


@torch.no_grad()
def quality(vae: VAE, val: torch.Tensor) -> tuple[float, float]:
    vae.eval()
    recon = vae(val)
    vae.train()
    ref, out = to_uint8(val), to_uint8(recon)
    return float(psnr_uint8(out, ref).mean()), float(ssim_uint8(out, ref).mean())


def train(engine: TrainEngine, paths: list[Path], size: int, steps: int, seed: int, val: torch.Tensor,
          eval_every: int) -> list[dict]:
    """``steps`` steps on random crops of ``paths``; quality of the live weights every ``eval_every``."""
    data = ImageFolderDataset(paths, size)
    gen = torch.Generator().manual_seed(seed)
    curve = [{"step": 0, **dict(zip(("psnr", "ssim"), quality(engine.vae, val)))}]
    for step in range(steps):
        idx = torch.randint(0, len(data), (4,), generator=gen).tolist()
        batch = torch.stack([data[(i, augment_seed(seed, step, i))] for i in idx])
        engine.step(batch, step)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            psnr, ssim = quality(engine.vae, val)
            curve.append({"step": step + 1, "psnr": round(psnr, 3), "ssim": round(ssim, 4)})
    return curve


def steps_to(curve: list[dict], psnr: float) -> int | None:
    return next((c["step"] for c in curve if c["psnr"] >= psnr), None)


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward during ``fn()`` (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def memory(teacher_dir: Path, work: Path, train: list[Path], size: int, device: torch.device) -> dict:
    x = torch.rand(4, 3, size, size, device=device) * 2 - 1
    s = settings_for(work / "mem", 1, size, 1e-3, teacher=teacher_dir, decoder_channels=STUDENT_DECODER)
    d = student_for(s, train, device)
    teacher = load_teacher(teacher_dir, device).train().requires_grad_(True)

    def student_step():
        d.forward(TrainBatch(x)).recon.float().abs().mean().backward()

    def teacher_step():
        teacher(x).float().abs().mean().backward()

    out = {"micro_batch": 4, "size": size,
           "saved_for_backward_mib": {"student_decoder_distill": saved_bytes(student_step) / 2**20,
                                      "teacher_full_training": saved_bytes(teacher_step) / 2**20}}
    if device.type == "cuda":
        for name, fn in (("student_decoder_distill", student_step), ("teacher_full_training", teacher_step)):
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            out.setdefault("cuda_peak_above_weights_mib", {})[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return out


def speed(teacher: VAE, student: VAE, resolution: int, batch: int, device: torch.device, dtype: torch.dtype,
          compile: bool, repeats: int) -> dict:
    f = teacher.config.downsample_factor
    z = torch.randn(batch, teacher.config.latent_channels, resolution // f, resolution // f, device=device, dtype=dtype)
    fns = []
    for vae in (teacher, student):
        vae = vae.to(device, dtype).eval()
        decode = torch.compile(vae.decode) if compile else vae.decode
        fns.append(lambda decode=decode: decode(z))
    with torch.inference_mode():
        t_teacher, t_student = time_interleaved(fns, device, warmup=2, repeats=repeats)
    flops_t = vae_flops(teacher.config, resolution)["decode"]
    flops_s = vae_flops(student.config, resolution)["decode"]
    speedup = t_teacher.median_ms / t_student.median_ms
    return {"resolution": resolution, "batch": batch, "dtype": str(dtype).removeprefix("torch."), "compile": compile,
            "teacher_ms": round(t_teacher.median_ms, 2), "student_ms": round(t_student.median_ms, 2),
            "speedup": round(speedup, 3), "flop_ratio": round(flops_t / flops_s, 3),
            "speedup_over_flop_ratio": round(speedup / (flops_t / flops_s), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/bench-distill"))
    p.add_argument("--teacher", type=Path, help="an existing teacher folder, e.g. the demo model (runs/demo/final); skips training one")
    p.add_argument("--teacher-steps", type=int, default=250)
    p.add_argument("--teacher-lr", type=float, default=5e-3, help="the demo profile's learning rate")
    p.add_argument("--student-lr", type=float, default=2e-3)
    p.add_argument("--student-steps", type=int, default=160)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--size", type=int, default=64, help="training crop")
    p.add_argument("--val-size", type=int, default=128)
    p.add_argument("--resolution", type=int, default=256, help="speed: decode resolution")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--decoder-channels", default=None, help="speed with --teacher: student widths (default: half)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    report: dict = {}
    t0 = time.perf_counter()
    split = split_data(demo_dir(), 4)
    val = load_batch(split.val, args.val_size).to(device)

    teacher_dir = args.teacher
    if teacher_dir is None:
        teacher_dir = args.work / "teacher"
        s = settings_for(args.work / "t", args.teacher_steps, args.size, args.teacher_lr).model_copy(update={"model": TEACHER})
        engine = TrainEngine(s, device, total_steps=args.teacher_steps, warmup_steps=10)
        curve = train(engine, split.train, args.size, args.teacher_steps, 0, val, args.teacher_steps)
        engine.vae.save_pretrained(teacher_dir)
        report["teacher"] = {"widths": TEACHER.block_out_channels, "steps": args.teacher_steps, **curve[-1]}
        print(f"teacher: {curve[-1]}  ({time.perf_counter() - t0:.0f} s)", flush=True)

    teacher = load_teacher(teacher_dir, device)
    if "teacher" not in report:  # an existing teacher: its quality on the same held-out photos
        psnr, ssim = quality(teacher, val)
        report["teacher"] = {"path": str(teacher_dir), "widths": teacher.config.decoder_channels,
                             "psnr": round(psnr, 3), "ssim": round(ssim, 4)}
        print(f"teacher: {report['teacher']}", flush=True)
    widths = ([int(v) for v in args.decoder_channels.split(",")] if args.decoder_channels
              else STUDENT_DECODER if args.teacher is None else [c // 2 for c in teacher.config.decoder_channels])
    if not args.speed_only:
        target = report["teacher"]["psnr"] - 1.0
        # "prune": calibrated on the training images (the default); "prune_uncalibrated": the teacher's
        # channels by weight magnitude alone (calibration_images=0).
        variants = {"prune": ("prune", None), "prune_uncalibrated": ("prune", 0), "random": ("random", None)}
        for name, (init, calibration) in variants.items():
            extra = {} if calibration is None else {"calibration_images": calibration}
            s = settings_for(args.work / name, args.student_steps, args.size, args.student_lr, teacher=teacher_dir,
                             decoder_channels=widths, init=init, **extra)
            t_init = time.perf_counter()
            d = student_for(s, split.train, device)
            init_s = time.perf_counter() - t_init
            engine = TrainEngine(d.settings, device, model=d.model, forward_module=d.forward,
                                 total_steps=args.student_steps, warmup_steps=10)
            curve = train(engine, split.train, args.size, args.student_steps, 1, val, args.eval_every)
            report[name] = {"curve": curve, "steps_to_teacher_minus_1db": steps_to(curve, target),
                            "init_s": round(init_s, 2)}
            print(f"{name}: start {curve[0]}, end {curve[-1]}, reaches {target:.2f} dB at step "
                  f"{report[name]['steps_to_teacher_minus_1db']}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        p_steps, r_steps = report["prune"]["steps_to_teacher_minus_1db"], report["random"]["steps_to_teacher_minus_1db"]
        report["target_met"] = p_steps is not None and (r_steps is None or p_steps <= r_steps / 2)
        report["memory"] = memory(teacher_dir, args.work, split.train, args.size, device)
        print(f"memory: {report['memory']}", flush=True)

    student_cfg = teacher.config.model_copy(update={"decoder_block_out_channels": widths})
    report["speed"] = speed(teacher, VAE(student_cfg), args.resolution, args.batch, device, dtype, args.compile,
                            args.repeats)
    print(f"speed: {report['speed']}", flush=True)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
