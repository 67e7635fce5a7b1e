"""Patch-parallel exact decode: each process decodes a band of rows, as xDiT's DistVAE does.

    # torchrun --nproc_per_node 4 scripts/decode_parallel.py runs/fast --random 8x512x512 --output out.png
    image = decode_parallel(vae, z)   # every rank passes the same whole latent; every rank gets the image

The latent's rows are split as evenly as possible over the ranks of the process group (the
bands of ``H`` rows over ``n`` ranks start at ``r * H // n``), and every activation keeps
that split: after each x2 upsample a rank's band is twice as tall. Each layer computes what
the single-device decoder computes:

- a 3x3 convolution reads one row above and one below its band: the neighbouring ranks' edge
  rows, exchanged point to point (``batch_isend_irecv``, which NCCL and gloo both run), and
  zeros only above the image's first row and below its last, where the untiled convolution
  pads. The rows are exchanged after GroupNorm and SiLU, so the zeros are padding of the
  normalised map, as in the untiled network;
- GroupNorm takes the statistics of the whole image: each rank's per-channel count, mean and
  sum of squared deviations (M2, fp32 at least, as ``maps.Moments``) are all-gathered and
  merged in rank order with Chan et al.'s parallel update, never as sums of x and x^2 (which
  cancel catastrophically when the mean is large next to the spread);
- the mid-block attention is exact and global: each rank's keys and values are all-gathered
  (linear in the tokens) and each rank's queries attend to all of them with the blockwise
  online softmax of ``maps.online_attention``;
- the upsample is the model's own ``Upsample2D`` on the band plus its one-row halo; the halo's
  output rows are dropped (they are the only ones the halo's outer padding reaches);
- any other (``local``) layer gathers ``halo`` rows from each neighbour and runs as its module on the
  band so grown (not grown past the image's edges, where the module's own padding applies);
- the output bands are all-gathered into one image on every rank.

The layers come from the decoder's ``plan()``, as for the tiled engines.

A rank holds only its band of each activation, so the peak memory per rank is about the
single-device peak divided by the number of ranks (plus the gathered keys and values, and
the output image). Without an initialised process group it runs as one rank. Inference only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from zturbo.model.blocks import Attention, ResnetBlock2D, Upsample2D
from zturbo.model.errors import UsageError
from zturbo.model.plan import Layer
from zturbo.tiling.maps import Moments, Norm, local_window, online_attention

MIN_BAND_ROWS = 1  # latent rows per rank: a 3x3 conv's one-row halo then always comes from the next rank


def band_bounds(height: int, world: int) -> tuple[int, ...]:
    """Row boundaries of ``world`` bands of ``height`` rows, as even as possible (sizes differ by at most 1)."""
    if height < MIN_BAND_ROWS * world:
        raise UsageError(
            f"a latent of height {height} cannot be split over {world} ranks: parallel decode needs at least "
            f"{MIN_BAND_ROWS} latent row per rank (a latent height of at least {MIN_BAND_ROWS * world}); "
            f"use at most {height // MIN_BAND_ROWS} ranks"
        )
    return tuple(r * height // world for r in range(world + 1))


def _normalise_into(out: torch.Tensor, x: torch.Tensor, norm: Norm) -> None:
    """out = silu(x * scale + shift) (or without silu), computed in the statistics' precision."""
    torch.addcmul(norm[1], x, norm[0], out=out)
    if norm[2]:
        F.silu(out, inplace=True)


