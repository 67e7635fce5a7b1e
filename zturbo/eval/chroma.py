"""Local colour outliers: colours a reconstruction shows that the photo has nowhere near.

PSNR averages over the whole image, so a few coloured spots (a green blob on a grey
photo, a ringed droplet) move it by a fraction of a decibel while being the first thing
a viewer sees. ``chroma_outlier`` scores the worst such spot:

1. chroma: the Cb and Cr planes of full-range YCbCr (JPEG's BT.601 matrix), in 8-bit
   levels. Both are linear in RGB, so any blend of the photo's colours (a blur, a soft
   edge) has a chroma between theirs.
2. the reconstruction's chroma averaged over each 5x5 window (one stray pixel is no blob);
3. the range the photo's chroma spans near that window: the per-plane minimum and maximum
   of the photo's own 5x5 averages within ``reach`` pixels (9x9 window centres by default);
4. how far the reconstruction's window lies outside that range (Euclidean over Cb, Cr;
   0 inside), and the largest such distance over the image.

A reconstruction that only blurs or shifts the photo by up to ``reach`` pixels scores 0;
on a grey photo the score is the strongest 5x5 patch of colour the model invented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zturbo.data.images import chroma_planes as chroma

OUTLIER_WINDOW = 5
OUTLIER_REACH = 4


def chroma_outlier_map(
    reconstruction: torch.Tensor, original: torch.Tensor, window: int = OUTLIER_WINDOW, reach: int = OUTLIER_REACH
) -> torch.Tensor:
    """(B, H - window + 1, W - window + 1): per 5x5 window, how far (in chroma levels) the
    reconstruction's mean colour lies outside what the photo shows within ``reach`` pixels."""
    rec = F.avg_pool2d(chroma(reconstruction), window, stride=1)
    ref = F.avg_pool2d(chroma(original), window, stride=1)
    span = 2 * reach + 1
    # Padding with -inf keeps the borders' range to the windows that exist.
    high = F.max_pool2d(ref, span, stride=1, padding=reach)
    low = -F.max_pool2d(-ref, span, stride=1, padding=reach)
    outside = (rec - high).clamp(min=0) + (low - rec).clamp(min=0)
    return outside.pow(2).sum(dim=1).sqrt()


def chroma_outlier(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Per-image largest local colour outlier (chroma levels; 0 is none) of 0..255 images (B, 3, H, W)."""
    if min(original.shape[-2:]) < OUTLIER_WINDOW:
        return torch.full((original.shape[0],), float("nan"))
    return chroma_outlier_map(reconstruction, original).flatten(1).amax(dim=1)
