"""Exact tiled decode that recomputes instead of storing, for the least memory.

``tiled.py`` keeps, for each resnet, its input and its first convolution's output as whole
maps, and materialises every upsampled map: at the decoder's full resolution that is several
maps of the largest size. Here, where a layer's stored maps would exceed the plan's floor:

- a resnet keeps only its input. One pass over tiles computes ``conv1(silu(norm1(x)))`` for
  the moments of ``norm2`` and discards it; the output pass recomputes it on each tile with a
  one-pixel halo (reading the input with a two-pixel halo), then applies ``norm2``, SiLU and
  ``conv2`` and adds the shortcut;
- an upsample (nearest x2 + 3x3 conv) is never stored: the next resnet reads it through
  ``Upsampled``, which computes any region from the stored low-resolution map (per phase, by
  ``tiled.upsample_region``), so its input costs a quarter of the pixels.

The result is the same arithmetic as ``tiled.py`` on the same tiles, so it equals the untiled
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
from zturbo.model.tiled import Grid, Moments, Norm, Runner, TiledMap, decode_exact, upsample_region


@dataclass(frozen=True)
class Level:
    """One decoder resolution level: its resnets' (in, out) channels and the channels it upsamples."""

    resnets: tuple[tuple[int, int], ...]
    upsample: int | None


@dataclass(frozen=True)
class RecomputePlan:
    resnets: tuple[tuple[bool, ...], ...]  # [level][resnet]: recompute conv1 instead of storing it
    fused: tuple[bool, ...]  # [level]: its upsample is computed on demand by the next level's first resnet


def levels_of(channels: Sequence[int], layers_per_block: int) -> list[Level]:
    """The decoder's levels from its block widths (encoder order, as ``ModelConfig`` gives them)."""
    ch = list(channels)[::-1]
    levels, prev = [], ch[0]
    for i, c in enumerate(ch):
        resnets = tuple((prev if j == 0 else c, c) for j in range(layers_per_block + 1))
        levels.append(Level(resnets, c if i < len(ch) - 1 else None))
        prev = c
    return levels


def recompute_plan(levels: Sequence[Level]) -> RecomputePlan:
    """Recompute where storing would exceed the least peak recomputing can reach (see the module doc).

    Units are channels x pixels, with the latent's pixel count 1 (level ``i`` has ``4**i``). A
    recomputing resnet holds its input (a quarter of the pixels when fed by a fused upsample) and
    its growing output, which replaces the input row by row: about the larger of the two. A stored
    resnet holds its input and conv1's output; a stored upsample its output, 4 c pixels per input pixel.
    """
    def lean(i: int, cin: int, cout: int, fused_in: bool) -> float:
        p = 4**i
        return max(cin * p / (4 if fused_in else 1), cout * p)

    floor = max(lean(i, cin, cout, j == 0 and i > 0)
                for i, level in enumerate(levels) for j, (cin, cout) in enumerate(level.resnets))
    fused = tuple(level.upsample is not None and 4 * level.upsample * 4**i > floor for i, level in enumerate(levels))
    resnets = tuple(
        tuple((j == 0 and i > 0 and fused[i - 1]) or (cin + cout) * 4**i > floor for j, (cin, cout) in enumerate(level.resnets))
        for i, level in enumerate(levels))
    return RecomputePlan(resnets, fused)


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


def tiles(grid: Grid):
    for r in range(len(grid.rows) - 1):
        for c in range(len(grid.cols) - 1):
            yield grid.rows[r], grid.rows[r + 1], grid.cols[c], grid.cols[c + 1]


def moments_of(x: Source, device: torch.device) -> Moments:
    if x.moments is None:
        x.moments = Moments()
        for y0, y1, x0, x1 in tiles(x.grid):
            x.moments.add(raw(x, y0, y1, x0, x1, device))
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
    for y0, y1, x0, x1 in tiles(x.grid):
        moments.add(first(y0, y1, x0, x1, 0)[0])
    norm2 = moments.norm(block.norm2, silu=True)

    def tile(r: int, c: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        h, skip = first(y0, y1, x0, x1, 1)
        normalise_(h, norm2, y0 - 1, x0 - 1, height, width)
        zero_outside(h, y0 - 1, x0 - 1, height, width)  # conv2 pads with zeros after the norm
        out = F.conv2d(h, block.conv2.weight, block.conv2.bias)
        return out.add_(skip if block.conv_shortcut is None else block.conv_shortcut(skip))

    return run.produce(x.grid, tile, release=[(x, lambda y: y - 2)])


def decoder_levels(dec: nn.Module) -> list[Level]:
    return [Level(tuple((r.conv1.in_channels, r.conv1.out_channels) for r in block.resnets),
                  None if block.upsamplers is None else block.upsamplers[0].conv.out_channels)
            for block in dec.up_blocks]


def decode_recompute(vae: nn.Module, z: torch.Tensor, tile: int, offload: bool = False) -> torch.Tensor:
    """``tiled.decode_exact``'s result with ``recompute_plan``'s layers recomputed instead of stored."""
    plan = recompute_plan(decoder_levels(vae.decoder))

    def layer(run: Runner, level: int, index: int, module: nn.Module, x: Source) -> Source:
        if index < 0:
            return Upsampled(run, module, x) if plan.fused[level] else run.upsample(module, x)
        return resnet_recompute(run, module, x) if plan.resnets[level][index] else run.resnet(module, x)

    return decode_exact(vae, z, tile, offload, layer)
