"""Decode one latent across processes, each rank a band of rows (zturbo.tiling.parallel).

    torchrun --standalone --nproc_per_node 2 scripts/decode_parallel.py --profile fast --size 1024x768 --check
    torchrun --standalone --nproc_per_node 4 scripts/decode_parallel.py runs/fast --latent z.safetensors --output big.png

The model is a model or run folder, or seeded random weights of a profile (``--profile``); the
latent a safetensors file holding one (C, H, W) or (B, C, H, W) tensor, or a seeded random one
for an image of ``--size`` HxW. Each rank uses the CUDA device of its LOCAL_RANK (NCCL), or the
CPU (gloo). Rank 0 writes the first image of the batch (``--output``) and, with ``--check``,
prints the largest difference from the single-process ``vae.decode``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from zturbo import VAE, load_vae
from zturbo.config import load_settings
from zturbo.errors import InputError, UsageError, ZTurboError
from zturbo.tiling.parallel import decode_parallel
from zturbo.train.distributed import DistContext, setup, teardown
from zturbo.utils import atomic_path

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_latent(path: str) -> torch.Tensor:
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            if len(keys) != 1:
                raise InputError(f"{path} holds {len(keys)} tensors; give a file with exactly one latent")
            z = f.get_tensor(keys[0])
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the latent {path}: {exc}") from exc
    if z.dim() == 3:
        z = z[None]
    if z.dim() != 4:
        raise InputError(f"the latent in {path} has shape {tuple(z.shape)}; expected (C, H, W) or (B, C, H, W)")
    return z


def random_latent(vae: VAE, size: str) -> torch.Tensor:
    try:
        height, width = (int(v) for v in size.lower().split("x"))
    except ValueError as exc:
        raise UsageError(f"--size {size!r} is not HEIGHTxWIDTH in pixels (e.g. 1024x768)") from exc
    f = vae.config.downsample_factor
    if height % f or width % f or height <= 0 or width <= 0:
        raise UsageError(f"--size {size}: both sides must be positive multiples of the downsampling factor {f}")
    return torch.randn(1, vae.config.latent_channels, height // f, width // f,
                       generator=torch.Generator().manual_seed(0))


def save_png(image: torch.Tensor, path: str) -> None:
    arr = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    with atomic_path(path, suffix=".tmp") as tmp:
        Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="a model or run folder (or use --profile)")
    parser.add_argument("--profile", help="seeded random weights of this profile instead of a model folder")
    parser.add_argument("--latent", help="a safetensors file with one (C, H, W) or (B, C, H, W) latent")
    parser.add_argument("--size", help="a seeded random latent for an image of HEIGHTxWIDTH pixels")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--output", help="PNG for the first decoded image (written by rank 0)")
    parser.add_argument("--check", action="store_true", help="rank 0 compares with the single-process decode")
    args = parser.parse_args(argv)
    if (args.model is None) == (args.profile is None) or (args.latent is None) == (args.size is None):
        raise UsageError("give a model folder or --profile, and --latent or --size")

    ctx = DistContext.from_env(os.environ)
    device = torch.device(f"cuda:{ctx.local_rank}" if torch.cuda.is_available() else "cpu")
    setup(ctx, device)
    try:
        if args.profile:
            torch.manual_seed(0)  # the same weights on every rank
            vae = VAE(load_settings(args.profile).model).eval()
        else:
            vae = load_vae(args.model)
        vae = vae.to(device, DTYPES[args.dtype])
        z = (read_latent(args.latent) if args.latent else random_latent(vae, args.size)).to(device, DTYPES[args.dtype])
        image = decode_parallel(vae, z)
        if ctx.is_main:
            print(f"decoded {tuple(z.shape)} -> {tuple(image.shape)} over {ctx.world_size} rank(s) on {device.type}")
            if args.check:
                with torch.no_grad():
                    ref = vae.decode(z)
                err = (image.float() - ref.float()).abs().max().item()
                print(f"max abs difference from the single-process decode: {err:.3g} "
                      f"(output values up to {ref.float().abs().max().item():.3g})")
            if args.output:
                save_png(image[0], args.output)
                print(f"wrote {args.output}")
    finally:
        teardown()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ZTurboError as exc:
        print(f"error: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""), file=sys.stderr)
        sys.exit(exc.exit_code)
