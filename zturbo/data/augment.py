"""Training augmentations beyond crop and flip: zoom and colour.

A dataset of a few photos shown whole at the training size teaches a model those few
views and those few colours. Two augmentations widen that without more photos:

- **zoom**: the photo's shorter side is resized to ``size * s`` before the crop, with
  ``s`` drawn log-uniformly from [1, ``max_zoom``] and capped where the photo runs out of
  pixels (never enlarged past its own resolution), so crops show the photo's detail at
  several scales as well as the whole view.
- **colour**: with probability ``hue_probability`` the crop's chroma (Cb, Cr of JPEG's
  full-range YCbCr) is rotated by a uniform angle and scaled by a saturation factor drawn
  log-uniformly from [1/``saturation``, ``saturation``]; with probability
  ``grey_probability`` its chroma is removed. Luma is kept, so brightness and structure are
  unchanged while the model meets hues and grey photos it was not given.

Every draw comes from the sample's own generator (``augment_seed``): the zoom before the
crop, the colour after the flip, each only when it is on, so runs without them see exactly the
stream they saw before and a resumed run sees what an uninterrupted one did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zturbo.data.images import CHROMA_MATRIX

# Full-range YCbCr (BT.601, JPEG's): luma weights; chroma back to RGB.
LUMA = (0.299, 0.587, 0.114)
CHROMA_TO_RGB = ((0.0, 1.402), (-0.344136, -0.714136), (1.772, 0.0))


@dataclass(frozen=True)
class Augment:
    max_zoom: float = 1.0
    hue_probability: float = 0.0
    grey_probability: float = 0.0
    saturation: float = 1.5

    @property
    def colour(self) -> bool:
        return self.hue_probability > 0 or self.grey_probability > 0

    @property
    def active(self) -> bool:
        return self.max_zoom > 1.0 or self.colour

    def zoomed_side(self, size: int, shorter_side: int, generator: torch.Generator | None) -> int:
        """The shorter side to resize to before cropping ``size``: ``size`` without zoom."""
        if self.max_zoom <= 1.0 or generator is None:
            return size
        s = math.exp(float(torch.rand((), generator=generator)) * math.log(self.max_zoom))
        return max(size, min(round(size * s), shorter_side))

    def colour_transform(self, generator: torch.Generator | None) -> torch.Tensor | None:
        """The 2x2 map applied to (Cb, Cr), or None to leave the colours alone."""
        if not self.colour or generator is None:
            return None
        u_grey, u_hue, u_angle, u_sat = torch.rand(4, generator=generator).tolist()
        if u_grey < self.grey_probability:
            return torch.zeros(2, 2)
        if u_hue >= self.hue_probability:
            return None
        angle = 2 * math.pi * u_angle
        scale = math.exp((2 * u_sat - 1) * math.log(self.saturation))
        c, s = math.cos(angle) * scale, math.sin(angle) * scale
        return torch.tensor([[c, -s], [s, c]])


def apply_chroma_map(pixels: torch.Tensor, chroma_map: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB (uint8 0..255, or float in [-1, 1]) with its chroma replaced by ``chroma_map @ chroma``;
    luma kept, the result clamped to the input's range and dtype."""
    uint8 = pixels.dtype == torch.uint8
    x = pixels.float()
    luma = torch.einsum("c,chw->hw", torch.tensor(LUMA), x)
    chroma = torch.einsum("kc,chw->khw", torch.tensor(CHROMA_MATRIX), x)
    chroma = torch.einsum("jk,khw->jhw", chroma_map.float(), chroma)
    rgb = luma.unsqueeze(0) + torch.einsum("ck,khw->chw", torch.tensor(CHROMA_TO_RGB), chroma)
    if uint8:
        return rgb.round_().clamp_(0, 255).to(torch.uint8)
    return rgb.clamp_(-1, 1).to(pixels.dtype)