@dataclass(frozen=True)
class Bands:
    """This rank's place in the split: group, rank, global ranks of the group and latent row boundaries."""

    group: dist.ProcessGroup | None
    rank: int
    peers: tuple[int, ...]  # global rank of each rank of the group (what point-to-point ops address)
    bounds: tuple[int, ...]
    latent_width: int

    @classmethod
    def of(cls, z: torch.Tensor, group: dist.ProcessGroup | None) -> Bands:
        if not dist.is_available() or not dist.is_initialized():
            if group is not None:
                raise UsageError("decode_parallel was given a process group, but torch.distributed is not "
                                 "initialised (call dist.init_process_group first, e.g. under torchrun)")
            return cls(None, 0, (0,), band_bounds(z.shape[2], 1), z.shape[3])
        world = dist.get_world_size(group)
        peers = tuple(r if group is None else dist.get_global_rank(group, r) for r in range(world))
        return cls(group, dist.get_rank(group), peers, band_bounds(z.shape[2], world), z.shape[3])

    @property
    def world(self) -> int:
        return len(self.peers)

    def rows(self, r: int, per_row: int = 1) -> int:
        """Rank ``r``'s band height, ``per_row`` rows per latent row."""
        return (self.bounds[r + 1] - self.bounds[r]) * per_row

    # -- communication -------------------------------------------------------------------------------
    def fill_halo(self, out: torch.Tensor) -> None:
        """Set ``out``'s first and last rows to the neighbours' edge rows of rows 1..-2 (zeros at the image's edges)."""
        ops, received = [], []
        for edge, inner, neighbour in ((0, 1, self.rank - 1), (-1, -2, self.rank + 1)):
            halo = out[:, :, edge].unsqueeze(2)
            if not 0 <= neighbour < self.world:
                halo.zero_()
                continue
            buffer = torch.empty(halo.shape, dtype=out.dtype, device=out.device)
            peer = self.peers[neighbour]
            ops.append(dist.P2POp(dist.isend, out[:, :, inner].unsqueeze(2).contiguous(), peer, self.group))
            ops.append(dist.P2POp(dist.irecv, buffer, peer, self.group))
            received.append((halo, buffer))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        for halo, buffer in received:
            halo.copy_(buffer)

    def gather(self, x: torch.Tensor, dim: int, per_row: int) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim`` in rank order, ``per_row`` entries per latent row."""
        if self.world == 1:
            return x
        longest = max(self.rows(r, per_row) for r in range(self.world))
        shape = list(x.shape)
        shape[dim] = longest
        padded = x.new_zeros(shape)  # all-gather takes equal sizes: bands pad to the longest (one row more at most)
        padded.narrow(dim, 0, x.shape[dim]).copy_(x)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p.narrow(dim, 0, self.rows(r, per_row)) for r, p in enumerate(parts)], dim)

    def norm(self, gn: nn.GroupNorm, x: torch.Tensor, silu: bool) -> Norm:
        """GroupNorm over the whole image as one scale and shift per (sample, channel), from every band's moments."""
        local = Moments()
        local.add(x)
        if self.world == 1:
            return local.norm(gn, silu)
        stats = torch.stack([local.mean, local.m2])  # (2, B, C) in fp32 at least
        parts = [torch.empty_like(stats) for _ in range(self.world)]
        dist.all_gather(parts, stats, group=self.group)
        per_row = x.shape[3] // self.latent_width  # rows (and columns) per latent row at this resolution
        total = Moments()
        for r, (mean, m2) in enumerate(parts):
            total.merge(self.rows(r, per_row) * x.shape[3], mean, m2)
        return total.norm(gn, silu)

    # -- layers --------------------------------------------------------------------------------------
    def padded(self, x: torch.Tensor, norm: Norm | None) -> torch.Tensor:
        """The band with one more row above and below (the neighbours' rows, or zeros outside the image), normalised first."""
        b, c, h, w = x.shape
        out = torch.empty((b, c, h + 2, w), dtype=x.dtype, device=x.device)
        if norm is None:
            out[:, :, 1 : h + 1].copy_(x)
        else:
            _normalise_into(out[:, :, 1 : h + 1], x, norm)
        self.fill_halo(out)
        return out

    def conv3(self, conv: nn.Conv2d, x: torch.Tensor, norm: Norm | None) -> torch.Tensor:
        """A 3x3 stride-1 conv with zero padding 1: rows from the halo, columns padded as usual."""
        return F.conv2d(self.padded(x, norm), conv.weight, conv.bias, padding=(0, 1))

    def resnet(self, block: ResnetBlock2D, x: torch.Tensor) -> torch.Tensor:
        h = self.conv3(block.conv1, x, self.norm(block.norm1, x, silu=True))
        h = self.conv3(block.conv2, h, self.norm(block.norm2, h, silu=True))
        return h.add_(x if block.conv_shortcut is None else block.conv_shortcut(x))

    def attention(self, attn: Attention, x: torch.Tensor) -> torch.Tensor:
        """Single-head attention of this band's queries over every band's keys and values, plus the residual."""
        b, c, h, w = x.shape
        tokens = torch.empty_like(x)
        _normalise_into(tokens, x, self.norm(attn.group_norm, x, silu=False))
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major like the untiled tokens
        kv = self.gather(torch.cat([attn.to_k(tokens), attn.to_v(tokens)], -1), dim=1, per_row=w)
        k, v = kv.split(c, -1)
        out = attn.to_out[0](online_attention(attn.to_q(tokens), k, v))
        return x.add_(out.transpose(1, 2).reshape(b, c, h, w))

    def upsample(self, up: Upsample2D, x: torch.Tensor) -> torch.Tensor:
        """Nearest x2 + 3x3 conv (the module's own kernel) on the band plus halo: output rows 2..-2 are exact."""
        return up(self.padded(x, None))[:, :, 2:-2]

    def local(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        """A layer without global statistics on the band grown by its window from the neighbours' rows."""
        per_row = x.shape[2] // self.rows(self.rank)  # this resolution's rows per latent row
        height = self.bounds[-1] * per_row

        def window(r: int) -> tuple[int, int, int]:
            """(rows wanted from above, from below, first output row) of rank ``r``'s window."""
            top, bottom = self.bounds[r] * per_row, self.bounds[r + 1] * per_row
            first, end, offset = local_window(int(top * layer.scale), int(bottom * layer.scale), height, layer)
            return top - first, end - bottom, int(top * layer.scale) - offset

        wants = [window(r) for r in range(self.world)]
        if any(max(a, b) > self.rows(r, per_row) for r, (a, b, _) in enumerate(wants)):
            raise UsageError(f"layer {layer.name} reads {layer.halo} rows around each row, more than the narrowest "
                             f"band holds over {self.world} ranks at this resolution; use fewer ranks")
        above, below, start = wants[self.rank]
        send_up = wants[self.rank - 1][1] if self.rank > 0 else 0  # the previous rank's rows from below
        send_down = wants[self.rank + 1][0] if self.rank + 1 < self.world else 0
        grown = self.exchange(x, above, below, send_up, send_down)
        return layer.module(grown)[:, :, start : start + int(x.shape[2] * layer.scale)]

    def exchange(self, x: torch.Tensor, above: int, below: int, send_up: int, send_down: int) -> torch.Tensor:
        """The band with ``above`` rows of the previous rank's band on top and ``below`` of the next's under
        it; this rank's first ``send_up`` rows go to the previous rank, its last ``send_down`` to the next."""
        b, c, h, w = x.shape
        out = torch.empty((b, c, h + above + below, w), dtype=x.dtype, device=x.device)
        out[:, :, above : above + h].copy_(x)
        ops, received = [], []
        for count, sent, neighbour, dst in ((above, send_up, self.rank - 1, out[:, :, :above]),
                                            (below, send_down, self.rank + 1, out[:, :, above + h :])):
            if not 0 <= neighbour < self.world:
                continue
            peer = self.peers[neighbour]
            if sent:
                rows = x[:, :, :sent] if neighbour < self.rank else x[:, :, h - sent :]
                ops.append(dist.P2POp(dist.isend, rows.contiguous(), peer, self.group))
            if count:
                buffer = torch.empty(dst.shape, dtype=x.dtype, device=x.device)
                ops.append(dist.P2POp(dist.irecv, buffer, peer, self.group))
                received.append((dst, buffer))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        for dst, buffer in received:
            dst.copy_(buffer)
        return out

    def layer(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        """One layer of the decoder's plan on this rank's band."""
        if layer.kind == "conv":
            return self.conv3(layer.module, x, None if layer.norm is None else self.norm(layer.norm, x, silu=True))
        if layer.kind == "resnet":
            return self.resnet(layer.module, x)
        if layer.kind == "attention":
            return self.attention(layer.module, x)
        if layer.kind == "upsample":
            return self.upsample(layer.module, x)
        if layer.kind == "local":
            return self.local(layer, x)
        raise UsageError(f"parallel decode does not run {layer.kind} layers ({layer.name}): it splits decoders")


@torch.no_grad()
def decode_parallel(vae: nn.Module, z: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The decoded image of ``z`` (B, C, H, W), computed in bands of rows by the ranks of ``group``.

    Call it on every rank of the group (the default: the whole world) with the same latent and
    weights, on the rank's own device (for NCCL, after ``torch.cuda.set_device``). Every rank
    returns the whole image, equal to ``vae.decode(z)`` up to float rounding.
    """
    if z.dim() != 4:
        raise UsageError(f"decode_parallel takes a (batch, channels, height, width) latent, got shape {tuple(z.shape)}")
    bands = Bands.of(z, group)
    x = z[:, :, bands.bounds[bands.rank] : bands.bounds[bands.rank + 1]]
    if vae.post_quant_conv is not None:
        x = vae.post_quant_conv(x)  # 1x1: per pixel, no halo
    for layer in vae.decoder.plan():
        x = bands.layer(layer, x)
    return bands.gather(x, dim=2, per_row=x.shape[3] // bands.latent_width)
