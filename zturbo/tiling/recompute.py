"""Exact tiled decode that recomputes instead of storing, for the least memory.

``exact.py`` keeps, for each resnet, its input and its first convolution's output as whole
maps, and materialises every upsampled map: at the decoder's full resolution that is several
maps of the largest size. Here, where a layer's stored maps would exceed the plan's floor:

- a resnet keeps only its input. One pass over tiles computes ``conv1(silu(norm1(x)))`` for
  the moments of ``norm2`` and discards it; the output pass recomputes it on each tile with a
  one-pixel halo (reading the input with a two-pixel halo), then applies ``norm2``, SiLU and
  ``conv2`` and adds the shortcut;
- an upsample (nearest x2 + 3x3 conv) is never stored: the next resnet reads it through
  ``Upsampled``, which computes any region from the stored low-resolution map (per phase, by
  ``maps.upsample_region``), so its input costs a quarter of the pixels.

The result is the same arithmetic as ``exact.py`` on the same tiles, so it equals the untiled
decode to within float rounding. The price is compute: each recomputing resnet runs ``conv1``
twice, and a fused upsample runs three times (for ``norm1``'s moments, ``norm2``'s, and the
output). ``recompute_plan`` chooses the layers: the floor is the largest map any layer needs
with everything recomputed, and a layer recomputes only if storing would exceed that floor,
so the peak is the floor's while the extra compute stays at the largest maps. Fast profile:
the full-resolution resnets, the first resnet of the level below and the last upsample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zturbo.model.blocks import ResnetBlock2D, Upsample2D, subpixel_weight
from zturbo.model.plan import Layer
from zturbo.tiling.exact import Runner, decode_exact
from zturbo.tiling.maps import Moments, Norm, TiledMap, upsample_region


@dataclass(frozen=True)
class RecomputePlan:
    recompute: frozenset[str]  # ResNets (layer names) that recompute conv1 instead of storing it
    fused: frozenset[str]  # upsamples computed on demand by the ResNet after them, never stored


def recompute_plan(plan: Sequence[Layer]) -> RecomputePlan:
    """Recompute where storing would exceed the least peak recomputing can reach (see the module doc).

    Units are channels x pixels, with the coder input's pixel count 1 (a layer at resolution r has r^2).
    A recomputing resnet holds its input (a quarter of the pixels when fed by a fused upsample) and
    its growing output, which replaces the input row by row: about the larger of the two. A stored
    resnet holds its input and conv1's output; a stored upsample its output, 4 c pixels per input pixel.
    Only an upsample followed by a ResNet can be fused (the ResNet reads it region by region).
    """
    fusable = {up.name for up, nxt in zip(plan, plan[1:]) if up.kind == "upsample" and nxt.kind == "resnet"}
    after_fusable = {nxt.name for up, nxt in zip(plan, plan[1:]) if up.name in fusable}
    pixels = {layer.name: float(layer.resolution**2) for layer in plan}

    def lean(layer: Layer) -> float:
        p = pixels[layer.name]
        return max(layer.cin * p / (4 if layer.name in after_fusable else 1), layer.cout * p)

    floor = max((lean(layer) for layer in plan if layer.kind == "resnet"), default=0.0)
    fused = frozenset(up.name for up in plan if up.name in fusable and 4 * up.cout * pixels[up.name] > floor)
    fed = {nxt.name for up, nxt in zip(plan, plan[1:]) if up.name in fused}
    recompute = frozenset(layer.name for layer in plan if layer.kind == "resnet" and (
        layer.name in fed or (layer.cin + layer.cout) * pixels[layer.name] > floor))
    return RecomputePlan(recompute, fused)


def zero_outside(t: torch.Tensor, y0: int, x0: int, height: int, width: int) -> None:
    """Zero the rows and columns of ``t`` (whose top-left is map pixel (y0, x0)) that lie outside the map."""
    h, w = t.shape[-2:]
    t[:, :, : max(0, min(h, -y0))].zero_()
    t[:, :, max(0, height - y0) :].zero_()
    t[:, :, :, : max(0, min(w, -x0))].zero_()
    t[:, :, :, max(0, width - x0) :].zero_()


def normalise_(t: torch.Tensor, norm: Norm, y0: int, x0: int, height: int, width: int) -> None:
    """GroupNorm (+SiLU) in place on the part of ``t`` inside the map; the rest stays as it is (zero)."""
    inside = t[:, :, max(0, -y0) : max(0, height - y0), max(0, -x0) : max(0, width - x0)]
    torch.addcmul(norm[1], inside, norm[0], out=inside)
    if norm[2]:
        F.silu(inside, inplace=True)


class Upsampled:
    """Nearest x2 + 3x3 conv of a stored map, computed region by region and never stored."""

    def __init__(self, run: Runner, up: Upsample2D, src: TiledMap):
        self.run, self.src = run, src
        self.folded = subpixel_weight(up.conv.weight)
        self.bias4 = None if up.conv.bias is None else up.conv.bias.repeat(4)
        self.grid = src.grid.mapped(lambda b: 2 * b)
        self.batch, self.channels, self.dtype = src.batch, up.conv.out_channels, src.dtype
        self.moments: Moments | None = None

    def raw(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """Rows [y0, y1) and columns [x0, x1) of the upsampled map, zero outside it."""
        i0, i1, j0, j1 = y0 // 2, -(-y1 // 2), x0 // 2, -(-x1 // 2)
        region = self.src.region(i0 - 1, i1 + 1, j0 - 1, j1 + 1, self.run.device)
        out = upsample_region(region, self.folded, self.bias4, self.channels)
        out = out[:, :, y0 - 2 * i0 : y1 - 2 * i0, x0 - 2 * j0 : x1 - 2 * j0]
        zero_outside(out, y0, x0, self.grid.rows[-1], self.grid.cols[-1])
        return out

    def release_rows_before(self, y: int) -> None:
        self.src.release_rows_before(y // 2 - 1)  # raw() of rows >= y reads source rows >= y // 2 - 1


Source = TiledMap | Upsampled


def raw(x: Source, y0: int, y1: int, x0: int, x1: int, device: torch.device) -> torch.Tensor:
    return x.raw(y0, y1, x0, x1) if isinstance(x, Upsampled) else x.region(y0, y1, x0, x1, device)


def moments_of(x: Source, device: torch.device) -> Moments:
    if isinstance(x, TiledMap):
        return x.stats(device)
    if x.moments is None:
        x.moments = Moments()
        for y0, y1, x0, x1 in x.grid.tiles():
            x.moments.add(x.raw(y0, y1, x0, x1))
    return x.moments


def resnet_recompute(run: Runner, block: ResnetBlock2D, x: Source) -> TiledMap:
    """A resnet that stores only its input: conv1's output is computed twice, never kept."""
    height, width = x.grid.rows[-1], x.grid.cols[-1]
    norm1 = moments_of(x, run.device).norm(block.norm1, silu=True)

    def first(y0: int, y1: int, x0: int, x1: int, halo: int) -> tuple[torch.Tensor, torch.Tensor]:
        """conv1's output over the tile grown by ``halo``, and the raw input tile (the shortcut's)."""
        g = halo + 1
        xr = raw(x, y0 - g, y1 + g, x0 - g, x1 + g, run.device)
        skip = xr[:, :, g : g + y1 - y0, g : g + x1 - x0].clone()
        normalise_(xr, norm1, y0 - g, x0 - g, height, width)
        return F.conv2d(xr, block.conv1.weight, block.conv1.bias), skip

    moments = Moments()
    for y0, y1, x0, x1 in x.grid.tiles():
        moments.add(first(y0, y1, x0, x1, 0)[0])
    norm2 = moments.norm(block.norm2, silu=True)

    def tile(r: int, c: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        h, skip = first(y0, y1, x0, x1, 1)
        normalise_(h, norm2, y0 - 1, x0 - 1, height, width)
        zero_outside(h, y0 - 1, x0 - 1, height, width)  # conv2 pads with zeros after the norm
        out = F.conv2d(h, block.conv2.weight, block.conv2.bias)
        return out.add_(skip if block.conv_shortcut is None else block.conv_shortcut(skip))

    return run.produce(x.grid, tile, release=[(x, lambda y: y - 2)])


def decode_recompute(vae: nn.Module, z: torch.Tensor, tile: int, offload: bool = False) -> torch.Tensor:
    """``exact.decode_exact``'s result with ``recompute_plan``'s layers recomputed instead of stored."""
    plan = recompute_plan(vae.decoder.plan())

    def layer(run: Runner, item: Layer, x: Source) -> Source:
        if item.name in plan.fused:
            return Upsampled(run, item.module, x)
        if item.name in plan.recompute:
            return resnet_recompute(run, item.module, x)
        return run.layer(item, x)

    return decode_exact(vae, z, tile, offload, layer)
