"""FLOP counting with torch's own counter (no hand estimates).

Counts run on the meta device, so even 2048 px standard-VAE passes cost no
memory or time. A multiply-add counts as 2 FLOPs (torch's convention).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from zturbo.model.config import ModelConfig
from zturbo.model.kernels import Kernels
from zturbo.model.vae import VAE


def count_flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def meta_vae(config: ModelConfig, kernels: Kernels | None = None) -> VAE:
    """The model on the meta device (shapes, no memory), computing with ``kernels`` (default: the defaults)."""
    with torch.device("meta"):
        vae = VAE(config)
    if kernels is not None:
        vae.set_kernels(**kernels.as_dict())
    return vae


def vae_flops(config: ModelConfig, resolution: int, batch: int = 1, kernels: Kernels | None = None) -> dict[str, int]:
    """FLOPs of encode (to the posterior) and decode for one batch at ``resolution``, computed with ``kernels``."""
    vae = meta_vae(config, kernels).eval()
    with torch.device("meta"):
        x = torch.empty(batch, config.in_channels, resolution, resolution)
        lat = resolution // config.downsample_factor
        z = torch.empty(batch, config.latent_channels, lat, lat)
    with torch.no_grad():
        encode = count_flops(lambda t: vae.encode(t).mean, x)
        decode = count_flops(vae.decode, z)
    return {"encode": encode, "decode": decode}


def parameter_count(config: ModelConfig) -> int:
    with torch.device("meta"):
        vae = VAE(config)
    return sum(p.numel() for p in vae.parameters())
