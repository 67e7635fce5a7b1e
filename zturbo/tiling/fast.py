"""Fast approximate tiled encode and decode: one pass per tile at full resolution, GroupNorm statistics borrowed.

1. Run the network once on a downscaled copy of the input (at most ``stats_size`` latent
   pixels on its longer side) and record each GroupNorm's per-sample group mean and variance.
2. Run each tile, with a halo of ``halo`` pixels on every side, through the full-resolution
   stages (the decoder's up blocks, the encoder's down blocks) with every GroupNorm
   normalising by those recorded statistics; keep the tile's centre.
3. The latent-resolution stage (conv_in and the mid block with its global attention) is
   small, 1/64 of the pixels at factor 8, and runs exactly (``exact.py``).

The stages come from the coder's plan: the full-resolution stage is every layer above the
latent's resolution (the encoder's layers up to its last downsample, the decoder's from its
first upsample), the latent stage the rest.

Against the exact mode this trades two errors for one pass over the expensive stages and
one tile's memory there: the statistics are those of a smaller image (features at another
scale), and a halo shorter than the receptive field of the full-resolution stages (about
12 latent pixels for the decoder) truncates what pixels near a tile edge see. Unlike per-tile
statistics (diffusers' ``enable_tiling``),
every tile is normalised the same way, so there is no contrast jump between tiles to blend
away. The input is downscaled with antialiased bilinear filtering for images and by nearest
sampling for latents (averaging latents would make codes the decoder was never trained on).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from zturbo.model.plan import Layer, run_layer
from zturbo.tiling.exact import Runner, decode_exact, encode_exact, run_plan
from zturbo.tiling.maps import Grid, TiledMap

Stats = dict[nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]]  # per-sample group mean and rstd, (B, G) fp32


def collect_stats(module: nn.Module, x: torch.Tensor) -> Stats:
    """Each GroupNorm's input statistics while ``module`` runs on ``x``."""
    stats: Stats = {}

    def record(norm: nn.GroupNorm, args: tuple) -> None:
        t = args[0]
        acc = torch.promote_types(t.dtype, torch.float32)  # fp32 at least, never below the input's precision
        var, mean = torch.var_mean(t.to(acc).reshape(t.shape[0], norm.num_groups, -1), dim=-1, correction=0)
        stats[norm] = (mean, torch.rsqrt(var + norm.eps))

    norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
    handles = [n.register_forward_pre_hook(record) for n in norms]
    try:
        with module.kernels.using(group_norm="torch"):  # the fused kernels bypass the module call hooked here
            module(x)
    finally:
        for h in handles:
            h.remove()
    return stats


@contextmanager
def fixed_statistics(module: nn.Module, stats: Stats) -> Iterator[None]:
    """Every recorded GroupNorm normalises by its recorded statistics instead of its input's."""

    def fixed(norm: nn.GroupNorm, mean: torch.Tensor, rstd: torch.Tensor):
        def forward(x: torch.Tensor) -> torch.Tensor:
            b, c = x.shape[:2]
            y = (x.to(mean.dtype).reshape(b, norm.num_groups, -1) - mean[..., None]) * rstd[..., None]
            y = y.reshape(x.shape)
            if norm.affine:
                y = y * norm.weight.to(y.dtype).view(1, c, 1, 1) + norm.bias.to(y.dtype).view(1, c, 1, 1)
            return y.to(x.dtype)

        return forward

    try:
        for norm, (mean, rstd) in stats.items():
            norm.forward = fixed(norm, mean, rstd)  # an instance attribute shadows the class's forward
        with module.kernels.using(group_norm="torch"):
            yield
    finally:
        for norm in stats:
            norm.__dict__.pop("forward", None)


def _downscaled(x: torch.Tensor, longest: int, multiple: int, latent: bool) -> torch.Tensor:
    h, w = x.shape[2:]
    scale = longest * multiple / max(h, w)
    if scale >= 1:
        return x
    size = (max(multiple, round(h * scale / multiple) * multiple), max(multiple, round(w * scale / multiple) * multiple))
    if latent:
        return F.interpolate(x, size=size, mode="nearest-exact")
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def _tiles(height: int, width: int, step: int) -> Iterator[tuple[int, int, int, int]]:
    for y0 in range(0, height, step):
        for x0 in range(0, width, step):
            yield y0, min(y0 + step, height), x0, min(x0 + step, width)


