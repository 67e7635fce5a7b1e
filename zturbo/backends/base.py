"""The Backend interface."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Backend(ABC):
    """Encode images to latents and decode latents to images.

    Tensors in and out live on ``self.device``; images are (B, 3, H, W) in
    [-1, 1] with H and W multiples of ``downsample_factor``; latents are the
    unscaled posterior mean, (B, latent_channels, H / f, W / f).
    """

    name: str = "base"
    device: torch.device
    dtype: torch.dtype
    latent_channels: int
    downsample_factor: int
    # encoder_fingerprint of the model the latents come from, where the backend knows it (None: unknown).
    fingerprint: str | None = None

    @classmethod
    @abstractmethod
    def load(cls, model, **options) -> Backend:
        """Build the backend from a model path (or an in-memory model where supported)."""

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}
