"""Training-step benchmarks.

    python benchmarks/bench_train.py                 # CPU: ours vs diffusers' AutoencoderKL, same step
    python benchmarks/bench_train.py --what demo     # wall time of `zturbo train --profile demo`
    python benchmarks/bench_train.py --what lpips    # cost of LPIPS at full size against loss.lpips_size views
    python benchmarks/bench_train.py --what gpu      # CUDA: the training report (below)
    python benchmarks/bench_train.py --what gpu-memory  # CUDA: only the memory per profile at its guide batch
    python benchmarks/bench_train.py --what gpu --device cpu --size 32 --batch 2 --repeats 1  # dry run

``--what gpu`` reports in one run, in this order while ``--budget`` lasts: the profile's
step (default fast, 1024 px, batch 24, bf16, GAN on, compiled by default) with step time,
images/s, MFU against the bf16 matmul peak measured in the same run, peak memory, graph
breaks and the 10 most expensive kernels of one step (torch.profiler); the same step with
diffusers' AutoencoderKL of the same config and losses, and with the standard profile
(speedup next to the FLOP ratio), both at a smaller batch of equal micro-batches, both
sides with the same compile setting (eager by default: compiling takes minutes); then
each menu profile's peak memory per micro-batch at its guide batch, eager, up to a 32 GB
card, with the fastest micro-batch that fits.

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

from zturbo.bench.timing import free_device_memory, time_interleaved
from zturbo.config import load_settings
from zturbo.train.memory import does_not_fit
from zturbo.utils import atomic_path

REPO = Path(__file__).resolve().parents[1]


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


def matmul_peak_tflops(device: torch.device, n: int = 8192) -> tuple[float, str]:
    """The matmul peak measured here: bf16 on CUDA, fp32 on the CPU (the dtype each run trains in)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    [t] = time_interleaved([lambda: a @ b], device, warmup=3, repeats=10)
    return 2 * n**3 / (t.median_ms / 1e3) / 1e12, str(dtype).replace("torch.", "")


def step_flops_per_image(settings, device: torch.device, model_factory=None) -> int:
    """FLOPs of one full training step on one image, counted by torch (fwd + bwd, VAE + LPIPS + GAN), eager."""
    from torch.utils.flop_counter import FlopCounterMode

    from zturbo.train.engine import TrainEngine

    one = settings.model_copy(deep=True)
    one.train.batch_size, one.train.micro_batch_size, one.train.compile = 1, None, "off"
    model = model_factory(one) if model_factory else None
    engine = TrainEngine(one, device, model=model, lpips_random_backbone=True, total_steps=10)
    x = torch.rand(1, 3, settings.data.image_size, settings.data.image_size) * 2 - 1
    engine.step(x, 0)
    with FlopCounterMode(display=False) as counter:
        engine.step(x, 1)
    del engine
    free_device_memory(device)
    return int(counter.get_total_flops())


def _diffusers_model(settings):
    from diffusers import AutoencoderKL

    from zturbo.model import VAE

    return AutoencoderKL.from_config(VAE(settings.model).diffusers_config())


