"""The tiny family: diffusers' ``AutoencoderTiny`` (madebyollin's TAESD, TAESDXL, TAESD3, TAEF1), state-dict compatible.

    vae = TinyVAE(TinyConfig(latent_channels=16))
    z = vae.encode(x).mode()          # x in [-1, 1]; z: the teacher's latent as the diffusion model sees it
    x_hat = vae.decode(z)             # decode(z, tile=256): exact tiled decode (zturbo.tiling)

Keys are diffusers' (``encoder.layers.N...``, ``decoder.layers.N...``); madebyollin's own files
number the decoder from 1 (its ``Clamp`` is layer 0) and ``zturbo.export.taesd`` writes them.
Every layer is a plain convolution, ReLU, nearest upsampling or a pointwise map, so each one
describes itself to the layer plan as ``local`` and every tiled engine runs it unchanged.

The coders compute in channels-last: on the CPU a 64-channel 3x3 convolution runs about 1.4x
faster in that layout (oneDNN, 512 px TAEF1-shape decode, one thread), and on CUDA cuDNN prefers it
too; only the small latent and 3-channel image are converted.
"""

from __future__ import annotations

from abc import abstractmethod
from fractions import Fraction
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from zturbo.model.config import TinyConfig
from zturbo.model.diffusers import TINY_CLASS
from zturbo.model.errors import UsageError
from zturbo.model.kernels import Kernels
from zturbo.model.plan import Layer, PlanBuilder
from zturbo.model.vae import Autoencoder


class Conv(nn.Conv2d):
    """A 3x3 convolution with zero padding 1 (stride 1 or 2); reads its input within one pixel."""

    def __init__(self, cin: int, cout: int, stride: int = 1, bias: bool = True):
        super().__init__(cin, cout, 3, stride=stride, padding=1, bias=bias)

    def add_to_plan(self, plan: PlanBuilder) -> None:
        plan.add("local", self, self.in_channels, self.out_channels, scale=Fraction(1, self.stride[0]), halo=1)


class ReLU(nn.ReLU):
    """In place: it only ever follows a convolution, whose backward does not need that output."""

    def __init__(self) -> None:
        super().__init__(inplace=True)

    def add_to_plan(self, plan: PlanBuilder) -> None:
        channels = plan.layers[-1].cout
        plan.add("local", self, channels, channels)


class NearestUpsample(nn.Upsample):
    def __init__(self) -> None:
        super().__init__(scale_factor=2, mode="nearest")

    def add_to_plan(self, plan: PlanBuilder) -> None:
        channels = plan.layers[-1].cout
        plan.add("local", self, channels, channels, scale=2)


class Pointwise(nn.Module):
    """A map applied to each value alone: the decoder's clamp, and the [-1, 1] <-> [0, 1] image ranges."""

    def __init__(self, kind: str, channels: int):
        super().__init__()
        self.kind, self.channels = kind, channels

    def add_to_plan(self, plan: PlanBuilder) -> None:
        plan.add("local", self, self.channels, self.channels)

    def extra_repr(self) -> str:
        return self.kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "clamp":  # TAESD's soft clamp of the latent to (-3, 3)
            return torch.tanh(x / 3) * 3
        if self.kind == "to_unit":  # images in [-1, 1] -> TAESD's [0, 1]
            return x.add(1).div(2)
        return x.mul(2).sub(1)  # "from_unit"


class TinyBlock(nn.Module):
    """``AutoencoderTinyBlock``: three 3x3 convolutions with ReLUs between, plus the (1x1) skip, then a ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(Conv(cin, cout), ReLU(), Conv(cout, cout), ReLU(), Conv(cout, cout))
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.fuse = nn.ReLU()

    def add_to_plan(self, plan: PlanBuilder) -> None:
        plan.add("local", self, self.conv[0].in_channels, self.conv[-1].out_channels, halo=3,
                 inner=self.conv[0].out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if torch.is_grad_enabled():
            return self.fuse(h + self.skip(x))
        return h.add_(self.skip(x)).relu_()


class _TinyCoder(nn.Module):
    """A chain of layers (pointwise maps around ``layers``): the plan lists them, the forward runs them in
    channels-last."""

    gradient_checkpointing = False
    kernels: Kernels

    @abstractmethod
    def chain(self) -> list[nn.Module]:
        """The layers in order, the pointwise maps at either end included."""

    def plan(self) -> list[Layer]:
        b = PlanBuilder(self)
        for module in self.chain():
            module.add_to_plan(b)
        return b.layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        x = x.contiguous(memory_format=torch.channels_last)
        for module in self.chain():
            x = checkpoint(module, x, use_reentrant=False) if checkpointing and isinstance(module, TinyBlock) else module(x)
        return x.contiguous()


class TinyEncoder(_TinyCoder):
    """diffusers' ``EncoderTiny``: images in [-1, 1] to the latent."""

    def __init__(self, cfg: TinyConfig, kernels: Kernels | None = None):
        super().__init__()
        self.kernels = kernels or Kernels()
        layers: list[nn.Module] = []
        for i, (width, blocks) in enumerate(zip(cfg.encoder_block_out_channels, cfg.num_encoder_blocks)):
            layers.append(Conv(cfg.in_channels, width) if i == 0 else Conv(width, width, stride=2, bias=False))
            layers.extend(TinyBlock(width, width) for _ in range(blocks))
        layers.append(Conv(cfg.encoder_block_out_channels[-1], cfg.latent_channels))
        self.to_unit = Pointwise("to_unit", cfg.in_channels)
        self.layers = nn.Sequential(*layers)

    def chain(self) -> list[nn.Module]:
        return [self.to_unit, *self.layers]


