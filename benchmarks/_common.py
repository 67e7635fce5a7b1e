"""What the benchmark scripts share and the zturbo package does not need.

The scripts import zturbo as installed (``pip install -e .``) and this module by its
plain name: Python puts a script's own folder first on ``sys.path``.
"""

from __future__ import annotations

import torch

from zturbo.model import ModelConfig

PARTS = ("decode", "encode")


def model_input(
    config: ModelConfig,
    part: str,
    resolution: int,
    batch: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> torch.Tensor:
    """A seeded random input for one pass: images in [-1, 1] to encode, or latents to decode
    into ``resolution`` x ``resolution`` images."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    generator = torch.Generator().manual_seed(seed)
    if part == "encode":
        x = torch.rand(batch, config.in_channels, resolution, resolution, generator=generator) * 2 - 1
    else:
        side = resolution // config.downsample_factor
        x = torch.randn(batch, config.latent_channels, side, side, generator=generator)
    return x.to(device=device, dtype=dtype)


def profiler_us(event, field: str) -> float:
    """A torch.profiler time in microseconds; newer torch names device times 'device', older 'cuda'."""
    for name in (field, field.replace("device", "cuda")):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0
