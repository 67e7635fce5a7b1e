"""A zturbo VAE as a diffusers pipeline's ``vae``, for models no diffusers class can hold.

A decoder distilled into FLUX.1's, Z-Image's or SD3's latent space has other widths
than its encoder, which diffusers' AutoencoderKL cannot express. This adapter gives
pipelines what they use of their VAE (read from FluxPipeline, FluxImg2ImgPipeline,
StableDiffusion3Pipeline, ZImagePipeline and the Flux2 pipelines)::

    vae.config.scaling_factor / shift_factor / block_out_channels / latent_channels
    vae.config.latents_mean / latents_std / force_upcast (and batch_norm_eps, vae.bn for FLUX.2)
    vae.dtype, vae.device, vae.to(...)
    vae.decode(z, return_dict=False)[0]   and   vae.decode(z).sample
    vae.encode(x).latent_dist.sample(generator) / .mode() / .mean

    >>> from zturbo.adapters import DiffusersVAE
    >>> pipe.vae = DiffusersVAE.from_pretrained("runs/flux-decoder-fast/final", torch_dtype=torch.bfloat16)

``block_out_channels`` is the encoder's: pipelines read only its length, for the
latent-to-pixel factor, which the decoder shares.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zturbo.model import VAE, load_pretrained
from zturbo.model.diffusers import config_to_diffusers
from zturbo.model.errors import UsageError


class PipelineConfig(dict):
    """A read-only mapping with attribute access, as diffusers' FrozenDict."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setitem__(self, key, value):
        raise TypeError("the VAE's config is read-only")


class Posterior:
    """diffusers' DiagonalGaussianDistribution interface over a zturbo posterior."""

    def __init__(self, posterior):
        self.mean, self.logvar, self.std, self.var = posterior.mean, posterior.logvar, posterior.std, posterior.var

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        shape = self.mean.shape
        if isinstance(generator, list):  # one generator per batch element, as diffusers allows
            noise = torch.cat([_randn((1, *shape[1:]), g) for g in generator])
        else:
            noise = _randn(shape, generator)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


def _randn(shape, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


@dataclass
class EncoderOutput:
    latent_dist: Posterior


@dataclass
class DecoderOutput:
    sample: torch.Tensor


class DiffusersVAE(nn.Module):
    """Wraps a zturbo ``VAE`` with diffusers' AutoencoderKL calling conventions."""

    def __init__(self, vae: VAE):
        super().__init__()
        if not isinstance(vae, VAE):
            raise UsageError("DiffusersVAE wraps AutoencoderKL-family models; a tiny model is diffusers' own "
                             "AutoencoderTiny", "pipe.vae = AutoencoderTiny.from_pretrained(PATH) (export --format "
                             "diffusers writes one)")
        self.vae = vae
        self.config = PipelineConfig(config_to_diffusers(vae.config))

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> DiffusersVAE:
        vae = load_pretrained(path, map_location=device)
        return cls(vae.to(torch_dtype) if torch_dtype is not None else vae).eval()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def bn(self) -> nn.BatchNorm2d:
        """FLUX.2's latent normaliser (its pipelines read the running statistics)."""
        if not hasattr(self.vae, "bn"):
            raise AttributeError("bn: this model has no FLUX.2 latent normaliser")
        return self.vae.bn

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        posterior = Posterior(self.vae.encode(x))
        return EncoderOutput(posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        image = self.vae.decode(z)
        return DecoderOutput(image) if return_dict else (image,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True, generator=None):
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
