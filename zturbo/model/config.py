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
    layers_per_block: int = Field(2, ge=1, le=8)
    latent_channels: int = Field(8, ge=1, le=256)
    norm_num_groups: int = Field(32, ge=1)
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = Field(1.0, gt=0)
    shift_factor: float = 0.0
    sample_size: int = Field(1024, ge=8)

    @field_validator("block_out_channels")
    @classmethod
    def _positive_channels(cls, value: list[int]) -> list[int]:
        if any(c <= 0 for c in value):
            raise ValueError("every channel count must be positive")
        return value

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> "ModelConfig":
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {bad} not divisible by norm_num_groups={self.norm_num_groups} "
                "(GroupNorm needs channels divisible by the group count)"
            )
        return self

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


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
