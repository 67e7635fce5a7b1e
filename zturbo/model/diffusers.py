"""diffusers' AutoencoderKL format, both ways: config.json fields and weight files.

Our state dict already uses diffusers' key layout, so converting is a matter of
the config mapping and of reading every weight-file form diffusers writes
(safetensors, sharded safetensors with an index, weights-only ``.bin``, and the
attention names of checkpoints written before diffusers' Attention refactor).
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from zturbo.model.config import ModelConfig, format_validation_error
from zturbo.model.errors import CheckpointError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
# Attention parameter names of diffusers checkpoints written before the Attention refactor.
_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _package_version() -> str:
    try:
        return metadata.version("zturbo")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def config_from_diffusers(data: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig from a diffusers (or zturbo) config.json mapping."""
    cls_name = data.get("_class_name", "AutoencoderKL")
    if cls_name != "AutoencoderKL":
        raise CheckpointError(f"config.json describes a '{cls_name}', not an AutoencoderKL")
    if data.get("act_fn", "silu") != "silu":
        raise CheckpointError(f"unsupported act_fn '{data['act_fn']}' (only silu)")
    for key, expected in _BLOCK_TYPES.items():
        kinds = set(data.get(key) or [expected])
        if kinds != {expected}:
            raise CheckpointError(f"unsupported {key} {sorted(kinds)} (only {expected})")
    fields = {k: v for k, v in data.items() if k in ModelConfig.model_fields}
    if fields.get("shift_factor") is None:
        fields.pop("shift_factor", None)
    if isinstance(fields.get("sample_size"), (list, tuple)):
        fields["sample_size"] = int(fields["sample_size"][0])
    try:
        return ModelConfig(**fields)
    except ValidationError as exc:
        raise CheckpointError(f"config.json is not a valid model config: {format_validation_error(exc)}") from exc


def config_to_diffusers(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json that ``diffusers.AutoencoderKL.from_pretrained`` reads for ``cfg``."""
    n = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.30.0",
        "_zturbo_version": _package_version(),
        "act_fn": "silu",
        "block_out_channels": list(cfg.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "latent_channels": cfg.latent_channels,
        "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": cfg.norm_num_groups,
        "sample_size": cfg.sample_size,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_post_quant_conv,
        "mid_block_add_attention": cfg.mid_block_add_attention,
    }


def read_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {directory}", "give a folder written by save_pretrained or diffusers")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is corrupt: expected a JSON object")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder: the shards an index names, else the first file found."""
    folder = Path(folder)
    index = folder / _INDEX_NAME
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index} is corrupt: {exc}") from exc
        return [folder / s for s in shards]
    for pattern in (WEIGHTS_NAME, "model.safetensors", "diffusion_pytorch_model.*.safetensors", "*.safetensors"):
        found = sorted(folder.glob(pattern))
        if found:
            return found[:1]
    found = sorted(folder.glob("diffusion_pytorch_model*.bin"))
    if found:
        return found[:1]
    raise CheckpointError(f"no weights in {folder} (looked for diffusion_pytorch_model*.safetensors / .bin)")


def read_weights(folder: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, in the dtype stored, with legacy attention names renamed."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            if path.suffix == ".safetensors":
                part = load_file(str(path), device=str(map_location))
            else:
                part = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # safetensors raises SafetensorError / OSError on truncation
            raise CheckpointError(f"cannot read weights {path}: {str(exc).splitlines()[0]} (truncated or corrupt?)") from exc
        state.update(part)
    renamed = {}
    for key, value in state.items():
        for old, new in _LEGACY_ATTENTION.items():
            key = key.replace(old, new)
        renamed[key] = value
    return renamed
