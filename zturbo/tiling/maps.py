"""The data of tiled computation: a map held as a grid of tiles, its GroupNorm moments, and the
region arithmetic shared by the tiled engines (exact, recompute, fast and patch-parallel).

GroupNorm needs the statistics of the whole image before any tile is normalised. Each tile's
per-channel count, mean and sum of squared deviations (M2) are taken in fp32 as the tile is
produced and merged into running totals with Chan et al.'s parallel update
(``delta = mean_b - mean_a``; ``M2 = M2_a + M2_b + delta^2 n_a n_b / n``). Unlike one running sum
of x and x^2 over ~10^8 elements, this never subtracts two large nearly equal numbers (the
cancellation that loses all digits of the variance when the mean is large next to the spread),
and each tile's M2 comes from a stable reduction over a small tile.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zturbo.model.plan import Layer

Norm = tuple[torch.Tensor, torch.Tensor, bool]  # (scale, shift, silu), scale/shift (B, C, 1, 1) fp32
Q_CHUNK = 1024  # query tokens per attention block (at most one tile's)
K_CHUNK = 1024  # key tokens per attention block: scores are at most Q_CHUNK x K_CHUNK fp32 (4 MiB) per sample


class Moments:
    """Per-sample, per-channel element count, mean and M2 in fp32, merged tile by tile (Chan et al.)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, tile: torch.Tensor) -> None:
        b, c, h, w = tile.shape
        n_b = h * w
        # Per-channel moments by GroupNorm's moments kernel with one channel per group: a stable
        # (Welford, cascaded) one-read reduction, ~3x faster on the CPU than var_mean. Its output is unused.
        acc = torch.promote_types(tile.dtype, torch.float32)  # fp32 at least, never below the input's precision
        _, mean, rstd = torch.native_group_norm(tile.to(acc), None, None, b, c, n_b, c, 0.0)
        mean = mean.view(b, c)
        m2 = rstd.view(b, c).pow(-2) * n_b  # eps 0: rstd = var^-1/2 (inf, giving 0, for a constant channel)
        self.merge(n_b, mean, m2)

    def merge(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Chan et al.'s parallel update with another part's count, mean and M2."""
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta * delta * (self.n * n_b / n)
        self.n = n

    def norm(self, gn: nn.GroupNorm, silu: bool) -> Norm:
        """GroupNorm as one fp32 scale and shift per (sample, channel)."""
        b, c = self.mean.shape
        g = gn.num_groups
        mean_c, m2_c = self.mean.view(b, g, -1), self.m2.view(b, g, -1)
        mean_g = mean_c.mean(-1, keepdim=True)  # equal counts per channel: the plain mean of means
        m2_g = m2_c.sum(-1, keepdim=True) + self.n * (mean_c - mean_g).pow(2).sum(-1, keepdim=True)
        rstd = torch.rsqrt(m2_g / (self.n * (c // g)) + gn.eps)
        scale = rstd.expand(b, g, c // g)
        if gn.affine:
            scale = scale * gn.weight.to(scale.dtype).view(1, g, -1)
        shift = -mean_g * scale
        if gn.affine:
            shift = shift + gn.bias.to(shift.dtype).view(1, g, -1)
        return scale.reshape(b, c, 1, 1), shift.reshape(b, c, 1, 1), silu


@dataclass(frozen=True)
class Grid:
    """Tile boundaries along rows and columns (first 0, last the map's size)."""

    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @classmethod
    def even(cls, height: int, width: int, step: int) -> Grid:
        return cls(tuple(range(0, height, step)) + (height,), tuple(range(0, width, step)) + (width,))

    def mapped(self, fn: Callable[[int], int]) -> Grid:
        """The grid another resolution's tiles use: boundaries mapped by ``fn``, empty tiles dropped."""
        return Grid(tuple(dict.fromkeys(fn(b) for b in self.rows)), tuple(dict.fromkeys(fn(b) for b in self.cols)))

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows) - 1, len(self.cols) - 1

    def tiles(self) -> Iterator[tuple[int, int, int, int]]:
        """(y0, y1, x0, x1) of every tile, in row order."""
        for r in range(len(self.rows) - 1):
            for c in range(len(self.cols) - 1):
                yield self.rows[r], self.rows[r + 1], self.cols[c], self.cols[c + 1]


class TiledMap:
    """A (B, C, H, W) activation held as a grid of tiles, with the moments of its values."""

    def __init__(self, grid: Grid, tiles: list[list[torch.Tensor | None]], moments: Moments | None = None):
        self.grid, self.tiles, self.moments = grid, tiles, moments
        first = tiles[0][0]
        self.batch, self.channels, self.dtype = first.shape[0], first.shape[1], first.dtype

    @classmethod
    def of(cls, x: torch.Tensor, grid: Grid, with_moments: bool = False) -> TiledMap:
        """Views of ``x`` (no copy), with their moments if asked."""
        r, c = grid.rows, grid.cols
        tiles = [[x[:, :, r[i] : r[i + 1], c[j] : c[j + 1]] for j in range(len(c) - 1)] for i in range(len(r) - 1)]
        moments = Moments() if with_moments else None
        for t in (t for row in tiles for t in row if with_moments):
            moments.add(t)
        return cls(grid, tiles, moments)

    def region(self, y0: int, y1: int, x0: int, x1: int, device: torch.device, norm: Norm | None = None) -> torch.Tensor:
        """Rows [y0, y1) and columns [x0, x1), zero outside the map, normalised first if ``norm``."""
        rows, cols = self.grid.rows, self.grid.cols
        iy0, iy1, ix0, ix1 = max(y0, 0), min(y1, rows[-1]), max(x0, 0), min(x1, cols[-1])
        out = torch.empty((self.batch, self.channels, y1 - y0, x1 - x0), dtype=self.dtype, device=device)
        # Zeros only outside the map, as the untiled conv pads (after normalisation).
        out[:, :, : iy0 - y0].zero_()
        out[:, :, iy1 - y0 :].zero_()
        out[:, :, :, : ix0 - x0].zero_()
        out[:, :, :, ix1 - x0 :].zero_()
        for r in range(bisect.bisect_right(rows, iy0) - 1, bisect.bisect_left(rows, iy1)):
            a, b = max(iy0, rows[r]), min(iy1, rows[r + 1])
            for c in range(bisect.bisect_right(cols, ix0) - 1, bisect.bisect_left(cols, ix1)):
                p, q = max(ix0, cols[c]), min(ix1, cols[c + 1])
                src = self.tiles[r][c][:, :, a - rows[r] : b - rows[r], p - cols[c] : q - cols[c]]
                dst = out[:, :, a - y0 : b - y0, p - x0 : q - x0]
                if norm is None or src.device != dst.device:
                    dst.copy_(src, non_blocking=True)
                    if norm is not None:
                        dst.mul_(norm[0]).add_(norm[1])
                else:  # normalised on the way in: one read of the tile, one write
                    torch.addcmul(norm[1], src, norm[0], out=dst)
        if norm is not None and norm[2]:
            F.silu(out[:, :, iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0], inplace=True)
        return out

    @property
    def height(self) -> int:
        return self.grid.rows[-1]

    @property
    def width(self) -> int:
        return self.grid.cols[-1]

    def stats(self, device: torch.device) -> Moments:
        """The map's moments, taken tile by tile the first time they are asked for."""
        if self.moments is None:
            self.moments = Moments()
            for y0, y1, x0, x1 in self.grid.tiles():
                self.moments.add(self.region(y0, y1, x0, x1, device))
        return self.moments

    def release_rows_before(self, y: int) -> None:
        """Drop the tiles that lie wholly above row ``y``."""
        for r in range(len(self.grid.rows) - 1):
            if self.grid.rows[r + 1] <= y:
                self.tiles[r] = [None] * len(self.tiles[r])


TileFn = Callable[[int, int, int, int, int, int], torch.Tensor]  # (r, c, y0, y1, x0, x1) -> tile



def local_window(o0: int, o1: int, size: int, layer: Layer) -> tuple[int, int, int]:
    """The input rows a ``local`` layer reads for its output rows [o0, o1): (first, end, offset).

    The window is grown by the layer's halo and clipped to the map's ``size`` rows, so the layer's own
    zero padding falls exactly on the image's edges, as in the untiled pass; output rows near a clipped
    window's inner edges see padding instead of data and lie outside [o0, o1). The window starts on a
    multiple of the stride (scale 1/2), so the module's output row ``k`` is the map's row ``offset + k``.
    """
    scale = layer.scale
    stride = 1 if scale >= 1 else int(1 / scale)
    first = max(0, math.floor(o0 / scale) - layer.halo)
    first -= first % stride
    end = min(size, math.ceil(o1 / scale) + layer.halo)
    return first, end, int(first * scale)


def upsample_region(region: torch.Tensor, folded: torch.Tensor, bias4: torch.Tensor | None, cout: int) -> torch.Tensor:
    """Nearest x2 + 3x3 conv of source rows and columns [1, n - 1) of ``region`` (which carries a
    one-pixel halo), by ``subpixel_weight``'s per-phase 2x2 convs: (B, cout, 2 (n - 2), 2 (m - 2))."""
    b, h, w = region.shape[0], region.shape[2] - 2, region.shape[3] - 2
    phases = F.conv2d(region, folded, bias4).view(b, 2, 2, cout, h + 1, w + 1)
    out = torch.empty((b, cout, 2 * h, 2 * w), dtype=phases.dtype, device=region.device)
    for a in (0, 1):
        for c in (0, 1):
            out[:, :, a::2, c::2] = phases[:, a, c, :, a : a + h, c : c + w]
    return out


def online_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, L, D) tensors, keys in blocks with a running max and sum.

    The running max, sum and output accumulate in fp32 at least (in the input's dtype when wider).
    """
    scale = q.shape[-1] ** -0.5
    dtype = torch.promote_types(q.dtype, torch.float32)
    outs = []
    for qs in q.split(Q_CHUNK, 1):
        qs = qs * scale
        m = torch.full((*qs.shape[:2], 1), float("-inf"), dtype=dtype, device=q.device)
        total = torch.zeros_like(m)
        acc = torch.zeros(qs.shape, dtype=dtype, device=q.device)
        for ks, vs in zip(k.split(K_CHUNK, 1), v.split(K_CHUNK, 1)):
            s = torch.bmm(qs, ks.transpose(1, 2)).to(dtype)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            p = torch.exp(s - m_new)
            rescale = torch.exp(m - m_new)  # 0 on the first block (m = -inf)
            total = total * rescale + p.sum(-1, keepdim=True)
            acc = acc * rescale + torch.bmm(p.to(vs.dtype), vs).to(dtype)
            m = m_new
        outs.append((acc / total).to(q.dtype))
    return torch.cat(outs, 1)