def _full_resolution(plan: Sequence[Layer], part: torch.Tensor) -> torch.Tensor:
    """The layers of ``plan`` on one tile, as the coder's forward runs them (norms fixed by the caller)."""
    for layer in plan:
        part = run_layer(layer, part, lambda norm, x: F.silu(norm(x)))
    return part


def _split(plan: list[Layer], decoder: bool) -> tuple[list[Layer], list[Layer]]:
    """(full-resolution layers, latent-resolution layers): the encoder's up to its last resampler, the
    decoder's from its first."""
    resamplers = [i for i, layer in enumerate(plan) if layer.scale != 1]
    if decoder:
        first = resamplers[0] if resamplers else len(plan)
        return plan[first:], plan[:first]
    last = resamplers[-1] + 1 if resamplers else 0
    return plan[:last], plan[last:]


@torch.no_grad()
def encode_fast(vae: nn.Module, x: torch.Tensor, tile: int, halo: int, stats_size: int = 64) -> torch.Tensor:
    """Approximate encoder moments; ``tile`` and ``halo`` in pixels, multiples of the downsampling factor."""
    enc = vae.encoder
    full, latent = _split(enc.plan(), decoder=False)
    if not full:  # no downsampling: the whole encoder is its latent stage
        return encode_exact(vae, x, tile)
    f = int(1 / full[-1].output_resolution)
    stats = collect_stats(enc, _downscaled(x, stats_size, f, latent=False))
    h, w = x.shape[2] // f, x.shape[3] // f
    feats = torch.empty((x.shape[0], full[-1].cout, h, w), dtype=x.dtype, device=x.device)
    with fixed_statistics(enc, stats):
        for y0, y1, x0, x1 in _tiles(x.shape[2], x.shape[3], tile):
            cy0, cx0 = max(0, y0 - halo), max(0, x0 - halo)
            part = _full_resolution(full, x[:, :, cy0 : y1 + halo, cx0 : x1 + halo])
            oy, ox = (y0 - cy0) // f, (x0 - cx0) // f
            ty, tx = min(y1 // f, h) - y0 // f, min(x1 // f, w) - x0 // f
            feats[:, :, y0 // f : y0 // f + ty, x0 // f : x0 // f + tx] = part[:, :, oy : oy + ty, ox : ox + tx]
    grid = Grid.even(h, w, max(1, tile // f))
    out = run_plan(Runner(x.device, x.device), latent, TiledMap.of(feats, grid))
    return out if vae.quant_conv is None else vae.quant_conv(out)


@torch.no_grad()
def decode_fast(vae: nn.Module, z: torch.Tensor, tile: int, halo: int, stats_size: int = 64) -> torch.Tensor:
    """Approximate decode; ``tile`` and ``halo`` in output pixels, multiples of the downsampling factor."""
    dec = vae.decoder
    full, latent = _split(dec.plan(), decoder=True)
    if not full:
        return decode_exact(vae, z, tile)
    f = int(full[-1].output_resolution)
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    stats = collect_stats(dec, _downscaled(z, stats_size, 1, latent=True))
    step, pad = tile // f, halo // f
    feats = run_plan(Runner(z.device, z.device), latent, TiledMap.of(z, Grid.even(z.shape[2], z.shape[3], step)))
    out = torch.empty((z.shape[0], full[-1].cout, z.shape[2] * f, z.shape[3] * f), dtype=z.dtype, device=z.device)
    with fixed_statistics(dec, stats):
        for y0, y1, x0, x1 in _tiles(z.shape[2], z.shape[3], step):
            cy0, cx0 = max(0, y0 - pad), max(0, x0 - pad)
            image = _full_resolution(full, feats[:, :, cy0 : y1 + pad, cx0 : x1 + pad])
            oy, ox = (y0 - cy0) * f, (x0 - cx0) * f
            out[:, :, y0 * f : y1 * f, x0 * f : x1 * f] = image[:, :, oy : oy + (y1 - y0) * f, ox : ox + (x1 - x0) * f]
    return out
