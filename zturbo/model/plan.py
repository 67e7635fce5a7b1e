"""The layer walk: each coder's layers in call order, the one description every engine reads.

    for layer in vae.decoder.plan():
        print(layer.kind, layer.name, layer.cin, layer.cout, layer.resolution)

A coder (an encoder or decoder of any family) is a chain of layers, each reading the previous
one's output. ``plan()`` lists them; the coder's own forward runs them in that order
(``run_layer``), and so do the engines built on the model: exact, recompute, fast and
patch-parallel tiling, the memory estimate, and pruning's site graph. Each layer module
describes itself (``add_to_plan(builder)``), so a change to the architecture (another ResNet in
a level, a second attention, a new family) is made in the module tree alone; every engine follows.

The kinds an engine has to know:

==============  =====================================================================================
``conv``        a 3x3 stride-1 convolution (zero padding 1); with ``norm``, GroupNorm + SiLU of the
                input first (the coders' output convolution)
``resnet``      ``ResnetBlock2D``: GroupNorm, SiLU, 3x3 conv, twice, plus the (1x1) shortcut
``attention``   ``Attention``: global single-head self-attention of the GroupNorm'd map, plus residual
``downsample``  ``Downsample2D``: stride-2 3x3 conv after (0, 1, 0, 1) zero padding
``upsample``    ``Upsample2D``: nearest x2 then a 3x3 conv
``local``       any other layer without global statistics: its output at a pixel depends only on its
                input within ``halo`` input pixels, computed with zero padding at the image's edges
                (``scale`` 1, 2 or 1/2). An engine computes it on a region of the input clipped to
                the image and grown by the halo elsewhere, and keeps the part the halo makes exact.
==============  =====================================================================================

Layers that hold global statistics (GroupNorm, attention) are the named kinds; everything
else can be ``local``, so a family built of plain convolutions, activations and resampling
(the tiny decoders) needs no engine changes at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

KINDS = ("conv", "resnet", "attention", "downsample", "upsample", "local")


@dataclass(frozen=True, eq=False)
class Layer:
    """One layer of a coder's walk."""

    kind: str  # one of KINDS
    name: str  # the module's path in the coder, e.g. "up_blocks.1.resnets.0"
    module: nn.Module
    cin: int
    cout: int
    resolution: Fraction  # the input's size relative to the coder's input (decoder: 1, 2, 4, ...)
    norm: nn.GroupNorm | None = None  # "conv": GroupNorm + SiLU of the input before the convolution
    scale: Fraction = Fraction(1)  # output size / input size
    halo: int = 0  # "local": input pixels on each side that one output pixel depends on
    inner: int = 0  # "local": channels of the widest intermediate map alive inside the layer

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"layer {self.name}: kind {self.kind!r} is not one of {', '.join(KINDS)}")

    @property
    def output_resolution(self) -> Fraction:
        return self.resolution * self.scale


class PlanBuilder:
    """Appends layers while tracking the resolution, for a coder's ``plan()``."""

    def __init__(self, coder: nn.Module):
        self.names = {id(m): n for n, m in coder.named_modules()}
        self.layers: list[Layer] = []
        self.resolution = Fraction(1)

    def add(self, kind: str, module: nn.Module, cin: int, cout: int, *, norm: nn.GroupNorm | None = None,
            scale: Fraction | int = 1, halo: int = 0, inner: int = 0) -> None:
        scale = Fraction(scale)
        self.layers.append(Layer(kind, self.names[id(module)], module, cin, cout, self.resolution, norm, scale,
                                 halo, inner))
        self.resolution *= scale


def run_layer(layer: Layer, x: torch.Tensor, norm_silu: Callable[[nn.GroupNorm, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``layer`` applied to ``x`` as the coder's forward computes it; ``norm_silu`` applies a "conv" layer's norm."""
    if layer.norm is not None:
        x = norm_silu(layer.norm, x)
    return layer.module(x)


def plan_factor(plan: list[Layer]) -> Fraction:
    """Output size / input size of the whole coder: 1/8 for an encoder of factor 8, 8 for its decoder."""
    return plan[-1].output_resolution if plan else Fraction(1)