class TinyDecoder(_TinyCoder):
    """diffusers' ``DecoderTiny``: the latent, clamped, to images in [-1, 1]."""

    def __init__(self, cfg: TinyConfig, kernels: Kernels | None = None):
        super().__init__()
        self.kernels = kernels or Kernels()
        widths, counts = cfg.decoder_block_out_channels, cfg.num_decoder_blocks
        layers: list[nn.Module] = [Conv(cfg.latent_channels, widths[0]), ReLU()]
        for i, (width, blocks) in enumerate(zip(widths, counts)):
            last = i == len(widths) - 1
            layers.extend(TinyBlock(width, width) for _ in range(blocks))
            if not last:
                layers.append(NearestUpsample())
            layers.append(Conv(width, cfg.out_channels if last else width, bias=last))
        self.clamp = Pointwise("clamp", cfg.latent_channels)
        self.layers = nn.Sequential(*layers)
        self.from_unit = Pointwise("from_unit", cfg.out_channels)

    def chain(self) -> list[nn.Module]:
        return [self.clamp, *self.layers, self.from_unit]

    @property
    def conv_out(self) -> nn.Conv2d:
        """The last convolution (the one the adaptive GAN weight reads), as the AutoencoderKL decoder names it."""
        return self.layers[-1]


class TinyLatent:
    """The tiny encoder's output as a posterior without spread: ``mean``, ``mode()`` and ``sample()`` are the latent."""

    def __init__(self, latent: torch.Tensor):
        self.mean = latent

    @property
    def std(self) -> torch.Tensor:
        return torch.zeros_like(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean


class TinyVAE(Autoencoder):
    """AutoencoderTiny with diffusers-identical parameter names and shapes, and the interface of ``VAE``.

    It has no quant convs (``quant_conv`` / ``post_quant_conv`` are None, as the tiled engines read them).
    ``from_teacher_latents`` / ``to_teacher_latents`` convert between the teacher's raw latent and this
    model's (``config.vae_scale`` / ``vae_shift``); ``scale_latents`` and ``normalize_latents`` give the
    latent as the diffusion model sees it, as on ``VAE``.
    """

    config_class = TinyConfig
    diffusers_class = TINY_CLASS
    quant_conv = None
    post_quant_conv = None

    def __init__(self, config: TinyConfig | dict[str, Any] | None = None, **overrides: Any):
        super().__init__()
        self.config = config = self.resolve_config(config, overrides)
        self.kernels = Kernels()  # no layer of this family has a kernel choice; the tiled engines read it
        self.encoder = TinyEncoder(config, self.kernels)
        self.decoder = TinyDecoder(config, self.kernels)

    def encode(self, x: torch.Tensor, tile: int | str | None = None, tile_mode: str = "exact",
               **tiling: Any) -> TinyLatent:
        """The latent of images ``x`` in [-1, 1]; ``tile`` and ``tiling`` as for ``VAE.encode``."""
        if tile is not None:
            f = self.config.downsample_factor
            if x.shape[-2] % f or x.shape[-1] % f:
                # Its stride-2 convolutions pad both sides: an odd side gives a rounded-up row the tiles do not hold.
                raise UsageError(f"tiled encode of a tiny model takes sides that are multiples of {f}, "
                                 f"not {x.shape[-2]}x{x.shape[-1]}", "pad the image, or encode it untiled")
            return TinyLatent(self._tiler().encode_moments(self, x, tile, tile_mode, **tiling))
        return TinyLatent(self.encoder(x))

    def decode(self, z: torch.Tensor, tile: int | str | None = None, tile_mode: str = "exact",
               **tiling: Any) -> torch.Tensor:
        """Images in about [-1, 1]; ``tile`` and ``tiling`` as for ``VAE.decode``."""
        if tile is not None:
            return self._tiler().decode(self, z, tile, tile_mode, **tiling)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.encode(x).mode())

    def from_teacher_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The teacher's raw latent as this model encodes and decodes it: ``(z - vae_shift) * vae_scale``."""
        return (z - self.config.vae_shift) * self.config.vae_scale

    def to_teacher_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.config.vae_scale + self.config.vae_shift

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latent as a diffusion model sees it: (z - shift) * scale (the identity for the TAESD family's 1 and 0)."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.config.scaling_factor + self.config.shift_factor

    normalize_latents = scale_latents
    denormalize_latents = unscale_latents

    def to_unit_range(self, z: torch.Tensor) -> torch.Tensor:
        """A latent in [0, 1] for 8-bit storage (diffusers' ``AutoencoderTiny.scale_latents``)."""
        return z.div(2 * self.config.latent_magnitude).add(self.config.latent_shift).clamp(0, 1)

    def from_unit_range(self, z: torch.Tensor) -> torch.Tensor:
        return z.sub(self.config.latent_shift).mul(2 * self.config.latent_magnitude)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's inner maps in the backward instead of keeping them."""
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled
