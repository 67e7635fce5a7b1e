"""Latent statistics of a model over a folder of images, and the normalisation they imply.

Per latent channel: mean and standard deviation of the posterior mean over every
latent position of every image. Over all channels together: the mean (the implied
``shift_factor``) and the standard deviation around it (``scaling_factor`` is its
inverse), the convention of FLUX.1's and SD3's VAEs: a diffusion model sees
``(z - shift_factor) * scaling_factor``, of unit variance over the data.

Sums are kept in float64, so a large data set loses nothing to accumulation.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from zturbo.errors import UsageError
from zturbo.eval.data import find_images, iter_batches
from zturbo.model.diffusers import CONFIG_NAME, config_from_diffusers, read_config
from zturbo.artifacts import TORCH_KINDS, require
from zturbo.utils import atomic_write_text


@dataclass
class LatentStats:
    model: str
    images: int
    positions: int  # latent pixels per channel
    latents_mean: list[float]
    latents_std: list[float]
    shift_factor: float
    scaling_factor: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Moments:
    def __init__(self, channels: int):
        self.n = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sq = torch.zeros(channels, dtype=torch.float64)

    def add(self, z: torch.Tensor) -> None:
        z = z.double().transpose(0, 1).flatten(1)  # (C, B*h*w)
        self.n += z.shape[1]
        self.sum += z.sum(1).cpu()
        self.sq += z.pow(2).sum(1).cpu()


def latent_statistics(
    model: str | Path, data: str | Path, size: int = 256, batch_size: int = 8, device: str = "cpu",
    max_images: int | None = None, max_pixels: int = 1 << 28,
) -> LatentStats:
    """Statistics of ``model``'s posterior mean over the images under ``data`` (shorter side to ``size``)."""
    artifact = require(model, TORCH_KINDS, "eval --latent-stats")
    vae = artifact.load_vae(map_location=device).float().eval()
    f = vae.config.downsample_factor
    if size % f:
        raise UsageError(f"--size {size} must be a multiple of the model's downsampling factor {f}")
    images = find_images(data, max_images)
    moments = _Moments(vae.config.latent_channels)
    count = 0
    with torch.inference_mode():
        for batch in iter_batches(images, size, batch_size, max_pixels):
            x = batch.pixels.to(device).float().div_(127.5).sub_(1.0)
            moments.add(vae.encode(x).mean)
            count += len(batch.names)
    if count == 0:
        raise UsageError(f"no readable images in {data}")
    mean = moments.sum / moments.n
    var = (moments.sq / moments.n - mean.pow(2)).clamp_min(0)
    overall_mean = float(moments.sum.sum() / (moments.n * mean.numel()))
    overall_var = float(moments.sq.sum() / (moments.n * mean.numel())) - overall_mean**2
    return LatentStats(
        model=str(artifact.model_dir),
        images=count,
        positions=moments.n,
        latents_mean=[float(v) for v in mean],
        latents_std=[float(v) for v in var.sqrt()],
        shift_factor=overall_mean,
        scaling_factor=1.0 / math.sqrt(max(overall_var, 1e-24)),
    )


def write_latent_stats(stats: LatentStats) -> Path:
    """Store the statistics in the model folder's config.json (atomically; the weights are untouched)."""
    folder = Path(stats.model)
    data = read_config(folder)
    if config_from_diffusers(data).patch_size is not None:
        raise UsageError(
            "a FLUX.2-layout model normalises its latents with its BatchNorm statistics (bn), not config factors",
            "the statistics are reported; nothing was written",
        )
    data = {
        **data, "latents_mean": stats.latents_mean, "latents_std": stats.latents_std,
        "shift_factor": stats.shift_factor, "scaling_factor": stats.scaling_factor,
    }
    config_from_diffusers(data)  # validates: a bad value never reaches the file
    path = folder / CONFIG_NAME
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path
