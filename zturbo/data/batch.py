"""What one training step passes along: the batch from the loader, and what a forward makes of it.

``TrainBatch`` goes from the loader's collate function to the loss unchanged in kind: the
images (pixels, or still-encoded JPEGs for the device to decode) and, when a decoder is
distilled from stored latents, the teacher's latents of the same crops. ``ForwardResult``
is what every training forward returns, the plain VAE's and distillation's alike: the
reconstruction, the posterior the KL term reads, and any loss and logged terms the forward
adds. Both live here, below distillation and training, because both of those use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from zturbo.data.jpeg_device import EncodedBatch


@dataclass
class TrainBatch:
    """Images (B, 3, S, S): uint8 or float in [-1, 1], or an ``EncodedBatch``; optional latents (B, C, S/f, S/f)."""

    images: torch.Tensor | EncodedBatch
    latents: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)

    def pin_memory(self) -> TrainBatch:
        """What the DataLoader calls with ``pin_memory=True``."""
        latents = None if self.latents is None else self.latents.pin_memory()
        return TrainBatch(self.images.pin_memory(), latents)

    def split(self, size: int) -> list[TrainBatch]:
        """Micro-batches of ``size`` (the last may be smaller); images must be a tensor by now."""
        images = self.images.split(size)
        latents = self.latents.split(size) if self.latents is not None else [None] * len(images)
        return [TrainBatch(i, z) for i, z in zip(images, latents)]

    def to(self, device: torch.device, channels_last: bool = False) -> TrainBatch:
        images = self.images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        latents = None if self.latents is None else self.latents.to(device, non_blocking=True)
        return replace(self, images=images, latents=latents)


@dataclass
class ForwardResult:
    """One micro-batch's forward: ``recon`` and the posterior (``mean``, ``logvar``) the profile's losses read;
    ``extra_loss`` (None: nothing) is added to them, ``terms`` are logged beside them."""

    recon: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor
    extra_loss: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
