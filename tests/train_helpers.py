"""The tiny training config, data folder and child-process environment shared by the training tests."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from zturbo.data import demo_images

REPO = Path(__file__).resolve().parents[1]

TINY = """
[model]
block_out_channels = [32, 64]
layers_per_block = 1
latent_channels = 4
mid_block_add_attention = false
sample_size = 32
[data]
image_size = 32
num_workers = 0
val_images = 2
[train]
batch_size = 4
learning_rate = 2e-3
warmup_steps = 2
precision = "fp32"
log_every = 1
sample_every = 1000
checkpoint_every = 1000
keep_last = 5
[loss]
perceptual_weight = 0.0
disc_weight = 0.0
"""


def subprocess_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def write_demo_photos(folder: Path, count: int = 4, size: int = 32) -> Path:
    """The first ``count`` demo photos as ``size`` px square PNGs in a new ``folder``, so decoding costs nothing."""
    folder.mkdir(parents=True)
    for path in demo_images()[:count]:
        with Image.open(path) as im:
            im.convert("RGB").resize((size, size)).save(folder / f"{path.stem}.png")
    return folder


def train_argv(config: Path, data: Path, output: Path, *extra: str) -> list[str]:
    """``zturbo train`` arguments (without the program) for the tiny config on ``data``, into ``output``."""
    return ["train", "--config", str(config), "--data", str(data), "--output", str(output), *extra]
