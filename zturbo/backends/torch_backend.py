"""PyTorch backends: eager, and torch.compile'd."""

from __future__ import annotations

import torch

from zturbo.backends.base import Backend
from zturbo.utils import resolve_device, resolve_dtype


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, vae, device: torch.device, dtype: torch.dtype, channels_last: bool = False):
        self.device = device
        self.dtype = dtype
        self.channels_last = channels_last
        vae = vae.to(device=device, dtype=dtype).eval()
        if channels_last:
            vae = vae.to(memory_format=torch.channels_last)
        for p in vae.parameters():
            p.requires_grad_(False)
        self.vae = vae
        self.latent_channels = vae.config.latent_channels
        self.downsample_factor = vae.config.downsample_factor

    @classmethod
    def load(
        cls,
        model,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        channels_last: bool = False,
        **_,
    ):
        from zturbo.model import VAE, load_vae

        dev = device if isinstance(device, torch.device) else resolve_device(device)
        vae = model if isinstance(model, VAE) else load_vae(model)
        return cls(vae, dev, resolve_dtype(precision), channels_last=channels_last)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(self._prep(images)).mean

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self._prep(latents))


class CompiledTorchBackend(TorchBackend):
    """torch.compile'd encoder and decoder (dynamic shapes off: one graph per input shape)."""

    name = "compile"

    def __init__(self, vae, device, dtype, channels_last: bool = False, mode: str | None = None):
        super().__init__(vae, device, dtype, channels_last)
        self._encode = torch.compile(lambda x: self.vae.encode(x).mean, mode=mode, dynamic=False)
        self._decode = torch.compile(self.vae.decode, mode=mode, dynamic=False)

    @classmethod
    def load(
        cls, model, device="auto", precision="fp32", channels_last: bool = False, mode: str | None = None, **_
    ):
        base = TorchBackend.load(model, device=device, precision=precision)
        return cls(base.vae, base.device, base.dtype, channels_last=channels_last, mode=mode)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode(self._prep(images))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode(self._prep(latents))
