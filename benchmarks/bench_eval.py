"""Throughput of `zturbo eval` and where its time goes: reconstruction or metrics.

    python benchmarks/bench_eval.py                       # demo-profile model, 8 photos at 256 px, CPU
    python benchmarks/bench_eval.py --profile fast --images 4 --json out.json

Variants run interleaved (one pass of each per round, median over rounds):

    psnr+ssim          PSNR, SSIM and MS-SSIM only
    +lpips-alex        ... and LPIPS with AlexNet
    +lpips-vgg         ... and LPIPS with VGG16
    +lpips-alex+vgg    the default metric set

Images/s counts image loading, encode, decode and metrics (the steady state: the
metric networks load once before the rounds, and each run's one warm-up image
is reported apart as set-up). LPIPS backbones without
their downloaded ImageNet weights are built with random weights: the compute,
and so the timing, is the same, but no LPIPS value is printed then.
FLOPs per image come from torch.utils.flop_counter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

VARIANTS = {
    "psnr+ssim": (["psnr", "ssim"], ["alex"]),
    "+lpips-alex": (["psnr", "ssim", "lpips"], ["alex"]),
    "+lpips-vgg": (["psnr", "ssim", "lpips"], ["vgg"]),
    "+lpips-alex+vgg": (["psnr", "ssim", "lpips"], ["alex", "vgg"]),
}


def lpips_flops(net: str, size: int, random_backbone: bool) -> int:
    from zturbo.bench.flops import count_flops
    from zturbo.perceptual import load_lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = load_lpips(net, "cpu", random_backbone=random_backbone)
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        return count_flops(model, x, x)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--profile", default="demo", help="architecture of the model evaluated (random weights)"
    )
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=4, help="bundled demo photos used")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {', '.join(VARIANTS)}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from zturbo.backends import create_backend
    from zturbo.bench.timing import time_rounds
    from zturbo.config import EvalConfig, load_settings
    from zturbo.data import demo_images
    from zturbo.eval import MetricSuite, evaluate
    from zturbo.model import VAE
    from zturbo.bench.flops import vae_flops
    from zturbo.perceptual import backbone_weights_path

    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    random_lpips = {net: not backbone_weights_path(net).is_file() for net in ("alex", "vgg")}

    model_cfg = load_settings(args.profile).model
    torch.manual_seed(0)
    vae = VAE(model_cfg)
    setup_start = time.perf_counter()
    backend = create_backend("torch", vae, device=args.device, precision="fp32")
    data = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    for path in demo_images()[: args.images]:
        (data / path.name).symlink_to(path)
    n_images = len(list(data.iterdir()))

    flops = vae_flops(model_cfg, args.size)
    lp_flops = {net: lpips_flops(net, args.size, random_lpips[net]) for net in ("alex", "vgg")}

    device = torch.device(args.device)
    suites = {  # metric networks load once per variant, outside the timed rounds
        v: MetricSuite(
            VARIANTS[v][0],
            device,
            lpips_nets=VARIANTS[v][1],
            lpips_random_backbone=any(random_lpips[n] for n in VARIANTS[v][1]),
            allow_download=False,
        )
        for v in variants
    }
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    reports: dict[str, list] = {v: [] for v in variants}

    def run_variant(variant: str):
        metrics, nets = VARIANTS[variant]
        cfg = EvalConfig(
            size=args.size,
            metrics=metrics,
            lpips_nets=nets,
            batch_size=args.batch_size,
            device=args.device,
            sheet_images=0,
        )
        return lambda _round: reports[variant].append(evaluate(backend, data, cfg, metric_suite=suites[variant]))

    setup_s = time.perf_counter() - setup_start  # backend, inputs, FLOP counts, metric networks
    # One run of every variant per round, the order reversed in odd rounds.
    timings = time_rounds([run_variant(v) for v in variants], device, rounds=args.rounds, alternate=True)
    for variant, timing in zip(variants, timings):
        for wall_ms, report in zip(timing.samples_ms, reports[variant]):
            t = report.timing
            model = report.models["model"]
            steady = t["load_s"] + model["encode_s"] + model["decode_s"] + sum(t["metrics_s"].values())
            runs[variant].append(
                {
                    "images": model["images_timed"],
                    "steady_s": steady,
                    "setup_s": wall_ms / 1e3 - steady,
                    "load_s": t["load_s"],
                    "encode_s": model["encode_s"],
                    "decode_s": model["decode_s"],
                    "metrics_s": dict(t["metrics_s"]),
                }
            )
    bench_s = sum(sum(t.samples_ms) for t in timings) / 1e3

    results = {}
    for variant, rs in runs.items():

        def med(key: str, rs: list[dict] = rs) -> float:
            return statistics.median(r[key] for r in rs)

        metric_names = rs[0]["metrics_s"].keys()
        per_metric = {
            m: statistics.median(r["metrics_s"][m] for r in rs) / n_images * 1e3 for m in metric_names
        }
        results[variant] = {
            "images_per_s": n_images / med("steady_s"),
            "setup_s": med("setup_s"),
            "ms_per_image": {
                "load": med("load_s") / n_images * 1e3,
                "encode": med("encode_s") / n_images * 1e3,
                "decode": med("decode_s") / n_images * 1e3,
                "metrics": sum(per_metric.values()),
                **{f"metric:{k}": v for k, v in per_metric.items()},
            },
            "rounds": rs,
        }

    print(
        f"eval throughput: {args.profile} architecture ({'/'.join(map(str, model_cfg.block_out_channels))}, "
        f"z={model_cfg.latent_channels}), {n_images} photos at {args.size} px, batch {args.batch_size}, "
        f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} rounds"
    )
    print(
        f"FLOPs/image: encode {flops['encode'] / 1e9:.1f} G, decode {flops['decode'] / 1e9:.1f} G, "
        f"LPIPS-alex {lp_flops['alex'] / 1e9:.1f} G, LPIPS-vgg {lp_flops['vgg'] / 1e9:.1f} G"
    )
    if any(random_lpips.values()):
        missing = [n for n, r in random_lpips.items() if r]
        print(
            f"LPIPS {'/'.join(missing)}: no downloaded weights, random backbone (same compute; values not used)"
        )
    header = f"{'variant':<17}{'img/s':>7}{'load':>8}{'encode':>8}{'decode':>8}{'metrics':>9}  dominant   (ms/image)"
    print(header)
    print("-" * len(header))
    for variant, r in results.items():
        ms = r["ms_per_image"]
        parts = {"decode": ms["decode"], "encode": ms["encode"], "metrics": ms["metrics"], "load": ms["load"]}
        dominant = max(parts, key=parts.get)
        print(
            f"{variant:<17}{r['images_per_s']:>7.2f}{ms['load']:>8.0f}{ms['encode']:>8.0f}{ms['decode']:>8.0f}"
            f"{ms['metrics']:>9.0f}  {dominant}"
        )
    for variant, r in results.items():
        detail = ", ".join(
            f"{k.removeprefix('metric:')} {v:.0f}" for k, v in r["ms_per_image"].items() if ":" in k
        )
        print(f"  {variant}: metric ms/image: {detail}")
    print(
        f"(benchmark wall time {bench_s:.0f} s; one-time set-up per run, median: "
        + ", ".join(f"{v} {r['setup_s']:.1f} s" for v, r in results.items())
        + ")"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "profile": args.profile,
                    "block_out_channels": model_cfg.block_out_channels,
                    "size": args.size,
                    "images": n_images,
                    "device": args.device,
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "flops": flops,
                    "lpips_flops": lp_flops,
                    "lpips_random_backbone": random_lpips,
                    "setup_s_before_rounds": setup_s,
                    "results": results,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
