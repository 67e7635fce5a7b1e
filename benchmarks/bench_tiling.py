"""Tiled encode/decode: exactness, the fast mode against diffusers' enable_tiling, memory, speed.

    python benchmarks/bench_tiling.py exactness --size 1024 --tile 256
    python benchmarks/bench_tiling.py fast --size 512 --tile 128
    python benchmarks/bench_tiling.py memory --sizes 1024 2048 --tile 256
    python benchmarks/bench_tiling.py memory --sizes 4096 --tile 256 --modes recompute
    python benchmarks/bench_tiling.py speed --size 2048 --tile 512 --recompute --warmup 0 --repeats 2
    python benchmarks/bench_tiling.py capacity --budget-gib 8

All on the fast profile ([96, 192, 384, 384], 8 latent channels) with seeded random weights,
fp32, unless ``--profile`` names another. ``memory`` runs each decode in its own process and
reports its peak RSS above the RSS it had before decoding (model and latent loaded), next to
``untiled_peak_bytes`` / ``tiled_peak_bytes``. ``capacity`` is estimated only (labelled so).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from PIL import Image

from zturbo import VAE
from zturbo.artifacts import load_vae
from zturbo.bench.timing import measure_peak_memory, time_interleaved
from zturbo.config import load_settings
from zturbo.tiling.memory import coder_plan, tiled_peak_bytes, untiled_peak_bytes

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "samples"


def model(profile: str, path: str | None = None) -> VAE:
    """A trained model from ``path`` (any model, run or diffusers folder), else seeded random weights."""
    if path is not None:
        return load_vae(path).float().eval()
    torch.manual_seed(0)
    return VAE(load_settings(profile).model).eval()


def image(size: int, width: int | None = None) -> torch.Tensor:
    """A real photo, resized: seam errors on structured content, not on noise."""
    path = SAMPLES / "astronaut.png"
    if path.exists():
        img = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)[None]
        img = img.float() / 127.5 - 1
    else:
        img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return F.interpolate(img, size=(size, width or size), mode="bicubic", align_corners=False).clamp(-1, 1)


def latent(vae: VAE, size: int) -> torch.Tensor:
    f = vae.config.downsample_factor
    return torch.randn(1, vae.config.latent_channels, size // f, size // f, generator=torch.Generator().manual_seed(1))


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    err = (a - b).pow(2)
    mse = err[..., mask].mean() if mask is not None else err.mean()
    return float(10 * math.log10(4.0 / max(mse.item(), 1e-20)))  # peak-to-peak range 2 in [-1, 1]


def seam_mask(size: int, starts: list[int], band: int) -> torch.Tensor:
    """Pixels within ``band`` of a tile edge (rows or columns)."""
    line = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        line[max(0, s - band) : s + band] = True
    return line[:, None] | line[None, :]


def cmd_exactness(args) -> dict:
    vae = model(args.profile, args.model)
    x = image(args.size, args.width)
    with torch.no_grad():
        ref_m = vae.encode(x).mean
        enc_err = (vae.encode(x, tile=args.tile).mean - ref_m).abs().max().item()
        z = latent(vae, args.size) if args.width is None else ref_m
        ref = vae.decode(z)
        dec_err = (vae.decode(z, tile=args.tile) - ref).abs().max().item()
    return {"size": [args.size, args.width or args.size], "tile": args.tile, "encode_max_abs_err": enc_err,
            "decode_max_abs_err": dec_err, "decode_output_max_abs": ref.abs().max().item()}


def diffusers_reference(vae: VAE, tile: int):
    import diffusers

    cfg, n = vae.config, len(vae.config.block_out_channels)
    ref = diffusers.AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
        mid_block_add_attention=cfg.mid_block_add_attention, use_quant_conv=cfg.use_quant_conv,
        use_post_quant_conv=cfg.use_post_quant_conv, sample_size=tile).eval()
    ref.load_state_dict(vae.state_dict())
    ref.enable_tiling()
    return ref


def cmd_fast(args) -> dict:
    vae = model(args.profile, args.model)
    f = vae.config.downsample_factor
    ref_vae = diffusers_reference(vae, args.tile)
    x = image(args.size)
    with torch.no_grad():
        z = vae.encode(x).mode()
        ref = vae.decode(z)
        ours = {h: vae.decode(z, tile=args.tile, tile_mode="fast", halo=h, stats_size=args.stats_size)
                for h in args.halos}
        theirs = ref_vae.decode(z).sample
    overlap = int(args.tile * (1 - ref_vae.tile_overlap_factor))  # diffusers' tile stride; blends at its starts
    ours_mask = seam_mask(args.size, list(range(args.tile, args.size, args.tile)), args.band)
    theirs_mask = seam_mask(args.size, list(range(overlap, args.size, overlap)), args.band)
    rows = {f"fast halo={h}px": (out, ours_mask) for h, out in ours.items()}
    rows["diffusers enable_tiling"] = (theirs, theirs_mask)
    with torch.no_grad():
        rows["exact"] = (vae.decode(z, tile=args.tile), ours_mask)
    report = {"size": args.size, "tile": args.tile, "factor": f, "band_px": args.band, "stats_size": args.stats_size}
    for name, (out, mask) in rows.items():
        report[name] = {"max_abs_err": (out - ref).abs().max().item(), "psnr_db": psnr(out, ref),
                        "seam_psnr_db": psnr(out, ref, mask)}
    return report


def cmd_child(args) -> dict:
    """One decode in this process: peak RSS above the RSS before it."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vae = model(args.profile, args.model).to(device)
    z = latent(vae, args.size).to(device)
    before = psutil.Process().memory_info().rss if device.type == "cpu" else 0  # CUDA: counted above z and weights
    tile = None if args.mode == "untiled" else args.tile

    def run():
        with torch.no_grad():
            vae.decode(z, tile=tile, recompute=args.mode == "recompute") if tile else vae.decode(z)

    try:
        peak, what = measure_peak_memory(run, device)
    except torch.OutOfMemoryError:
        return {"mode": args.mode, "size": args.size, "out_of_memory": True, "device": args.device}
    return {"mode": args.mode, "size": args.size, "peak_above_baseline": peak - before, "measured": what,
            "device": args.device}


