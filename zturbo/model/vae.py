"""The zturbo VAE: diffusers' AutoencoderKL architecture, state-dict compatible.

    vae = VAE(ModelConfig(block_out_channels=[96, 192, 384, 384], latent_channels=8))
    z = vae.encode(x).mode()          # x in [-1, 1], (B, 3, H, W)
    x_hat = vae.decode(z)
    x_hat = vae.decode(z, tile=256)   # exact tiled decode, bounded memory (zturbo.tiling)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from zturbo.model.blocks import (
    NORM_EPS,
    DownEncoderBlock,
    MidBlock,
    ResnetBlock2D,
    UpDecoderBlock,
    add_block,
    norm_silu,
)
from zturbo.model.config import ModelConfig
from zturbo.model.diffusers import (
    AUTOENCODER_KL_CLASS,
    CONFIG_NAME,
    WEIGHTS_NAME,
    config_from_diffusers,
    config_to_diffusers,
    read_config,
    read_weights,
)
from zturbo.model.errors import CheckpointError, UsageError
from zturbo.model.files import atomic_path, atomic_write_text
from zturbo.model.kernels import Kernels
from zturbo.model.plan import Layer, PlanBuilder, run_layer


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, exp(logvar)), logvar clamped to [-30, 20]."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent dimensions, one value per sample."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class _Coder(nn.Module):
    """An encoder or decoder: its layers in ``plan()`` order, each checkpointed on its own when asked."""

    gradient_checkpointing = False
    kernels: Kernels

    def plan(self) -> list[Layer]:
        """The layers in call order (``zturbo.model.plan``): what ``forward`` runs and every engine reads."""
        b = PlanBuilder(self)
        b.add("conv", self.conv_in, self.conv_in.in_channels, self.conv_in.out_channels)
        for block in self.blocks():
            add_block(b, block)
        b.add("conv", self.conv_out, self.conv_out.in_channels, self.conv_out.out_channels, norm=self.conv_norm_out)
        return b.layers

    def _norm_silu(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        return norm_silu(norm, x, self.gradient_checkpointing and self.training, self.kernels.group_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each layer in turn. With gradient checkpointing, each block layer (ResNet, attention,
        resampler) is checkpointed on its own rather than per block: recomputing a whole block for its
        backward holds all of its layers' activations at once, which at 2048 px (three ResNets of 96
        channels at full resolution) is most of the step's peak memory."""
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.plan():
            if checkpointing and layer.kind != "conv":
                x = checkpoint(layer.module, x, use_reentrant=False)
            else:
                x = run_layer(layer, x, self._norm_silu)
        return x


class Encoder(_Coder):
    def __init__(self, cfg: ModelConfig, kernels: Kernels | None = None):
        super().__init__()
        self.kernels = kernels = kernels or Kernels()
        ch = cfg.block_out_channels
        g = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        prev = ch[0]
        for i, out in enumerate(ch):
            self.down_blocks.append(
                DownEncoderBlock(prev, out, cfg.layers_per_block, g, add_downsample=i < len(ch) - 1, kernels=kernels))
            prev = out
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, kernels)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def blocks(self) -> list[nn.Module]:
        return [*self.down_blocks, self.mid_block]


class Decoder(_Coder):
    def __init__(self, cfg: ModelConfig, kernels: Kernels | None = None):
        super().__init__()
        self.kernels = kernels = kernels or Kernels()
        ch = list(reversed(cfg.decoder_channels))
        g = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention, kernels)
        self.up_blocks = nn.ModuleList()
        prev = ch[0]
        for i, out in enumerate(ch):
            self.up_blocks.append(
                UpDecoderBlock(prev, out, cfg.layers_per_block + 1, g, add_upsample=i < len(ch) - 1, kernels=kernels))
            prev = out
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def blocks(self) -> list[nn.Module]:
        return [self.mid_block, *self.up_blocks]


class Tiler(Protocol):
    """What ``encode`` / ``decode`` with ``tile=`` call: ``zturbo.tiling`` installs itself as ``Autoencoder.tiler``."""

    def encode_moments(self, vae: nn.Module, x: torch.Tensor, tile: int | str, mode: str, **options: Any) -> torch.Tensor: ...

    def decode(self, vae: nn.Module, z: torch.Tensor, tile: int | str, mode: str, **options: Any) -> torch.Tensor: ...


