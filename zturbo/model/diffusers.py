"""diffusers' model folder format, both ways: config.json fields (AutoencoderKL, AutoencoderKLFlux2,
AutoencoderTiny) and weight files.

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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zturbo.model.config import ModelConfig, TinyConfig, format_validation_error
from zturbo.model.errors import CheckpointError
from zturbo.model.files import atomic_path

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
AUTOENCODER_KL_CLASS = "AutoencoderKL"
FLUX2_CLASS = "AutoencoderKLFlux2"
TINY_CLASS = "AutoencoderTiny"
CLASS_NAMES = (AUTOENCODER_KL_CLASS, FLUX2_CLASS, TINY_CLASS)
# AutoencoderTiny's settings that this implementation has one value of.
_TINY_FIXED = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2}
_TINY_OWN = ("vae_scale", "vae_shift", "sample_size")  # TinyConfig's fields AutoencoderTiny does not take
_FLUX2_DEFAULTS: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 32,
    "norm_num_groups": 32,
    "patch_size": [2, 2],
    "batch_norm_eps": 1e-4,
    "batch_norm_momentum": 0.1,
}
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
# Attention parameter names of diffusers checkpoints written before the Attention refactor.
_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _package_version() -> str:
    try:
        return metadata.version("zturbo")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def config_from_diffusers(data: dict[str, Any]) -> ModelConfig | TinyConfig:
    """Our config from a diffusers (or zturbo) config.json mapping: AutoencoderKL or AutoencoderKLFlux2
    (a ModelConfig), or AutoencoderTiny (a TinyConfig)."""
    cls_name = data.get("_class_name", "AutoencoderKL")
    if cls_name not in CLASS_NAMES:
        raise CheckpointError(f"config.json describes a '{cls_name}', not an AutoencoderKL, AutoencoderKLFlux2 "
                              "or AutoencoderTiny")
    if cls_name == TINY_CLASS:
        return _tiny_config_from_diffusers(data)
    if cls_name == FLUX2_CLASS:
        # AutoencoderKLFlux2's own defaults for keys a config.json may leave out.
        data = {**_FLUX2_DEFAULTS, **{k: v for k, v in data.items() if v is not None}}
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
    for key in ("decoder_block_out_channels", "patch_size", "latents_mean", "latents_std"):
        if fields.get(key) is not None:
            fields[key] = list(fields[key])
    if cls_name == AUTOENCODER_KL_CLASS:
        fields.pop("patch_size", None)  # AutoencoderKL has no latent normaliser, whatever the file says
    try:
        return ModelConfig(**fields)
    except ValidationError as exc:
        raise CheckpointError(f"config.json is not a valid model config: {format_validation_error(exc)}") from exc


def _tiny_config_from_diffusers(data: dict[str, Any]) -> TinyConfig:
    for key, expected in _TINY_FIXED.items():
        if data.get(key, expected) != expected:
            raise CheckpointError(f"unsupported {key} {data[key]!r} in an AutoencoderTiny config.json (only {expected!r})")
    data = {**data, **{name: data[f"_{name}"] for name in _TINY_OWN if f"_{name}" in data}}
    fields = {k: v for k, v in data.items() if k in TinyConfig.model_fields and k != "architecture" and v is not None}
    for key in ("encoder_block_out_channels", "decoder_block_out_channels", "num_encoder_blocks", "num_decoder_blocks"):
        if key in fields:
            fields[key] = list(fields[key])
    if isinstance(fields.get("sample_size"), (list, tuple)):
        fields["sample_size"] = int(fields["sample_size"][0])
    try:
        return TinyConfig(**fields)
    except ValidationError as exc:
        raise CheckpointError(f"config.json is not a valid model config: {format_validation_error(exc)}") from exc


def diffusers_class(cfg: ModelConfig | TinyConfig) -> str:
    """The diffusers class that holds ``cfg``: AutoencoderTiny for the tiny family, AutoencoderKLFlux2 with
    FLUX.2's latent normaliser, else AutoencoderKL."""
    if isinstance(cfg, TinyConfig):
        return TINY_CLASS
    return FLUX2_CLASS if cfg.patch_size is not None else AUTOENCODER_KL_CLASS


