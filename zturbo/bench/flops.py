"""FLOPs per image (torch's FLOP counter) and the matmul peak MFU is measured against.

FLOPs are counted with torch's own counter (no hand estimates) on the meta device, so
counting a 2048 px standard-VAE pass costs no memory or time.
A multiply-add is 2 FLOPs. Only matrix work is counted (convolutions, linear
layers, attention): normalisation and activations are memory-bound and excluded,
which is what makes achieved TFLOP/s over a measured matmul peak a utilisation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from torch.utils.flop_counter import FlopCounterMode

from zturbo.bench.timing import time_interleaved
from zturbo.model import ModelConfig
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



def flops_per_image(config: ModelConfig, resolution: int, kernels: Kernels | None = None) -> dict[str, int]:
    """{'encode': ..., 'decode': ..., 'train': ...} FLOPs for one image at ``resolution``, computed with
    ``kernels`` (the model's choice of upsampling and attention; default: the defaults).

    ``train`` is one forward (encode + decode) and backward pass of the VAE alone:
    the perceptual network and the discriminator are not counted.
    """
    counts = vae_flops(config, resolution, batch=1, kernels=kernels)
    counts["train"] = vae_train_flops(config, resolution, kernels)
    return counts


def vae_train_flops(config: ModelConfig, resolution: int, kernels: Kernels | None = None) -> int:
    vae = meta_vae(config, kernels).train()
    with torch.device("meta"):
        x = torch.empty(1, config.in_channels, resolution, resolution)

    def step(images: torch.Tensor) -> None:
        out = vae(images)
        out.float().abs().mean().backward()

    return count_flops(step, x)


def module_flops(build: Callable[[], torch.nn.Module], call: Callable[[Any, torch.Tensor], Any], shape) -> int:
    """FLOPs of ``call(module, input)`` for a module built on the meta device (e.g. diffusers')."""
    with torch.device("meta"):
        module = build().eval()
        x = torch.empty(*shape)
    with torch.no_grad():
        return count_flops(lambda t: call(module, t), x)


@dataclass
class MatmulPeak:
    """The achieved rate of a large square matmul, measured on this device in this run."""

    tflops: float
    dtype: str
    size: int
    median_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"tflops": self.tflops, "dtype": self.dtype, "size": self.size, "median_ms": self.median_ms}


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> MatmulPeak:
    """Median rate of ``size``^3 matmuls on random data (zeros would run faster than real inputs)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    out = torch.empty(size, size, device=device, dtype=dtype)
    (timing,) = time_interleaved([lambda: torch.mm(a, b, out=out)], device, warmup=3, repeats=repeats)
    flops = 2.0 * size**3
    return MatmulPeak(
        tflops=flops / (timing.median_ms / 1000.0) / 1e12,
        dtype=str(dtype).removeprefix("torch."),
        size=size,
        median_ms=timing.median_ms,
    )
