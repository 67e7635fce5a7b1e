"""Encode/decode latency of zturbo's VAE vs diffusers' AutoencoderKL, same config and weights.

Interleaved in one process (A, B, A, B, ...) so machine noise hits both alike;
reports the median of each and the ratio ours / diffusers (<= 1.0 means ours is
at least as fast).

    python benchmarks/bench_model.py --profile fast --size 256 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build_pair(profile: str):
    from diffusers import AutoencoderKL

    from zturbo import VAE
    from zturbo.config import load_settings

    cfg = load_settings(profile).model
    n = len(cfg.block_out_channels)
    ours = VAE(cfg).eval()
    ref = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
        mid_block_add_attention=cfg.mid_block_add_attention, use_quant_conv=cfg.use_quant_conv,
        use_post_quant_conv=cfg.use_post_quant_conv,
    ).eval()
    ref.load_state_dict(ours.state_dict())
    return cfg, ours, ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="fast")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg, ours, ref = build_pair(args.profile)
    dev = torch.device(args.device)
    ours, ref = ours.to(dev), ref.to(dev)
    x = torch.rand(args.batch, 3, args.size, args.size, device=dev) * 2 - 1
    f = cfg.downsample_factor
    z = torch.randn(args.batch, cfg.latent_channels, args.size // f, args.size // f, device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    cases = {
        ("encode", "zturbo"): lambda: ours.encode(x).mean,
        ("encode", "diffusers"): lambda: ref.encode(x).latent_dist.mean,
        ("decode", "zturbo"): lambda: ours.decode(z),
        ("decode", "diffusers"): lambda: ref.decode(z).sample,
    }
    times: dict = {k: [] for k in cases}
    with torch.inference_mode():
        torch.testing.assert_close(cases[("decode", "zturbo")](), cases[("decode", "diffusers")](), atol=1e-4, rtol=0)
        for fn in cases.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for key, fn in cases.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times[key].append(time.perf_counter() - t0)

    result = {"profile": args.profile, "size": args.size, "batch": args.batch, "repeats": args.repeats,
              "device": str(dev), "threads": torch.get_num_threads(), "cases": {}}
    print(f"{args.profile} fp32 {dev} {args.size}x{args.size} batch {args.batch}, median of {args.repeats}, interleaved")
    print(f"{'pass':<8}{'zturbo ms':>12}{'diffusers ms':>14}{'ratio':>8}")
    for what in ("encode", "decode"):
        a = statistics.median(times[(what, "zturbo")]) * 1e3
        b = statistics.median(times[(what, "diffusers")]) * 1e3
        result["cases"][what] = {"zturbo_ms": a, "diffusers_ms": b, "ratio": a / b}
        print(f"{what:<8}{a:>12.1f}{b:>14.1f}{a / b:>8.3f}")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
