"""The tiny model, photo folder and index readers shared by the serve-batch tests in tests/unit and tests/e2e."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from zturbo.cli import run
from zturbo.model import VAE
from zturbo.serve import load_index

TINY = {"block_out_channels": [32, 32], "layers_per_block": 1, "latent_channels": 4, "mid_block_add_attention": False}


def make_tiny_model(path: Path) -> Path:
    """An untrained tiny VAE (seed 0) saved at ``path``."""
    torch.manual_seed(0)
    VAE(**TINY, sample_size=32).save_pretrained(path)
    return path


def make_photos(root: Path) -> Path:
    """40 small images of three sizes and aspect ratios, PNG and JPEG, in two folders."""
    rng = np.random.default_rng(0)
    for i in range(40):
        w, h = [(32, 32), (48, 32), (24, 40)][i % 3]
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([(xx * 255 // w), (yy * 255 // h), np.full_like(xx, i * 6)], -1).astype(np.uint8)
        arr = np.clip(arr.astype(int) + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(arr).save(sub / f"img{i:03d}.{'png' if i % 4 else 'jpg'}")
    return root


def index_entries(index: dict) -> dict[str, tuple]:
    return {e["source"]: (tuple(e["shape"]), e["width"], e["height"], tuple(e["bucket"])) for e in index["entries"]}


def shard_latents(out: Path) -> dict[str, torch.Tensor]:
    index = load_index(out / "index.json")
    result = {}
    for e in index["entries"]:
        with safe_open(str(out / e["shard"]), framework="pt") as fh:
            result[e["source"]] = fh.get_tensor(e["tensor"])
    return result


def encode_folder(model, src, out, *extra) -> int:
    return run(["serve-batch", "encode", str(model), "--input", str(src), "--output", str(out),
                "--quiet", *extra])
