"""Encode/decode latency of zturbo's VAE vs diffusers' AutoencoderKL, same config and weights.

Interleaved in one process (A, B, A, B, ...) so machine noise hits both alike;
reports the median of each and the ratio ours / diffusers (<= 1.0 means ours is
at least as fast).

    python benchmarks/bench_model.py --profile fast --size 256 --repeats 7
"""

from __future__ import annotations

import argparse
import json

import torch
from _common import model_input

from zturbo.bench.cases import diffusers_subject, our_subject
from zturbo.bench.timing import time_interleaved
from zturbo.config import load_settings
from zturbo.utils import resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="fast")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()

    dev = resolve_device(args.device)
    ours = our_subject(load_settings(args.profile).model, args.profile)  # seeded random weights
    ref = diffusers_subject(ours)  # the same weights, loaded strictly
    cfg = ours.config
    vae, dvae = ours.model.to(dev), ref.model.to(dev)
    x = model_input(cfg, "encode", args.size, args.batch, dev)
    z = model_input(cfg, "decode", args.size, args.batch, dev)

    cases = {
        ("encode", "zturbo"): lambda: vae.encode(x).mean,
        ("encode", "diffusers"): lambda: dvae.encode(x).latent_dist.mean,
        ("decode", "zturbo"): lambda: vae.decode(z),
        ("decode", "diffusers"): lambda: dvae.decode(z).sample,
    }
    with torch.inference_mode():
        torch.testing.assert_close(cases[("decode", "zturbo")](), cases[("decode", "diffusers")](), atol=1e-4, rtol=0)
        timings = time_interleaved(list(cases.values()), dev, warmup=args.warmup, repeats=args.repeats)
    median_ms = {key: t.median_ms for key, t in zip(cases, timings)}

    result = {"profile": args.profile, "size": args.size, "batch": args.batch, "repeats": args.repeats,
              "device": str(dev), "threads": torch.get_num_threads(), "cases": {}}
    print(f"{args.profile} fp32 {dev} {args.size}x{args.size} batch {args.batch}, median of {args.repeats}, interleaved")
    print(f"{'pass':<8}{'zturbo ms':>12}{'diffusers ms':>14}{'ratio':>8}")
    for what in ("encode", "decode"):
        a, b = median_ms[(what, "zturbo")], median_ms[(what, "diffusers")]
        result["cases"][what] = {"zturbo_ms": a, "diffusers_ms": b, "ratio": a / b}
        print(f"{what:<8}{a:>12.1f}{b:>14.1f}{a / b:>8.3f}")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
