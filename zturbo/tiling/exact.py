"""Exact tiled encode and decode: the untiled result, layer by layer over tiles, in bounded memory.

Every activation is kept as a grid of tiles (on the compute device, or on the CPU with
``offload=True``) and the next layer is computed one output tile at a time:

- a 3x3 convolution reads its output tile plus a one-pixel halo gathered from the
  neighbouring tiles, with zeros only outside the image, exactly where the untiled
  convolution pads;
- the stride-2 downsample reads input rows ``[2*y0, 2*y1 + 1)``: its asymmetric (0, 1, 0, 1)
  padding is the zero row and column just outside the image, so it needs no special case;
- the upsample (nearest x2 + 3x3 conv) computes each output phase as a 2x2 conv on the
  low-resolution tile with a one-pixel halo (``blocks.subpixel_weight``);
- GroupNorm needs the statistics of the whole image before any tile is normalised. Each
  tile's per-channel count, mean and sum of squared deviations (M2) are taken in fp32 as the
  tile is produced and merged into running totals with Chan et al.'s parallel update
  (``delta = mean_b - mean_a``; ``M2 = M2_a + M2_b + delta^2 n_a n_b / n``). Unlike one running
  sum of x and x^2 over ~10^8 elements, this never subtracts two large nearly equal numbers
  (the cancellation that loses all digits of the variance when the mean is large next to
  the spread), and each tile's M2 comes from a two-pass ``var_mean`` over a small tile.
  The normalisation is then applied while gathering each tile's input region;
- the mid-block attention is exact global attention: keys and values for all tokens (linear
  in tokens), then for each query tile an online softmax over key blocks (running max and
  sum in fp32), so no score matrix larger than one block pair ever exists.

A tile's inputs are released once no later tile needs them, so one layer's input and
output (plus a resnet's inner activation) are alive at a time, not the whole network's.
Inference only: runs without autograd.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zturbo.model.blocks import Attention, MidBlock, ResnetBlock2D, Upsample2D, subpixel_weight

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

    def release_rows_before(self, y: int) -> None:
        """Drop the tiles that lie wholly above row ``y``."""
        for r in range(len(self.grid.rows) - 1):
            if self.grid.rows[r + 1] <= y:
                self.tiles[r] = [None] * len(self.tiles[r])


TileFn = Callable[[int, int, int, int, int, int], torch.Tensor]  # (r, c, y0, y1, x0, x1) -> tile


@dataclass
class Runner:
    """Where tiles are computed and where they are kept between layers."""

    device: torch.device
    store: torch.device

    def produce(self, grid: Grid, fn: TileFn, release: Sequence[tuple[TiledMap, Callable[[int], int]]] = (),
                into: torch.Tensor | None = None) -> TiledMap | None:
        """Compute every tile of ``grid`` in row order, tracking its moments (or writing into ``into``).

        ``release`` pairs an input map with the lowest input row a given output row needs: after
        each row of tiles, input rows that the next output row no longer reaches are freed.
        """
        moments = Moments() if into is None else None
        tiles: list[list[torch.Tensor | None]] = []
        nr, nc = grid.shape
        for r in range(nr):
            row = []
            y0, y1 = grid.rows[r], grid.rows[r + 1]
            for c in range(nc):
                x0, x1 = grid.cols[c], grid.cols[c + 1]
                tile = fn(r, c, y0, y1, x0, x1)
                if into is not None:
                    into[:, :, y0:y1, x0:x1].copy_(tile)
                    continue
                moments.add(tile)
                row.append(tile.to(self.store))
            tiles.append(row)
            if r + 1 < nr:
                for source, lowest_row in release:
                    source.release_rows_before(lowest_row(grid.rows[r + 1]))
        return TiledMap(grid, tiles, moments) if into is None else None

    # -- layers ------------------------------------------------------------------------------------
    def conv3(self, conv: nn.Conv2d, x: TiledMap, norm: Norm | None, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """A 3x3 stride-1 conv (padding 1) of one output tile."""
        return F.conv2d(x.region(y0 - 1, y1 + 1, x0 - 1, x1 + 1, self.device, norm), conv.weight, conv.bias)

    def conv3_map(self, conv: nn.Conv2d, x: TiledMap, norm: Norm | None, into: torch.Tensor | None = None):
        return self.produce(x.grid, lambda r, c, y0, y1, x0, x1: self.conv3(conv, x, norm, y0, y1, x0, x1),
                            release=[(x, lambda y: y - 1)], into=into)

    def resnet(self, block: ResnetBlock2D, x: TiledMap) -> TiledMap:
        norm1 = x.moments.norm(block.norm1, silu=True)
        h = self.produce(x.grid, lambda r, c, y0, y1, x0, x1: self.conv3(block.conv1, x, norm1, y0, y1, x0, x1))
        norm2 = h.moments.norm(block.norm2, silu=True)

        def second(r: int, c: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
            out = self.conv3(block.conv2, h, norm2, y0, y1, x0, x1)
            skip = x.tiles[r][c].to(self.device, non_blocking=True)
            x.tiles[r][c] = None  # the shortcut was its last reader
            return out.add_(skip if block.conv_shortcut is None else block.conv_shortcut(skip))

        return self.produce(x.grid, second, release=[(h, lambda y: y - 1)])

    def downsample(self, conv: nn.Conv2d, x: TiledMap) -> TiledMap:
        """Stride-2 3x3 conv after (0, 1, 0, 1) zero padding: output rows [o0, o1) read input [2*o0, 2*o1 + 1)."""
        def tile(r: int, c: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
            region = x.region(2 * y0, 2 * y1 + 1, 2 * x0, 2 * x1 + 1, self.device)
            return F.conv2d(region, conv.weight, conv.bias, stride=2)

        return self.produce(x.grid.mapped(lambda b: b // 2), tile, release=[(x, lambda y: 2 * y)])

    def upsample(self, up: Upsample2D, x: TiledMap) -> TiledMap:
        """Nearest x2 + 3x3 conv: phase (a, c) of output pixel (2i+a, 2j+c) is a 2x2 conv over source rows
        i-1+a..i+a and columns j-1+c..j+c, so a source tile with a one-pixel halo gives its output tile."""
        folded = subpixel_weight(up.conv.weight)
        bias4 = None if up.conv.bias is None else up.conv.bias.repeat(4)
        cout = up.conv.out_channels

        def tile(r: int, c: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
            i0, i1, j0, j1 = y0 // 2, y1 // 2, x0 // 2, x1 // 2
            return upsample_region(x.region(i0 - 1, i1 + 1, j0 - 1, j1 + 1, self.device), folded, bias4, cout)

        return self.produce(x.grid.mapped(lambda b: 2 * b), tile, release=[(x, lambda y: y // 2 - 1)])

    def attention(self, attn: Attention, x: TiledMap) -> TiledMap:
        """Global single-head attention plus residual, by query tile against key blocks."""
        norm = x.moments.norm(attn.group_norm, silu=False)

        def tokens(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
            return x.region(y0, y1, x0, x1, self.device, norm).flatten(2).transpose(1, 2)  # (B, L, C)

        keys, values = [], []
        nr, nc = x.grid.shape
        for r in range(nr):
            for c in range(nc):
                t = tokens(x.grid.rows[r], x.grid.rows[r + 1], x.grid.cols[c], x.grid.cols[c + 1])
                keys.append(attn.to_k(t))
                values.append(attn.to_v(t))
        k, v = torch.cat(keys, 1), torch.cat(values, 1)
        del keys, values

        def tile(r: int, c: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
            out = attn.to_out[0](online_attention(attn.to_q(tokens(y0, y1, x0, x1)), k, v))
            skip = x.tiles[r][c].to(self.device, non_blocking=True)
            x.tiles[r][c] = None
            return out.transpose(1, 2).reshape(skip.shape).add_(skip)

        return self.produce(x.grid, tile)

    def mid(self, block: MidBlock, x: TiledMap) -> TiledMap:
        x = self.resnet(block.resnets[0], x)
        if block.attentions is not None:
            x = self.attention(block.attentions[0], x)
        return self.resnet(block.resnets[1], x)


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


def _runner(module: nn.Module, offload: bool) -> Runner:
    device = next(module.parameters()).device
    return Runner(device, torch.device("cpu") if offload else device)


@torch.no_grad()
def encode_exact(vae: nn.Module, x: torch.Tensor, tile: int, offload: bool = False) -> torch.Tensor:
    """The encoder's moments (before ``DiagonalGaussian``), tile by tile; ``tile`` in pixels."""
    enc = vae.encoder
    run = _runner(enc, offload)
    grid = Grid.even(x.shape[2], x.shape[3], tile)
    h = run.conv3_map(enc.conv_in, TiledMap.of(x, grid), None)
    for block in enc.down_blocks:
        for resnet in block.resnets:
            h = run.resnet(resnet, h)
        if block.downsamplers is not None:
            h = run.downsample(block.downsamplers[0].conv, h)
    h = run.mid(enc.mid_block, h)
    out = torch.empty((x.shape[0], enc.conv_out.out_channels, h.grid.rows[-1], h.grid.cols[-1]),
                      dtype=h.dtype, device=run.device)
    run.conv3_map(enc.conv_out, h, h.moments.norm(enc.conv_norm_out, silu=True), into=out)
    return out if vae.quant_conv is None else vae.quant_conv(out)


