"""How much memory an encode or decode needs, tiled or not, and when to tile.

The estimates walk the coder's plan (``zturbo.model.plan``) layer by layer and take, for each
layer, the tensors alive at its worst moment (inference, no autograd):

untiled (eager PyTorch, as ``blocks.py`` computes it), per layer with P input pixels:
    resnet      max(2 cin + cout, cin + 3 cout) P   x, GN output, conv1 output; then x, h, GN(h), conv2 output
    upsample    9 c P                               x, the four phase maps (4 c P), the interleaved output
    downsample  2.25 c P                            x, its padded copy, the output
    attention   7 c P                               x, normalised tokens, q, k, v, output, projection
    conv        (cin + cout) P, plus a GN output of cin P when it normalises its input (conv_out)
    local       cin P + cout P' + inner max(P, P'), P' its output pixels
    on the CPU  + (cin + cout) P per conv: oneDNN reorders a conv's input and output to its blocked
                layout (measured: fast profile, 512 px decode, 790 and 824 MB RSS in two runs, 805 MB estimated)
exact tiled (``exact.py``), the stored maps per layer plus one tile's workspace:
    resnet      (cin + cout) P                      x and conv1's output; the result replaces x tile by tile
    upsample    4 c P + two tile rows of x          output grows while x is released row by row
    attention   3 c P                               x, keys, values (the result replaces x tile by tile)
    local       cin P + cout P' + two tile rows of x
    workspace   a haloed input tile, its output tile and (upsample) its phase maps, plus one
                Q_CHUNK x K_CHUNK block of fp32 attention scores
With ``offload`` the stored maps live in host memory and only the workspace (plus the
attention's keys and values) is on the device. ``weight_bytes`` (the resident weights) is added.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import psutil
import torch
from torch import nn

from zturbo.model.config import ModelConfig
from zturbo.model.errors import UsageError
from zturbo.model.plan import Layer, plan_factor
from zturbo.model.vae import VAE
from zturbo.tiling.maps import K_CHUNK, Q_CHUNK
from zturbo.tiling.recompute import recompute_plan

TILE_CANDIDATES = (1024, 512, 256, 128, 64, 32, 16, 8)


def coder_plan(model: nn.Module | ModelConfig, direction: str) -> list[Layer]:
    """The encoder's (``direction`` "encode") or decoder's plan of a model, or of a config's model
    (built on the meta device: shapes only, no memory)."""
    if isinstance(model, ModelConfig):
        with torch.device("meta"):
            model = VAE(model)
    return (model.encoder if direction == "encode" else model.decoder).plan()


def _is_encode(plan: Sequence[Layer]) -> bool:
    return plan_factor(plan) < 1


def _pixels(layer: Layer, height: int, width: int, resolution: Fraction | None = None) -> tuple[int, int]:
    """The size of a layer's input (or of ``resolution``) when the coder's input is ``height`` x ``width``."""
    r = layer.resolution if resolution is None else resolution
    return int(height * r), int(width * r)


def untiled_peak_bytes(plan: Sequence[Layer], batch: int, height: int, width: int, element_size: int = 4,
                       weight_bytes: int = 0, device_type: str = "cpu") -> int:
    """Estimated peak bytes of an untiled encode of a ``height`` x ``width`` image (or decode of such a
    latent) by the coder whose ``plan`` this is."""
    worst = 0
    copies = 1 if device_type == "cpu" else 0
    for layer in plan:
        lh, lw = _pixels(layer, height, width)
        p, ci, co = lh * lw, layer.cin, layer.cout
        if layer.kind == "resnet":
            units = max(2 * ci + co + copies * (ci + co), ci + 3 * co + copies * 2 * co) * p
        elif layer.kind == "upsample":
            units = (9 + copies * 5) * ci * p  # the phase conv's output is 4 c P
        elif layer.kind == "downsample":
            units = (2.25 + copies * 1.25) * ci * p
        elif layer.kind == "attention":
            units = 7 * ci * p
        elif layer.kind == "local":
            q = p * layer.scale**2
            units = (1 + copies) * (ci * p + co * q) + layer.inner * max(p, q)
        else:  # conv, after GroupNorm + SiLU when it has a norm
            units = (1 + copies) * (ci + co) * p + (ci * p if layer.norm is not None else 0)
        worst = max(worst, units)
    return int(worst * batch * element_size) + weight_bytes


def tiled_peak_bytes(plan: Sequence[Layer], batch: int, height: int, width: int, tile: int,
                     element_size: int = 4, offload: bool = False, weight_bytes: int = 0,
                     recompute: bool = False) -> int:
    """Estimated peak bytes on the compute device of an exact tiled pass; ``tile`` in image pixels.

    ``recompute`` (decode only): ``recompute.recompute_plan``'s layers keep only their input
    (a fused upsample's input at a quarter of the pixels) and the output replacing it; their workspace
    adds the input tile with a two-pixel halo, the shortcut, conv1's haloed output and, when fused,
    the upsample's phase maps.
    """
    # The tile's side at the coder's input resolution (a decoder's input is the latent).
    side = Fraction(tile) if _is_encode(plan) else Fraction(tile) / plan_factor(plan)
    lean = recompute_plan(plan) if recompute else None
    stored = work = 0.0
    previous: Layer | None = None
    for layer in plan:
        lh, lw = _pixels(layer, height, width)
        p, ci, co = lh * lw, layer.cin, layer.cout
        t = min(int(side * layer.resolution), max(lh, lw))
        row = 2 * t * lw * ci  # two rows of input tiles not yet released
        fused_in = lean is not None and previous is not None and previous.name in lean.fused
        previous = layer
        if lean is not None and layer.name in lean.fused:
            continue  # never stored; its input is counted in the next resnet
        if lean is not None and layer.name in lean.recompute:
            stored = max(stored, max(ci * p / (4 if fused_in else 1), co * p) + row)
            halo2 = (t + 4) ** 2
            tile_work = ci * (halo2 + t * t) + co * ((t + 2) ** 2 + 2 * t * t)
            if fused_in:
                tile_work += 5 * ci * (t // 2 + 4) ** 2  # the source region and its four phase maps
            work = max(work, tile_work)
            continue
        if layer.kind == "resnet":
            units = (ci + co) * p + row
        elif layer.kind == "upsample":
            units = 4 * ci * p + row
        elif layer.kind == "attention":
            units = 3 * ci * p
        elif layer.kind == "downsample":
            units = ci * p + row
        elif layer.kind == "local":
            units = ci * p + co * p * layer.scale**2 + row
        else:
            units = (ci + co) * p
        stored = max(stored, units)
        if layer.kind == "local":
            t_out = int(t * layer.scale)
            tile_work = ci * (t + 2 * layer.halo) ** 2 + layer.inner * max(t, t_out) ** 2 + co * t_out**2
        else:
            halo = (t + 2) ** 2
            tile_work = ci * halo + co * t * t * (4 if layer.kind == "upsample" else 1) * 2
        if layer.kind == "attention":
            tile_work += 2 * min(Q_CHUNK, t * t, p) * min(K_CHUNK, p) * 4 / element_size + (2 * ci * p if offload else 0)
        work = max(work, tile_work)
    total = (work if offload else stored + work) * batch * element_size
    return int(total) + weight_bytes


def check_tile(tile: int, factor: int) -> None:
    """A tile must hold whole latent pixels: at least ``factor`` px and a multiple of it."""
    if tile < factor:
        raise UsageError(f"tile {tile} px is below the minimum of {factor} px: a tile must hold at least one "
                         f"latent pixel, and this model downsamples by {factor}")
    if tile % factor:
        lower, upper = tile // factor * factor, (tile // factor + 1) * factor
        raise UsageError(f"tile {tile} px is not a multiple of the downsampling factor {factor} "
                         f"(tile edges must fall between latent pixels): use {lower} or {upper}")


def _factor(plan: Sequence[Layer]) -> int:
    """The downsampling factor of the model a coder's plan belongs to."""
    f = plan_factor(plan)
    return int(1 / f) if f < 1 else int(f)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def free_memory_bytes(device: torch.device, ram_limit_bytes: int | None = None) -> int:
    """Free memory of ``device``: CUDA's own count, or on the CPU ``ram_limit_bytes`` (else what the OS reports)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return ram_limit_bytes if ram_limit_bytes is not None else psutil.virtual_memory().available


@dataclass(frozen=True)
class TilePlan:
    tile: int | None  # None: untiled
    offload: bool  # tiles kept in host memory between layers
    peak_bytes: int  # estimated
    recompute: bool = False  # decode: recompute the largest layers' inner maps (tiled_recompute)


def plan_tiling(plan: Sequence[Layer], batch: int, height: int, width: int, budget_bytes: int,
                element_size: int = 4, weight_bytes: int = 0, allow_offload: bool = False,
                device_type: str = "cpu") -> TilePlan:
    """Untiled if it fits ``budget_bytes``; else the largest exact tile that fits, storing every layer's
    maps, then (decode) recomputing the largest layers' instead, then with host offload where
    ``allow_offload``; else a UsageError saying how much would be needed.

    ``plan``: the encoder's or decoder's (``coder_plan``); ``height`` x ``width``: its input, the image
    for an encoder, the latent for a decoder.
    """
    kw = {"element_size": element_size, "weight_bytes": weight_bytes}
    untiled = untiled_peak_bytes(plan, batch, height, width, device_type=device_type, **kw)
    if untiled <= budget_bytes:
        return TilePlan(None, False, untiled)
    direction = "encode" if _is_encode(plan) else "decode"
    factor = _factor(plan)
    tiles = [t for t in TILE_CANDIDATES if t >= factor and t % factor == 0]
    best = None
    for offload in (False, True) if allow_offload else (False,):
        for recompute in (False, True) if direction == "decode" else (False,):
            for tile in tiles:
                peak = tiled_peak_bytes(plan, batch, height, width, tile, offload=offload, recompute=recompute, **kw)
                if peak <= budget_bytes:
                    return TilePlan(tile, offload, peak, recompute)
                best = peak if best is None else min(best, peak)
    size = f"{height}x{width}" + (" latent" if direction == "decode" else " image")
    raise UsageError(f"{direction} of a batch of {batch} {size} needs about {gib(best)} even tiled "
                     f"(untiled: {gib(untiled)}), over the memory budget of {gib(budget_bytes)}")


def check_budget(plan: Sequence[Layer], batch: int, height: int, width: int, tile: int,
                 budget_bytes: int, element_size: int = 4, weight_bytes: int = 0, offload: bool = False,
                 recompute: bool = False) -> int:
    """The estimated tiled peak, or a UsageError saying how much is needed when it exceeds ``budget_bytes``."""
    peak = tiled_peak_bytes(plan, batch, height, width, tile, element_size=element_size,
                            offload=offload, weight_bytes=weight_bytes, recompute=recompute)
    if peak > budget_bytes:
        direction = "encode" if _is_encode(plan) else "decode"
        size = f"{height}x{width}" + (" latent" if direction == "decode" else " image")
        raise UsageError(f"tiled {direction} of a batch of {batch} {size} with {tile} px tiles needs about "
                         f"{gib(peak)}, over the memory budget of {gib(budget_bytes)}")
    return peak