def lpips_cost(size: int, batch: int, repeats: int) -> dict:
    """LPIPS-VGG (untrained backbone: the same FLOPs) forward + backward on the full image and on the
    loss.lpips_size views, timed interleaved on this CPU."""
    from zturbo.perceptual import load_lpips
    from zturbo.train.losses import perceptual_view

    device = torch.device("cpu")
    net = load_lpips("vgg", device, random_backbone=True)
    target = torch.rand(batch, 3, size, size) * 2 - 1
    recon = (target + 0.1 * torch.randn_like(target)).requires_grad_(True)
    offset = torch.tensor([size // 8, size // 8])
    views = {"full": (None, "resize"), f"resize {size // 2}": (size // 2, "resize"),
             f"crop {size // 2}": (size // 2, "crop"), f"resize {size // 4}": (size // 4, "resize")}

    def run(lp_size, view):
        def fn():
            r, t = perceptual_view(recon, target, lp_size, view, offset)
            net(r, t).mean().backward()
        return fn

    timings = time_interleaved([run(*v) for v in views.values()], device, warmup=1, repeats=repeats)
    full = timings[0].median_ms
    return {"size": size, "batch": batch, "threads": torch.get_num_threads(),
            "views": {k: {"ms": t.median_ms, "vs_full": t.median_ms / full} for k, t in zip(views, timings)}}


def print_tables(results: dict, profile: str) -> None:
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
    if "lpips" in results:
        lp = results["lpips"]
        cells = ", ".join(f"{k} {v['ms']:.0f} ms ({v['vs_full']:.2f}x)" for k, v in lp["views"].items())
        print(f"| LPIPS-VGG fwd+bwd, {lp['size']} px batch {lp['batch']}, {lp['threads']} threads | {cells} |")
    g = results.get("gpu")
    if not g:
        return
    if "headline" in g:
        r = g["headline"]
        c = r["compile"]
        breaks = "eager" if not c["compiled"] else f"{c['graph_breaks']} graph break(s), {c['graphs']} graphs"
        print(f"| {profile} {r['image_size']}px batch {r['batch_size']} (GAN on, {r['precision']}, micro {r['micro_batch']}, "
              f"{breaks}) on {g['device']} | {r['step_ms']:.0f} ms/step, {r['images_per_s']:.2f} img/s, peak "
              f"{r['peak_memory_gib']:.1f} GiB, {r['tflops']:.3g} TFLOP/s = MFU {r['mfu']:.1%} of the measured "
              f"{g['peak_dtype']} peak {g['peak_tflops']:.3g} |")
        for reason in c.get("reasons", {}):
            print(f"| graph break | {reason.splitlines()[0][:150]} |")
        for k in r.get("top_kernels", []):
            print(f"| kernel ({k['calls']} calls) | {k['ms']:.1f} ms = {k['share']:.1%}: `{k['name'][:90]}` |")
    if "vs_diffusers" in g:
        d = g["vs_diffusers"]
        print(f"| same step, diffusers AutoencoderKL (batch {d['batch']}, micro {d['micro_batch']}, compile "
              f"{d['compile']} both) | zturbo {d['zturbo_ms']:.0f} ms vs diffusers {d['diffusers_ms']:.0f} ms = "
              f"{d['ratio']:.2f}x its time (the headline step per image: {d['headline_vs_diffusers_per_image']:.2f}x); "
              f"peak {d['zturbo_peak_gib']:.1f} vs {d['diffusers_peak_gib']:.1f} GiB |")
    if "vs_standard" in g:
        d = g["vs_standard"]
        print(f"| standard vs {profile} step (batch {d['batch']}, compile {d['compile']}) | {d['standard_ms']:.0f} vs {d['fast_ms']:.0f} ms = "
              f"{d['speedup']:.2f}x (FLOP ratio {d['flop_ratio']:.2f}x; {d['speedup_over_flop_ratio']:.0%} of it) |")
    for name, m in g.get("memory", {}).items():
        best = m.get("fastest_fitting")
        per = ", ".join(f"{r['micro_batch']}: {r['peak_gib']:.1f} GiB" for r in m["micro_batches"])
        verdict = (f"fastest fitting micro-batch {best['micro_batch']} ({best['ms_per_image']:.0f} ms/img)" if best
                   else m.get("error", "not measured"))
        print(f"| {name} {m['image_size']}px guide batch {m['guide_batch']} | {verdict}; peak by micro-batch: {per} |")
    if g.get("skipped"):
        print(f"| skipped (budget) | {', '.join(g['skipped'])} |")


CARD_GIB = 30.0  # a 32 GB card less ~2 GiB for the CUDA context, cuDNN workspaces and fragmentation


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


WARMUP = 2  # steps before timing (the first compiles); --warmup sets it


def timed_step(settings, device, repeats: int, *, model_factory=None, batch=None, micro=None, fit=True,
               profile_top: int = 0, gan: bool = True) -> dict:
    from zturbo.train import benchmark_step

    s = settings.model_copy(deep=True)
    if batch is not None:
        s.train.batch_size = batch
    if micro is not None:
        s.train.micro_batch_size = micro
    free_device_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = model_factory(s) if model_factory else None
    return benchmark_step(s, device, steps=repeats, warmup=WARMUP, model=model, disc_active=gan, fit=fit,
                          profile_top=profile_top)


def train_report(profile: str, repeats: int, compile_mode: str, device: torch.device, size: int | None,
                 batch: int | None, compare_batch: int | None, budget_s: float, profile_size: int | None,
                 max_micro: int | None = None, compare_compile: str = "off") -> dict:
    """Step time, images/s, MFU, peak memory, graph breaks, top kernels; against diffusers and standard;
    memory per profile at its guide batch. Sections run in that order while the budget lasts."""
    budget = Budget(budget_s)
    cuda = device.type == "cuda"
    out: dict = {"device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
                 "torch": torch.__version__, "skipped": []}
    out["peak_tflops"], out["peak_dtype"] = matmul_peak_tflops(device)
    overrides: dict = {"train": {"precision": "bf16" if cuda else "fp32", "compile": compile_mode},
                       "loss": {"disc_start": 0}}
    if size:
        overrides["data"] = {"image_size": size}
        overrides["model"] = {"sample_size": size}
    if batch:
        overrides["train"]["batch_size"] = batch
    settings = load_settings(profile, None, overrides)

    head = timed_step(settings, device, repeats, profile_top=10)
    flops = step_flops_per_image(settings, device)
    head.update(flops_per_image=flops, tflops=flops * head["batch_size"] / (head["step_ms"] / 1e3) / 1e12)
    head["mfu"] = head["tflops"] / out["peak_tflops"]
    out["headline"] = head
    print(json.dumps({k: v for k, v in head.items() if k not in ("step_ms_all", "top_kernels")}), flush=True)

    cmp_batch = compare_batch or min(head["batch_size"], 2 * head["micro_batch"])
    micro = min(head["micro_batch"], cmp_batch)
    # Like for like and without more compiles (minutes each at 1024 px): both sides of each comparison
    # run with the same compile setting, eager unless --compare-compile.
    cmp = settings.model_copy(deep=True)
    cmp.train.compile = compare_compile
    if budget.left() > 60:
        ours = timed_step(cmp, device, repeats, batch=cmp_batch, micro=micro, fit=False)
        theirs = timed_step(cmp, device, repeats, batch=cmp_batch, micro=micro, fit=False,
                            model_factory=_diffusers_model)
        out["vs_diffusers"] = {"batch": cmp_batch, "micro_batch": micro, "compile": compare_compile,
                               "zturbo_ms": ours["step_ms"], "diffusers_ms": theirs["step_ms"],
                               "ratio": ours["step_ms"] / theirs["step_ms"],
                               "headline_vs_diffusers_per_image": (head["step_ms"] / head["batch_size"])
                               / (theirs["step_ms"] / cmp_batch),
                               "diffusers_peak_gib": theirs["peak_memory_gib"], "zturbo_peak_gib": ours["peak_memory_gib"]}
        print(json.dumps(out["vs_diffusers"], default=str), flush=True)
    else:
        out["skipped"].append("vs_diffusers")
    if budget.left() > 60:
        std = cmp.model_copy(update={"model": load_settings("standard", None, overrides).model})
        std_r = timed_step(std, device, repeats, batch=cmp_batch, micro=micro, fit=False)
        std_flops = step_flops_per_image(std, device)
        base_ms = out["vs_diffusers"]["zturbo_ms"] if "vs_diffusers" in out else \
            timed_step(cmp, device, repeats, batch=cmp_batch, micro=micro, fit=False)["step_ms"]
        out["vs_standard"] = {"batch": cmp_batch, "compile": compare_compile, "standard_ms": std_r["step_ms"],
                              "fast_ms": base_ms, "speedup": std_r["step_ms"] / base_ms,
                              "flop_ratio": std_flops / flops}
        out["vs_standard"]["speedup_over_flop_ratio"] = out["vs_standard"]["speedup"] / out["vs_standard"]["flop_ratio"]
        print(json.dumps(out["vs_standard"]), flush=True)
    else:
        out["skipped"].append("vs_standard")
    out["memory"] = profile_memory(device, budget, profile_size, out["skipped"], max_micro)
    return out


def profile_memory(device: torch.device, budget: Budget | None = None, size: int | None = None,
                   skipped: list | None = None, max_micro: int | None = None) -> dict:
    """Each menu profile at its guide batch: peak memory per micro-batch (one eager bf16 step, GAN on) up to
    what fits on a 32 GB card (CARD_GIB), and the fastest fitting micro-batch (ms per image)."""
    cuda = device.type == "cuda"
    out = {}
    for name in ("ultrafast", "fast", "highres", "ultra"):
        if budget is not None and budget.left() < 30:
            (skipped if skipped is not None else []).append(f"memory-{name}")
            continue
        overrides: dict = {"train": {"precision": "bf16" if cuda else "fp32", "compile": "off"},
                           "loss": {"disc_start": 0}}
        if size:
            overrides["data"], overrides["model"] = {"image_size": size}, {"sample_size": size}
        s = load_settings(name, None, overrides)
        guide = s.train.batch_size
        rows, entry = [], {"image_size": s.data.image_size, "guide_batch": guide}
        for m in [d for d in range(1, min(guide, max_micro or guide) + 1) if guide % d == 0]:
            if budget is not None and budget.left() < 20:
                break
            try:
                r = timed_step(s, device, 1, batch=m, micro=m, fit=False)
            except torch.OutOfMemoryError:
                r = {"peak_memory_gib": float("inf"), "step_ms": float("nan")}
            rows.append({"micro_batch": m, "peak_gib": r["peak_memory_gib"], "ms_per_image": r["step_ms"] / m})
            print(name, rows[-1], flush=True)
            if cuda and r["peak_memory_gib"] > CARD_GIB:
                break
        fitting = [r for r in rows if not cuda or r["peak_gib"] <= CARD_GIB]
        entry["micro_batches"] = rows
        if fitting:
            best = min(fitting, key=lambda r: r["ms_per_image"])
            entry["fastest_fitting"] = best
        elif rows:
            entry["error"] = does_not_fit(name, s.data.image_size, rows[0]["peak_gib"], CARD_GIB,
                                          s.train.gradient_checkpointing).message
        out[name] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", default="step", help="comma list of: step, demo, lpips, gpu, gpu-memory")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--size", type=int, default=None, help="image size (step: 64; gpu: the profile's)")
    parser.add_argument("--batch", type=int, default=None, help="batch (step: 2; gpu: the profile's)")
    parser.add_argument("--compare-batch", type=int, default=None,
                        help="gpu: batch of the diffusers / standard comparisons (default: 2 micro-batches)")
    parser.add_argument("--profile", default="fast")
    parser.add_argument("--device", default="cuda", help="gpu, gpu-memory: cuda, or cpu for a dry run at --size")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--budget", type=float, default=420.0, help="gpu: seconds; later sections are skipped past it")
    parser.add_argument("--compare-compile", default="off", choices=["auto", "on", "off"],
                        help="gpu: compile setting of both sides of the diffusers and standard comparisons")
    parser.add_argument("--warmup", type=int, default=2, help="gpu: steps before timing")
    parser.add_argument("--max-micro", type=int, default=None, help="gpu: largest micro-batch tried per profile")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--print-json", type=Path, help="only print the tables of results written by --json")
    args = parser.parse_args()
    if args.print_json:
        saved = json.loads(args.print_json.read_text())
        print_tables(saved, saved.get("profile", args.profile))
        return
    results: dict = {"profile": args.profile}
    what = args.what.split(",")
    if "step" in what:
        for perceptual in (0.0, 0.8):
            r = compare_with_diffusers(args.repeats, args.size or 64, args.batch or 2, perceptual)
            results.setdefault("step_vs_diffusers", []).append(r)
    if "demo" in what:
        results["demo"] = demo_wall_time(Path("/tmp/zturbo-bench-demo"))
    if "lpips" in what:
        results["lpips"] = lpips_cost(args.size or 256, args.batch or 2, args.repeats)
    device = torch.device(args.device)
    global WARMUP
    WARMUP = args.warmup
    if "gpu" in what:
        results["gpu"] = train_report(args.profile, args.repeats, args.compile, device, args.size, args.batch,
                                      args.compare_batch, args.budget, args.size, args.max_micro,
                                      args.compare_compile)
    elif "gpu-memory" in what:
        results["gpu"] = {"memory": profile_memory(device, Budget(args.budget), args.size, [], args.max_micro)}
    print_tables(results, args.profile)
    if args.json:
        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