class Autoencoder(nn.Module):
    """What every family shares (``VAE``, ``zturbo.model.tiny.TinyVAE``): a ``config``, ``kernels``, an
    ``encoder`` and a ``decoder`` with layer plans, the tiled passes, and diffusers' folder layout."""

    # The tiled engines live above the model (``zturbo.tiling``, which sets this when the package is imported).
    tiler: ClassVar[Tiler | None] = None
    config_class: ClassVar[type]
    diffusers_class: ClassVar[str]  # the diffusers model this family's folders and configs are
    kernels: Kernels

    @classmethod
    def resolve_config(cls, config: Any, overrides: dict[str, Any]) -> Any:
        """``config`` (a config of this family, a dict of its fields, or None) with ``overrides`` applied;
        a config of another family is refused in one line."""
        if config is None or isinstance(config, dict):
            config = cls.config_class(**{**(config or {}), **overrides})
        elif overrides:
            config = cls.config_class(**{**config.model_dump(), **overrides})
        if not isinstance(config, cls.config_class):
            raise UsageError(f"{cls.__name__} takes an {cls.diffusers_class} config, not a {type(config).__name__}",
                             "build any family's model with zturbo.model.build_model")
        return config

    def _tiler(self) -> Tiler:
        if self.tiler is None:
            raise UsageError("tiled encode and decode need the zturbo.tiling package: import zturbo")
        return self.tiler

    def set_kernels(self, **choices: str) -> dict[str, str]:
        """Choose how this model computes upsampling, attention and GroupNorm (``Kernels``); returns the
        previous choices."""
        return self.kernels.set(**choices)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def diffusers_config(self) -> dict[str, Any]:
        return config_to_diffusers(self.config)

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (diffusers' layout), atomically.

        Weights first, config last: a folder with a config.json always has its weights.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = state_dict if state_dict is not None else self.state_dict()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        atomic_write_text(directory / CONFIG_NAME, json.dumps(self.diffusers_config(), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu"):
        """Load a folder written by ``save_pretrained`` here or by diffusers (any of its weight-file forms)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"model folder not found: {directory}")
        config = config_from_diffusers(read_config(directory))
        if not isinstance(config, cls.config_class):
            raise CheckpointError(f"{directory} holds a {config_to_diffusers(config)['_class_name']}, not a model "
                                  f"{cls.__name__} loads", "load it with zturbo.model.load_pretrained")
        state = read_weights(directory, map_location)
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=map_location)
        load_state_dict_strict(model, state, str(directory))
        return model.eval()


class VAE(Autoencoder):
    """AutoencoderKL with diffusers-identical parameter names and shapes.

    ``kernels`` (``zturbo.model.kernels.Kernels``) says how this model computes its upsampling,
    attention and GroupNorm; ``set_kernels`` changes it for every layer at once.
    """

    config_class = ModelConfig
    diffusers_class = AUTOENCODER_KL_CLASS

    def __init__(self, config: ModelConfig | dict[str, Any] | None = None, **overrides: Any):
        super().__init__()
        self.config = config = self.resolve_config(config, overrides)
        lat = config.latent_channels
        self.kernels = Kernels()
        self.encoder = Encoder(config, self.kernels)
        self.decoder = Decoder(config, self.kernels)
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lat, lat, 1) if config.use_post_quant_conv else None
        if config.patch_size is not None:
            # FLUX.2's latent normaliser: only its running statistics are used (by pipelines, and by
            # normalize_latents here), never in encode / decode, exactly as in AutoencoderKLFlux2.
            self.bn = nn.BatchNorm2d(
                math.prod(config.patch_size) * lat,
                eps=config.batch_norm_eps,
                momentum=config.batch_norm_momentum,
                affine=False,
                track_running_stats=True,
            )

    # -- inference API ---------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, tile: int | str | None = None, tile_mode: str = "exact",
               **tiling: Any) -> DiagonalGaussian:
        """q(z|x). With ``tile`` (pixels, or "auto"), computed over tiles without autograd: ``tile_mode``
        "exact" equals the untiled result, "fast" approximates it in one pass per tile. ``tiling``:
        ``memory_budget`` (bytes), ``offload``, ``halo``, ``stats_size`` (see ``zturbo.tiling``)."""
        if tile is not None:
            return DiagonalGaussian(self._tiler().encode_moments(self, x, tile, tile_mode, **tiling))
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor, tile: int | str | None = None, tile_mode: str = "exact",
               **tiling: Any) -> torch.Tensor:
        """The image. ``tile``: output tile side in pixels (a multiple of the downsampling factor) or
        "auto"; ``tile_mode`` and ``tiling`` as for ``encode``, plus ``recompute`` (exact mode, least memory)."""
        if tile is not None:
            return self._tiler().decode(self, z, tile, tile_mode, **tiling)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latent as a diffusion model sees it: (z - shift) * scale."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.config.scaling_factor + self.config.shift_factor

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The latent as the diffusion model sees it: with FLUX.2's normaliser, patchified and
        standardised by ``bn``'s running statistics (as diffusers' Flux2 pipelines do), else ``scale_latents``."""
        if self.config.patch_size is None:
            return self.scale_latents(z)
        z = patchify_latents(z, self.config.patch_size)
        mean, std = self._bn_stats(z)
        return (z - mean) / std

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of ``normalize_latents``: what ``decode`` takes."""
        if self.config.patch_size is None:
            return self.unscale_latents(z)
        mean, std = self._bn_stats(z)
        return unpatchify_latents(z * std + mean, self.config.patch_size)

    def _bn_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.config.batch_norm_eps).to(z.device, z.dtype)
        return mean, std

    # -- training helpers ------------------------------------------------------------------------------
    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in the backward instead of keeping them: each block layer's
        (per layer, see ``_Coder.forward``) and each GroupNorm+SiLU's output."""
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled
        for module in self.modules():
            if isinstance(module, ResnetBlock2D):
                module.checkpoint_norms = enabled


def patchify_latents(z: torch.Tensor, patch: list[int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C*ph*pw, H/ph, W/pw), channel-major then row then column, as FLUX.2's pipelines."""
    b, c, h, w = z.shape
    ph, pw = patch
    z = z.view(b, c, h // ph, ph, w // pw, pw).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * ph * pw, h // ph, w // pw)


def unpatchify_latents(z: torch.Tensor, patch: list[int]) -> torch.Tensor:
    b, c, h, w = z.shape
    ph, pw = patch
    z = z.reshape(b, c // (ph * pw), ph, pw, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c // (ph * pw), h * ph, w * pw)


def load_state_dict_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(state)``, with one line naming what does not match."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise CheckpointError(f"weights in {source} do not match its config: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
