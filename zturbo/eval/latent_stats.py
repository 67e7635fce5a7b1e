"""Latent statistics of a model over a folder of images, and the normalisation they imply.

Per latent channel: mean and standard deviation of the posterior mean over every
latent position of every image. Over all channels together: the mean (the implied
``shift_factor``) and the standard deviation around it (``scaling_factor`` is its
inverse), the convention of FLUX.1's and SD3's VAEs: a diffusion model sees
``(z - shift_factor) * scaling_factor``, of unit variance over the data.

A FLUX.2-layout model (``AutoencoderKLFlux2``) normalises differently: its pipelines
patchify the latent (2x2 by default, ``C * 4`` channels) and standardise each patchified
channel by its BatchNorm's running statistics, ``(z - running_mean) / sqrt(running_var +
eps)``. For such a model the statistics also include, per patchified channel, the mean
and the variance (unbiased, as ``nn.BatchNorm2d`` keeps ``running_var``), and ``--write``
stores them there, in ``bn.running_mean`` / ``bn.running_var`` of the weights file: the
place diffusers' AutoencoderKLFlux2 and its pipelines read them from. Its config.json
(which that class has no factors in) is left as it is.

Sums are kept in float64, so a large data set loses nothing to accumulation.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from zturbo.artifacts import TORCH_KINDS, require
from zturbo.errors import UsageError
from zturbo.eval.data import find_images, iter_batches
from zturbo.model.diffusers import CONFIG_NAME, config_from_diffusers, read_config, update_weights
from zturbo.model.vae import patchify_latents
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
    # FLUX.2 layout only: per patchified channel, what its BatchNorm normaliser (bn) holds.
    bn_running_mean: list[float] | None = None
    bn_running_var: list[float] | None = None

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

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel: the mean and the (population) variance."""
        mean = self.sum / self.n
        return mean, (self.sq / self.n - mean.pow(2)).clamp_min(0)


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
    patch = vae.config.patch_size
    if patch is not None and (size // f) % math.lcm(*patch):
        raise UsageError(f"--size {size} must be a multiple of {f * math.lcm(*patch)}: the model's latents are "
                         f"patchified {patch[0]}x{patch[1]} at 1/{f} scale")
    images = find_images(data, max_images)
    moments = _Moments(vae.config.latent_channels)
    patched = _Moments(vae.config.latent_channels * math.prod(patch)) if patch is not None else None
    count = 0
    with torch.inference_mode():
        for batch in iter_batches(images, size, batch_size, max_pixels):
            x = batch.pixels.to(device).float().div_(127.5).sub_(1.0)
            z = vae.encode(x).mean
            moments.add(z)
            if patched is not None:
                patched.add(patchify_latents(z, patch))
            count += len(batch.names)
    if count == 0:
        raise UsageError(f"no readable images in {data}")
    mean, var = moments.mean_var()
    bn = {}
    if patched is not None:
        bn_mean, bn_var = patched.mean_var()
        bn_var = bn_var * patched.n / max(patched.n - 1, 1)  # unbiased, as BatchNorm2d's running_var
        bn = {"bn_running_mean": [float(v) for v in bn_mean], "bn_running_var": [float(v) for v in bn_var]}
    overall_mean = float(moments.sum.sum() / (moments.n * mean.numel()))
    overall_var = float(moments.sq.sum() / (moments.n * mean.numel())) - overall_mean**2
    return LatentStats(
        model=str(artifact.source),
        images=count,
        positions=moments.n,
        latents_mean=[float(v) for v in mean],
        latents_std=[float(v) for v in var.sqrt()],
        shift_factor=overall_mean,
        scaling_factor=1.0 / math.sqrt(max(overall_var, 1e-24)),
        **bn,
    )


def write_latent_stats(stats: LatentStats) -> Path:
    """Store the statistics in the model folder, atomically; returns the file written.

    AutoencoderKL layout: the four values in config.json (the weights are untouched).
    FLUX.2 layout: the BatchNorm statistics in the weights file (config.json is untouched).
    """
    folder = Path(stats.model)
    if folder.is_file():
        raise UsageError(f"--write stores the statistics in a model folder; {folder} is a single file",
                         f"import it first: zturbo import {folder} --out MODEL_DIR")
    data = read_config(folder)
    if config_from_diffusers(data).patch_size is not None:
        if stats.bn_running_mean is None or stats.bn_running_var is None:
            raise UsageError("these statistics have no BatchNorm (patchified) part for a FLUX.2-layout model",
                             "compute them with zturbo eval MODEL --latent-stats")
        return update_weights(folder, {
            "bn.running_mean": torch.tensor(stats.bn_running_mean, dtype=torch.float64),
            "bn.running_var": torch.tensor(stats.bn_running_var, dtype=torch.float64),
        })
    data = {
        **data, "latents_mean": stats.latents_mean, "latents_std": stats.latents_std,
        "shift_factor": stats.shift_factor, "scaling_factor": stats.scaling_factor,
    }
    config_from_diffusers(data)  # validates: a bad value never reaches the file
    path = folder / CONFIG_NAME
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path