def cmd_memory(args) -> dict:
    cfg = load_settings(args.profile).model
    f, report, plan = cfg.downsample_factor, [], coder_plan(cfg, "decode")
    for size in args.sizes:
        for mode in args.modes:
            out = subprocess.run([sys.executable, __file__, "child", "--mode", mode, "--size", str(size),
                                  "--tile", str(args.tile), "--profile", args.profile, "--threads", str(args.threads),
                                  "--device", args.device], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            est = (untiled_peak_bytes(plan, 1, size // f, size // f, device_type=args.device)
                   if mode == "untiled"
                   else tiled_peak_bytes(plan, 1, size // f, size // f, args.tile,
                                         recompute=mode == "recompute"))
            row["estimated"] = est
            report.append(row)
            print(json.dumps(row), file=sys.stderr)
    for size in args.extrapolate:
        report.append({"size": size, "estimated_untiled": untiled_peak_bytes(plan, 1, size // f, size // f),
                       "estimated_exact": tiled_peak_bytes(plan, 1, size // f, size // f, args.tile),
                       "estimated_exact_recompute": tiled_peak_bytes(plan, 1, size // f, size // f, args.tile,
                                                                     recompute=True),
                       "estimated_exact_offload_device": tiled_peak_bytes(plan, 1, size // f, size // f,
                                                                          args.tile, offload=True)})
    return {"tile": args.tile, "rows": report}


def cmd_capacity(args) -> dict:
    """Largest square decode (multiple of 64 px) each mode fits in the budget, by the estimates."""
    cfg = load_settings(args.profile).model
    f, budget, plan = cfg.downsample_factor, int(args.budget_gib * 2**30), coder_plan(cfg, "decode")
    element = 2 if args.precision == "bf16" else 4
    weights = VAE(cfg).num_parameters * element

    def largest(fn) -> int:
        size = 64
        while fn(size + 64) <= budget and size < 65536:
            size += 64
        return size

    kw = {"element_size": element, "weight_bytes": weights}
    return {"budget_gib": args.budget_gib, "precision": args.precision, "estimated": True,
            "untiled_px": largest(lambda s: untiled_peak_bytes(plan, 1, s // f, s // f, device_type=args.device, **kw)),
            "exact_px": largest(lambda s: tiled_peak_bytes(plan, 1, s // f, s // f, args.tile, **kw)),
            "exact_recompute_px": largest(
                lambda s: tiled_peak_bytes(plan, 1, s // f, s // f, args.tile, recompute=True, **kw)),
            "exact_offload_device_px": largest(
                lambda s: tiled_peak_bytes(plan, 1, s // f, s // f, args.tile, offload=True, **kw))}


def cmd_speed(args) -> dict:
    """Untiled, exact and (``--recompute``) exact-with-recompute decodes, interleaved in one run."""
    device = torch.device(args.device)
    vae = model(args.profile, args.model).to(device)
    z = latent(vae, args.size).to(device)

    def untiled():
        with torch.no_grad():
            vae.decode(z)

    def exact():
        with torch.no_grad():
            vae.decode(z, tile=args.tile)

    def recompute():
        with torch.no_grad():
            vae.decode(z, tile=args.tile, recompute=True)

    fns = [untiled, exact] + ([recompute] if args.recompute else [])
    times = time_interleaved(fns, device, warmup=args.warmup, repeats=args.repeats)
    report = {"size": args.size, "tile": args.tile, "threads": torch.get_num_threads(), "repeats": args.repeats}
    for fn, t in zip(fns, times):
        report[f"{fn.__name__}_ms"] = t.median_ms
        if fn is not untiled:
            report[f"{fn.__name__}_ratio"] = t.median_ms / times[0].median_ms
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["exactness", "fast", "memory", "capacity", "speed", "child"])
    p.add_argument("--profile", default="fast")
    p.add_argument("--model", default=None, help="exactness, fast, speed: a trained model (folder) instead of random weights")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--width", type=int, default=None, help="exactness: a non-square image (encode then decode)")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--halos", type=int, nargs="+", default=[32, 64])
    p.add_argument("--stats-size", type=int, default=64, help="fast: latent side of the statistics pass")
    p.add_argument("--band", type=int, default=8, help="seam band half-width in pixels")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--extrapolate", type=int, nargs="*", default=[2048, 4096])
    p.add_argument("--budget-gib", type=float, default=8.0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="memory, speed: where to decode (CUDA memory: max allocated); capacity: whose untiled layout to estimate")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--recompute", action="store_true", help="speed: also time the exact decode with recompute")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=["untiled", "exact", "recompute"], default="exact")
    p.add_argument("--modes", nargs="+", choices=["untiled", "exact", "recompute"], default=["untiled", "exact", "recompute"],
                   help="memory: the decodes to measure, each in its own process")
    args = p.parse_args()
    print(json.dumps(globals()[f"cmd_{args.what}"](args)))


if __name__ == "__main__":
    main()