def tiny_config_to_diffusers(cfg: TinyConfig) -> dict[str, Any]:
    """The config.json ``diffusers.AutoencoderTiny.from_pretrained`` reads for ``cfg``, plus the teacher's
    factors and the sample size under ``_vae_scale``, ``_vae_shift``, ``_sample_size``."""
    return {
        "_class_name": TINY_CLASS,
        "_diffusers_version": "0.30.0",
        "_zturbo_version": _package_version(),
        **_TINY_FIXED,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "encoder_block_out_channels": list(cfg.encoder_block_out_channels),
        "decoder_block_out_channels": list(cfg.decoder_block_out_channels),
        "num_encoder_blocks": list(cfg.num_encoder_blocks),
        "num_decoder_blocks": list(cfg.num_decoder_blocks),
        "latent_channels": cfg.latent_channels,
        "latent_magnitude": cfg.latent_magnitude,
        "latent_shift": cfg.latent_shift,
        "force_upcast": False,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor,
        # Fields AutoencoderTiny has not: diffusers skips keys that start with "_" without a warning.
        **{f"_{name}": getattr(cfg, name) for name in _TINY_OWN},
    }


def config_to_diffusers(cfg: ModelConfig | TinyConfig) -> dict[str, Any]:
    """The config.json that ``diffusers.<diffusers_class(cfg)>.from_pretrained`` reads for ``cfg``.

    An AutoencoderKL whose decoder widths differ from its encoder's has no diffusers class:
    its config.json says AutoencoderKL and adds ``decoder_block_out_channels``, which
    zturbo reads and diffusers' AutoencoderKL ignores, so diffusers refuses the decoder's
    weights (their shapes do not match) rather than loading something else. Pipelines take
    such a model through ``zturbo.adapters.DiffusersVAE``.
    """
    if isinstance(cfg, TinyConfig):
        return tiny_config_to_diffusers(cfg)
    n = len(cfg.block_out_channels)
    out = {
        "_class_name": diffusers_class(cfg),
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
    if cfg.latents_mean is not None:
        out["latents_mean"] = list(cfg.latents_mean)
    if cfg.latents_std is not None:
        out["latents_std"] = list(cfg.latents_std)
    if cfg.decoder_block_out_channels is not None or cfg.patch_size is not None:
        out["decoder_block_out_channels"] = cfg.decoder_channels
    if cfg.patch_size is not None:
        out.update(
            patch_size=list(cfg.patch_size),
            batch_norm_eps=cfg.batch_norm_eps,
            batch_norm_momentum=cfg.batch_norm_momentum,
        )
        # Fields AutoencoderKLFlux2 does not take, written only when they carry information.
        unused = {"scaling_factor": 1.0, "shift_factor": 0.0, "latents_mean": None, "latents_std": None}
        out = {k: v for k, v in out.items() if k != "force_upcast" and (k not in unused or v != unused[k])}
    return out


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


def update_weights(folder: Path, updates: dict[str, torch.Tensor]) -> Path:
    """Replace the named tensors of a model folder's weights file, atomically; the rest stay byte for byte.

    Each new value takes the stored tensor's dtype and must have its shape. The folder's
    weights must be one safetensors file (what ``save_pretrained`` writes here and in diffusers).
    """
    files = weight_files(folder)
    if len(files) != 1 or files[0].suffix != ".safetensors":
        raise CheckpointError(
            f"{folder} keeps its weights in {', '.join(p.name for p in files)}; only a single safetensors file "
            "can be updated in place",
            "convert it with `zturbo import-diffusers` first",
        )
    path = files[0]
    try:
        with safe_open(str(path), framework="pt") as fh:
            file_meta = fh.metadata()
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError / OSError on truncation
        raise CheckpointError(f"cannot read weights {path}: {str(exc).splitlines()[0]} (truncated or corrupt?)") from exc
    for key, value in updates.items():
        stored = tensors.get(key)
        if stored is None or tuple(stored.shape) != tuple(value.shape):
            found = "missing" if stored is None else f"of shape {tuple(stored.shape)}"
            raise CheckpointError(f"{path} has no tensor {key} of shape {tuple(value.shape)} ({found})")
        tensors[key] = value.detach().to("cpu", stored.dtype).contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=file_meta)
    return path
