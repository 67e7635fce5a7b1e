"""The models' own configurations: the architectures, with diffusers' config.json field names.

Two families: ``ModelConfig`` (AutoencoderKL, ``architecture = "kl"``, the default) and
``TinyConfig`` (AutoencoderTiny, the TAESD family, ``architecture = "tiny"``). The application
settings (``zturbo.config``) embed either as their ``model`` section (``AnyModelConfig``: the
``architecture`` key decides, "kl" when absent).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)


class ModelConfig(BaseModel):
    """AutoencoderKL architecture. Field names match diffusers' config.json."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    architecture: Literal["kl"] = "kl"
    in_channels: int = Field(3, ge=1)
    out_channels: int = Field(3, ge=1)
    block_out_channels: list[int] = Field(default_factory=lambda: [96, 192, 384, 384], min_length=1, max_length=8)
    # The decoder's widths when they differ from the encoder's (a slim decoder in a teacher's
    # latent space); None: the same as block_out_channels.
    decoder_block_out_channels: list[int] | None = Field(None, min_length=1, max_length=8)
    layers_per_block: int = Field(2, ge=1, le=8)
    latent_channels: int = Field(8, ge=1, le=256)
    norm_num_groups: int = Field(32, ge=1)
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = Field(1.0, gt=0)
    shift_factor: float = 0.0
    sample_size: int = Field(1024, ge=8)
    # Per-channel latent statistics, as some pipelines read them (diffusers' latents_mean / latents_std).
    latents_mean: list[float] | None = None
    latents_std: list[float] | None = None
    # FLUX.2's latent normaliser (diffusers' AutoencoderKLFlux2): latents are patchified
    # patch_size[0] x patch_size[1] and normalised by a BatchNorm's running statistics (``bn``).
    # None: no such normaliser (AutoencoderKL).
    patch_size: list[int] | None = Field(None, min_length=2, max_length=2)
    batch_norm_eps: float = Field(1e-4, gt=0)
    batch_norm_momentum: float = Field(0.1, ge=0, le=1)

    @field_validator("block_out_channels", "decoder_block_out_channels", "patch_size")
    @classmethod
    def _positive_channels(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(c <= 0 for c in value):
            raise ValueError("every entry must be positive")
        return value

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> ModelConfig:
        for name in ("block_out_channels", "decoder_block_out_channels"):
            bad = [c for c in getattr(self, name) or [] if c % self.norm_num_groups]
            if bad:
                raise ValueError(
                    f"{name} {bad} not divisible by norm_num_groups={self.norm_num_groups} "
                    "(GroupNorm needs channels divisible by the group count)"
                )
        dec = self.decoder_block_out_channels
        if dec is not None and len(dec) != len(self.block_out_channels):
            raise ValueError(
                f"decoder_block_out_channels has {len(dec)} levels, block_out_channels {len(self.block_out_channels)} "
                "(the decoder must upsample by the factor the encoder downsamples)"
            )
        for name in ("latents_mean", "latents_std"):
            stats = getattr(self, name)
            if stats is not None and len(stats) != self.latent_channels:
                raise ValueError(f"{name} has {len(stats)} entries, latent_channels is {self.latent_channels}")
        return self

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def decoder_channels(self) -> list[int]:
        """The decoder's widths (encoder order, as in block_out_channels)."""
        return list(self.decoder_block_out_channels or self.block_out_channels)


class TinyConfig(BaseModel):
    """AutoencoderTiny (TAESD family) architecture. Field names match diffusers' config.json.

    The encoder is a 3x3 conv, then per level a stride-2 conv (after the first) and
    ``num_encoder_blocks[i]`` blocks; the decoder clamps its input (``tanh(z / 3) * 3``), then per
    level ``num_decoder_blocks[i]`` blocks and a nearest x2 upsample + conv (before the last).
    diffusers' blocks keep one width per coder, so every entry of a width list is the same.

    The latent it encodes to and decodes from is a teacher's as the diffusion model sees it:
    ``(z - vae_shift) * vae_scale`` of the teacher's raw latent ``z`` (the teacher's scaling and
    shift factors; ComfyUI's ``vae_scale`` / ``vae_shift``). Its own ``scaling_factor`` and
    ``shift_factor`` stay 1 and 0 (madebyollin's TAESD, TAESDXL, TAESD3 and TAEF1 configs), so
    diffusers' pipelines hand it their latents unchanged. ``latent_magnitude`` and ``latent_shift``
    map a latent to [0, 1] for 8-bit storage (diffusers' ``AutoencoderTiny.scale_latents``).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    architecture: Literal["tiny"] = "tiny"
    in_channels: int = Field(3, ge=1)
    out_channels: int = Field(3, ge=1)
    encoder_block_out_channels: list[int] = Field(default_factory=lambda: [64] * 4, min_length=1, max_length=8)
    decoder_block_out_channels: list[int] = Field(default_factory=lambda: [64] * 4, min_length=1, max_length=8)
    num_encoder_blocks: list[int] = Field(default_factory=lambda: [1, 3, 3, 3], min_length=1, max_length=8)
    num_decoder_blocks: list[int] = Field(default_factory=lambda: [3, 3, 3, 1], min_length=1, max_length=8)
    latent_channels: int = Field(4, ge=1, le=256)
    latent_magnitude: float = Field(3.0, gt=0)
    latent_shift: float = 0.5
    scaling_factor: float = Field(1.0, gt=0)
    shift_factor: float = 0.0
    vae_scale: float = Field(1.0, gt=0, description="the teacher's scaling factor (ComfyUI's vae_scale)")
    vae_shift: float = Field(0.0, description="the teacher's shift factor (ComfyUI's vae_shift)")
    sample_size: int = Field(1024, ge=8)

    @field_validator("encoder_block_out_channels", "decoder_block_out_channels")
    @classmethod
    def _one_width(cls, value: list[int]) -> list[int]:
        if any(c <= 0 for c in value):
            raise ValueError("every entry must be positive")
        if len(set(value)) > 1:
            raise ValueError("AutoencoderTiny keeps one width per coder (each level's blocks take the previous "
                             "level's output): give the same width for every level")
        return value

    @field_validator("num_encoder_blocks", "num_decoder_blocks")
    @classmethod
    def _block_counts(cls, value: list[int]) -> list[int]:
        if any(n < 0 or n > 16 for n in value):
            raise ValueError("block counts must be from 0 to 16")
        return value

    @model_validator(mode="after")
    def _levels_match(self) -> TinyConfig:
        for side in ("encoder", "decoder"):
            widths, blocks = getattr(self, f"{side}_block_out_channels"), getattr(self, f"num_{side}_blocks")
            if len(widths) != len(blocks):
                raise ValueError(f"{side}_block_out_channels has {len(widths)} levels, num_{side}_blocks {len(blocks)}")
        if len(self.encoder_block_out_channels) != len(self.decoder_block_out_channels):
            raise ValueError("the encoder and decoder must have as many levels (the decoder upsamples by the factor "
                             "the encoder downsamples)")
        return self

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_block_out_channels) - 1)


def _architecture(value: Any) -> str:
    """The family a model section describes: its ``architecture`` key, "kl" when it has none."""
    found = value.get("architecture", "kl") if isinstance(value, dict) else getattr(value, "architecture", "kl")
    return found if found in ("kl", "tiny") else "kl"  # an unknown value fails ModelConfig's Literal, named


AnyModelConfig = Annotated[
    Annotated[ModelConfig, Tag("kl")] | Annotated[TinyConfig, Tag("tiny")], Discriminator(_architecture)
]
_ANY = TypeAdapter(AnyModelConfig)
_TAGS = ("kl", "tiny")


def parse_model_config(fields: dict[str, Any]) -> ModelConfig | TinyConfig:
    """The config of either family from its fields (``architecture`` decides); ValidationError when invalid."""
    return _ANY.validate_python(fields)


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: 'section.field: message (got value)'."""
    lines = []
    for err in exc.errors():
        # A model section's family is a union tag in the location ("model.tiny.latent_channels"): left out.
        loc = ".".join(str(p) for p in err["loc"] if p not in _TAGS) or "config"
        got = err.get("input")
        shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}{shown}")
    return "; ".join(lines)