# One decoder layer over tiles: (runner, level, resnet index or -1 for the level's upsample, module, map) -> map.
LayerFn = Callable[["Runner", int, int, nn.Module, TiledMap], TiledMap]


def stored_layer(run: Runner, level: int, index: int, module: nn.Module, x: TiledMap) -> TiledMap:
    return run.resnet(module, x) if index >= 0 else run.upsample(module, x)


@torch.no_grad()
def decode_exact(vae: nn.Module, z: torch.Tensor, tile: int, offload: bool = False,
                 layer: LayerFn = stored_layer) -> torch.Tensor:
    """The decoded image, tile by tile; ``tile`` is the output tile in pixels (a multiple of the factor).
    ``layer`` computes each up-block layer (``tiled_recompute`` passes one that recomputes)."""
    dec = vae.decoder
    run = _runner(dec, offload)
    factor = 2 ** (len(dec.up_blocks) - 1)
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)  # a 1x1 conv on the latent: small, done whole
    grid = Grid.even(z.shape[2], z.shape[3], tile // factor)
    h = run.conv3_map(dec.conv_in, TiledMap.of(z, grid), None)
    h = run.mid(dec.mid_block, h)
    for i, block in enumerate(dec.up_blocks):
        for j, resnet in enumerate(block.resnets):
            h = layer(run, i, j, resnet, h)
        if block.upsamplers is not None:
            h = layer(run, i, -1, block.upsamplers[0], h)
    out = torch.empty((z.shape[0], dec.conv_out.out_channels, h.grid.rows[-1], h.grid.cols[-1]),
                      dtype=h.dtype, device=run.device)
    run.conv3_map(dec.conv_out, h, h.moments.norm(dec.conv_norm_out, silu=True), into=out)
    return out
