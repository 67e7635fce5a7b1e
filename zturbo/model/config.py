"""The model's own configuration: the architecture, with diffusers' config.json field names.

The application settings (``zturbo.config``) embed it as their ``model`` section.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ModelConfig(BaseModel):
    """AutoencoderKL architecture. Field names match diffusers' config.json."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

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
    def _groups_divide_channels(self) -> "ModelConfig":
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


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: 'section.field: message (got value)'."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        got = err.get("input")
        shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}{shown}")
    return "; ".join(lines)
