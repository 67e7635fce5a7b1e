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
- GroupNorm needs the statistics of the whole image before any tile is normalised: each tile's
  moments are merged as it is produced (``maps.Moments``), and the normalisation is applied
  while gathering each tile's input region;
- the mid-block attention is exact global attention: keys and values for all tokens (linear
  in tokens), then for each query tile an online softmax over key blocks (running max and
  sum in fp32), so no score matrix larger than one block pair ever exists.

A tile's inputs are released once no later tile needs them, so one layer's input and
output (plus a resnet's inner activation) are alive at a time, not the whole network's.
- any other (``local``) layer runs as a module on its input window: grown by its halo, clipped
  to the image so that its own zero padding falls on the image's edges (``maps.local_window``).

The layers come from the coder's ``plan()`` (``zturbo.model.plan``), so any architecture made of
those kinds tiles with no change here. Inference only: runs without autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zturbo.model.blocks import Attention, ResnetBlock2D, Upsample2D, subpixel_weight
from zturbo.model.plan import Layer
from zturbo.tiling.maps import Grid, Moments, Norm, TiledMap, local_window, online_attention, upsample_region

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

    def conv3_map(self, conv: nn.Conv2d, x: TiledMap, norm: Norm | None,
                  into: torch.Tensor | None = None) -> TiledMap | None:
        return self.produce(x.grid, lambda r, c, y0, y1, x0, x1: self.conv3(conv, x, norm, y0, y1, x0, x1),
                            release=[(x, lambda y: y - 1)], into=into)

    def resnet(self, block: ResnetBlock2D, x: TiledMap, into: torch.Tensor | None = None) -> TiledMap | None:
        norm1 = x.stats(self.device).norm(block.norm1, silu=True)
        h = self.produce(x.grid, lambda r, c, y0, y1, x0, x1: self.conv3(block.conv1, x, norm1, y0, y1, x0, x1))
        norm2 = h.moments.norm(block.norm2, silu=True)

        def second(r: int, c: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
            out = self.conv3(block.conv2, h, norm2, y0, y1, x0, x1)
            skip = x.tiles[r][c].to(self.device, non_blocking=True)
            x.tiles[r][c] = None  # the shortcut was its last reader
            return out.add_(skip if block.conv_shortcut is None else block.conv_shortcut(skip))

        return self.produce(x.grid, second, release=[(h, lambda y: y - 1)], into=into)

    def downsample(self, conv: nn.Conv2d, x: TiledMap, into: torch.Tensor | None = None) -> TiledMap | None:
        """Stride-2 3x3 conv after (0, 1, 0, 1) zero padding: output rows [o0, o1) read input [2*o0, 2*o1 + 1)."""
        def tile(r: int, c: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
            region = x.region(2 * y0, 2 * y1 + 1, 2 * x0, 2 * x1 + 1, self.device)
            return F.conv2d(region, conv.weight, conv.bias, stride=2)

        return self.produce(x.grid.mapped(lambda b: b // 2), tile, release=[(x, lambda y: 2 * y)], into=into)

    def upsample(self, up: Upsample2D, x: TiledMap, into: torch.Tensor | None = None) -> TiledMap | None:
        """Nearest x2 + 3x3 conv: phase (a, c) of output pixel (2i+a, 2j+c) is a 2x2 conv over source rows
        i-1+a..i+a and columns j-1+c..j+c, so a source tile with a one-pixel halo gives its output tile."""
        folded = subpixel_weight(up.conv.weight)
        bias4 = None if up.conv.bias is None else up.conv.bias.repeat(4)
        cout = up.conv.out_channels

        def tile(r: int, c: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
            i0, i1, j0, j1 = y0 // 2, y1 // 2, x0 // 2, x1 // 2
            return upsample_region(x.region(i0 - 1, i1 + 1, j0 - 1, j1 + 1, self.device), folded, bias4, cout)

        return self.produce(x.grid.mapped(lambda b: 2 * b), tile, release=[(x, lambda y: y // 2 - 1)], into=into)

    def attention(self, attn: Attention, x: TiledMap, into: torch.Tensor | None = None) -> TiledMap | None:
        """Global single-head attention plus residual, by query tile against key blocks."""
        norm = x.stats(self.device).norm(attn.group_norm, silu=False)

        def tokens(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
            return x.region(y0, y1, x0, x1, self.device, norm).flatten(2).transpose(1, 2)  # (B, L, C)

        keys, values = [], []
        for y0, y1, x0, x1 in x.grid.tiles():
            t = tokens(y0, y1, x0, x1)
            keys.append(attn.to_k(t))
            values.append(attn.to_v(t))
        k, v = torch.cat(keys, 1), torch.cat(values, 1)
        del keys, values

        def tile(r: int, c: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
            out = attn.to_out[0](online_attention(attn.to_q(tokens(y0, y1, x0, x1)), k, v))
            skip = x.tiles[r][c].to(self.device, non_blocking=True)
            x.tiles[r][c] = None
            return out.transpose(1, 2).reshape(skip.shape).add_(skip)

        return self.produce(x.grid, tile, into=into)

    def local(self, layer: Layer, x: TiledMap, into: torch.Tensor | None = None) -> TiledMap | None:
        """Any layer without global statistics, run as its module on each output tile's input window."""
        height, width = x.height, x.width

        def tile(r: int, c: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
            a0, a1, oy = local_window(y0, y1, height, layer)
            b0, b1, ox = local_window(x0, x1, width, layer)
            out = layer.module(x.region(a0, a1, b0, b1, self.device))
            return out[:, :, y0 - oy : y1 - oy, x0 - ox : x1 - ox]

        lowest = lambda y: local_window(y, y + 1, height, layer)[0]  # noqa: E731 - the first input row a row reads
        return self.produce(out_grid(layer, x.grid), tile, release=[(x, lowest)], into=into)

    def layer(self, layer: Layer, x: TiledMap, into: torch.Tensor | None = None) -> TiledMap | None:
        """One layer of a coder's plan over tiles (written into ``into`` when given)."""
        if layer.kind == "conv":
            norm = None if layer.norm is None else x.stats(self.device).norm(layer.norm, silu=True)
            return self.conv3_map(layer.module, x, norm, into)
        if layer.kind == "resnet":
            return self.resnet(layer.module, x, into)
        if layer.kind == "attention":
            return self.attention(layer.module, x, into)
        if layer.kind == "downsample":
            return self.downsample(layer.module.conv, x, into)
        if layer.kind == "upsample":
            return self.upsample(layer.module, x, into)
        return self.local(layer, x, into)


def out_grid(layer: Layer, grid: Grid) -> Grid:
    """The grid of a layer's output: the input's tile boundaries at the output's resolution."""
    if layer.scale == 1:
        return grid
    return grid.mapped(lambda b: int(b * layer.scale))


# One layer over tiles: (runner, layer, input) -> output. ``recompute`` passes one that recomputes.
LayerFn = Callable[[Runner, Layer, TiledMap], TiledMap]


def _runner(module: nn.Module, offload: bool) -> Runner:
    device = next(module.parameters()).device
    return Runner(device, torch.device("cpu") if offload else device)


def run_plan(run: Runner, plan: Sequence[Layer], x: TiledMap, layer: LayerFn | None = None) -> torch.Tensor:
    """Every layer of ``plan`` over tiles, the last written into one output tensor."""
    step = layer or Runner.layer
    for item in plan[:-1]:
        x = step(run, item, x)
    last = plan[-1]
    grid = out_grid(last, x.grid)
    out = torch.empty((x.batch, last.cout, grid.rows[-1], grid.cols[-1]), dtype=x.dtype, device=run.device)
    run.layer(last, x, into=out)
    return out


@torch.no_grad()
def encode_exact(vae: nn.Module, x: torch.Tensor, tile: int, offload: bool = False) -> torch.Tensor:
    """The encoder's moments (before ``DiagonalGaussian``), tile by tile; ``tile`` in pixels."""
    out = run_plan(_runner(vae.encoder, offload), vae.encoder.plan(), TiledMap.of(x, Grid.even(x.shape[2], x.shape[3], tile)))
    return out if vae.quant_conv is None else vae.quant_conv(out)


@torch.no_grad()
def decode_exact(vae: nn.Module, z: torch.Tensor, tile: int, offload: bool = False,
                 layer: LayerFn | None = None) -> torch.Tensor:
    """The decoded image, tile by tile; ``tile`` is the output tile in pixels (a multiple of the factor).
    ``layer`` computes each layer but the last (``recompute`` passes one that recomputes)."""
    plan = vae.decoder.plan()
    factor = int(plan[-1].output_resolution)
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)  # a 1x1 conv on the latent: small, done whole
    return run_plan(_runner(vae.decoder, offload), plan, TiledMap.of(z, Grid.even(z.shape[2], z.shape[3], tile // factor)), layer)

