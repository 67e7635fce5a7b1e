"""Training-step benchmarks.

    python benchmarks/bench_train.py                 # CPU: ours vs diffusers' AutoencoderKL, same step
    python benchmarks/bench_train.py --what demo     # wall time of `zturbo train --profile demo`
    python benchmarks/bench_train.py --what gpu      # CUDA: `fast` at 1024 px, batch 24; MFU; memory per profile
    python benchmarks/bench_train.py --what gpu-memory  # CUDA: only the micro-batch-1 memory per profile

The comparison runs the very same training step (our losses, AdamW, EMA,
clipping) with the model swapped: zturbo's VAE or diffusers' AutoencoderKL built
from the same config and loaded with the same weights. Steps are interleaved and
the median of each is compared, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from zturbo.config import load_settings


def compare_with_diffusers(repeats: int, size: int, batch: int, perceptual: float) -> dict:
    from diffusers import AutoencoderKL

    from zturbo.train.engine import TrainEngine

    overrides = {
        "model": {
            "block_out_channels": [32, 64, 128, 128],
            "layers_per_block": 1,
            "latent_channels": 8,
            "sample_size": size,
            "mid_block_add_attention": True,
        },
        "data": {"image_size": size},
        "train": {"batch_size": batch, "precision": "fp32", "device": "cpu", "ema_decay": 0.999},
        "loss": {"perceptual_weight": perceptual, "disc_weight": 0.5, "disc_start": 0},
    }
    settings = load_settings(None, None, overrides, default_profile=None)
    device = torch.device("cpu")
    ours = TrainEngine(settings, device, lpips_random_backbone=True, total_steps=10**6)
    reference = AutoencoderKL.from_config(ours.vae.diffusers_config())
    reference.load_state_dict(ours.vae.state_dict())
    theirs = TrainEngine(
        settings, device, model=reference, perceptual=ours.loss.perceptual, total_steps=10**6
    )
    theirs.disc.load_state_dict(ours.disc.state_dict())

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
    # Same weights, same data, same noise: the first step's losses must agree.
    a, b = ours.step(images, 0), theirs.step(images, 0)
    agree = abs(a.terms["loss"] - b.terms["loss"]) / abs(b.terms["loss"])
    times = {"zturbo": [], "diffusers": []}
    for i in range(1, repeats + 1):
        for name, engine in (
            (("zturbo", ours), ("diffusers", theirs)) if i % 2 else (("diffusers", theirs), ("zturbo", ours))
        ):
            t0 = time.perf_counter()
            engine.step(images, i)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        "config": f"[32,64,128,128] {size}px batch {batch}, LPIPS {'on (random VGG)' if perceptual else 'off'}, GAN on",
        "zturbo_ms": med["zturbo"],
        "diffusers_ms": med["diffusers"],
        "ratio": med["zturbo"] / med["diffusers"],
        "first_step_loss_rel_diff": agree,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def demo_wall_time(output: Path) -> dict:
    import shutil

    shutil.rmtree(output, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zturbo",
            "train",
            "--profile",
            "demo",
            "--output",
            str(output),
            "--json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    result = json.loads(proc.stdout)
    rows = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    return {
        "wall_s": wall,
        "train_s": result["wall_s"],
        "steps": result["steps"],
        # Single-step values are noisy (4 random crops): compare the first and last five logged steps.
        "rec_first": statistics.mean(r["rec"] for r in rows[:5]),
        "rec_last": statistics.mean(r["rec"] for r in rows[-5:]),
        "threads": torch.get_num_threads(),
    }


def matmul_peak_tflops(device: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def step_flops_per_image(settings, device: torch.device) -> int:
    """FLOPs of one full training step on one image, counted by torch (fwd + bwd, VAE + LPIPS + GAN)."""
    from torch.utils.flop_counter import FlopCounterMode

    from zturbo.train.engine import TrainEngine

    one = settings.model_copy(update={"train": settings.train.model_copy(update={"batch_size": 1})})
    engine = TrainEngine(one, device, lpips_random_backbone=True, total_steps=10)
    x = torch.rand(1, 3, settings.data.image_size, settings.data.image_size) * 2 - 1
    engine.step(x, 0)
    with FlopCounterMode(display=False) as counter:
        engine.step(x, 1)
    return int(counter.get_total_flops())


def gpu(profile: str, repeats: int, compile_model: bool) -> dict:
    from zturbo.train import benchmark_step

    device = torch.device("cuda")
    out: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    out["bf16_matmul_peak_tflops"] = peak = matmul_peak_tflops(device)
    settings = load_settings(profile, None, {"train": {"precision": "bf16", "compile": compile_model}})
    for disc in (False, True):
        torch.cuda.empty_cache()
        r = benchmark_step(settings, device, steps=repeats, warmup=2, disc_active=disc)
        flops = (
            step_flops_per_image(
                settings.model_copy(
                    update={"loss": settings.loss.model_copy(update={"disc_start": 0 if disc else 10**9})}
                ),
                device,
            )
            * settings.train.batch_size
        )
        r["flops_per_step"] = flops
        r["tflops"] = flops / (r["step_ms"] / 1e3) / 1e12
        r["mfu"] = r["tflops"] / peak
        out["gan_on" if disc else "gan_off"] = r
        print(json.dumps({k: v for k, v in r.items() if k != "step_ms_all"}), flush=True)
    out["micro1_peak_gib"] = gpu_memory()["micro1_peak_gib"]
    return out


def gpu_memory() -> dict:
    """Peak memory of one bf16 step at micro-batch 1 for each menu profile (what the menu shows)."""
    from zturbo.train import benchmark_step

    device = torch.device("cuda")
    out: dict = {"device": torch.cuda.get_device_name(device), "micro1_peak_gib": {}}
    for name in ("ultrafast", "fast", "highres", "ultra"):
        s = load_settings(
            name, None, {"train": {"precision": "bf16", "batch_size": 1, "micro_batch_size": 1}}
        )
        torch.cuda.empty_cache()
        r = benchmark_step(s, device, steps=1, warmup=1, disc_active=True)
        out["micro1_peak_gib"][name] = {"peak_gib": r["peak_memory_gib"], "step_ms": r["step_ms"],
                                        "image_size": s.data.image_size}
        print(name, out["micro1_peak_gib"][name], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", default="step", help="comma list of: step, demo, gpu, gpu-memory")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--profile", default="fast")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results: dict = {}
    what = args.what.split(",")
    if "step" in what:
        for perceptual in (0.0, 0.8):
            r = compare_with_diffusers(args.repeats, args.size, args.batch, perceptual)
            results.setdefault("step_vs_diffusers", []).append(r)
    if "demo" in what:
        results["demo"] = demo_wall_time(Path("/tmp/zturbo-bench-demo"))
    if "gpu" in what:
        results["gpu"] = gpu(args.profile, args.repeats, args.compile)
    elif "gpu-memory" in what:
        results["gpu"] = gpu_memory()

    print("\n| benchmark | result |\n| --- | --- |")
    for r in results.get("step_vs_diffusers", []):
        print(
            f"| train step, {r['config']} | zturbo {r['zturbo_ms']:.0f} ms vs diffusers {r['diffusers_ms']:.0f} ms "
            f"= {r['ratio']:.2f}x (median of {r['repeats']}, {r['threads']} threads; "
            f"first-step loss rel. diff {r['first_step_loss_rel_diff']:.1e}) |"
        )
    if "demo" in results:
        d = results["demo"]
        print(
            f"| `zturbo train --profile demo` | {d['wall_s']:.0f} s wall ({d['train_s']:.0f} s training, {d['steps']} steps, "
            f"{d['threads']} threads); rec L1, first / last 5 logged steps {d['rec_first']:.3f} -> {d['rec_last']:.3f} |"
        )
    if "gpu" in results:
        g = results["gpu"]
        for key in [k for k in ("gan_off", "gan_on") if k in g]:
            r = g[key]
            print(
                f"| {args.profile} {r['image_size']}px batch {r['batch_size']} ({key}, {r['precision']}, micro {r['micro_batch']}) "
                f"on {g['device']} | {r['step_ms']:.0f} ms/step, {r['images_per_s']:.1f} img/s, peak {r['peak_memory_gib']:.1f} GiB, "
                f"{r['tflops']:.0f} TFLOP/s = MFU {r['mfu']:.1%} of measured bf16 peak {g['bf16_matmul_peak_tflops']:.0f} |"
            )
        for name, m in g["micro1_peak_gib"].items():
            print(f"| {name} micro-batch 1 step | peak {m['peak_gib']:.1f} GiB, {m['step_ms']:.0f} ms |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
