"""Reading and writing model folders (diffusers' ``save_pretrained`` layout).

A model folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors``;
``diffusers.AutoencoderKL.from_pretrained`` reads ours and we read theirs.
``load_vae`` also accepts a training run folder or one of its checkpoints.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from zturbo.config import ModelConfig, format_validation_error
from zturbo.errors import CheckpointError
from zturbo.utils import atomic_path, atomic_write_text

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
_WEIGHT_CANDIDATES = (WEIGHTS_NAME, "model.safetensors", "diffusion_pytorch_model.bin")
_DIFFUSERS_BLOCKS = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
STEP_DIR = re.compile(r"^step-(\d+)$")


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig from a diffusers (or zturbo) config.json mapping."""
    cls_name = data.get("_class_name", "AutoencoderKL")
    if cls_name != "AutoencoderKL":
        raise CheckpointError(f"config.json describes a '{cls_name}', not an AutoencoderKL")
    if data.get("act_fn", "silu") != "silu":
        raise CheckpointError(f"unsupported act_fn '{data['act_fn']}' (only silu)")
    for key, expected in _DIFFUSERS_BLOCKS.items():
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


def save_pretrained(vae, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = state_dict if state_dict is not None else vae.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # Weights first, config last: a folder with a config.json always has its weights.
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(directory / CONFIG_NAME, json.dumps(vae.diffusers_config(), indent=2) + "\n")
    return directory


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {directory}", "give a folder written by save_pretrained or diffusers")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is corrupt: expected a JSON object")
    return data


def read_weights(directory: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    for name in _WEIGHT_CANDIDATES:
        path = directory / name
        if path.is_file():
            break
    else:
        raise CheckpointError(f"no weights in {directory} (looked for {', '.join(_WEIGHT_CANDIDATES)})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device=str(map_location))
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # safetensors raises SafetensorError / OSError on truncation
        raise CheckpointError(f"cannot read weights {path}: {str(exc).splitlines()[0]} (truncated or corrupt?)") from exc


def load_state_dict_strict(vae, state: dict[str, torch.Tensor], source: str) -> None:
    own = vae.state_dict()
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
    vae.load_state_dict(state, strict=True)


def load_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu"):
    from zturbo.model.vae import VAE

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model folder not found: {directory}")
    config = model_config_from_dict(read_config(directory))
    state = read_weights(directory, map_location)
    with torch.device("meta"):
        vae = VAE(config)
    vae = vae.to_empty(device=map_location)
    load_state_dict_strict(vae, state, str(directory))
    return vae.eval()


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """Newest complete ``step-N`` folder (incomplete ones never get that name)."""
    if not checkpoints.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in checkpoints.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return max(steps)[1] if steps else None


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """Find the model folder inside what a user may pass as CHECKPOINT.

    Accepted: a model folder (config.json + weights); a training run folder (its
    ``final/``, else the EMA weights of its latest checkpoint); one ``step-N``
    checkpoint folder (its ``ema/``, else ``model/``).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}", "give a model folder, a run folder or a step-N folder")
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return path
    for sub in ("final", "ema", "model"):
        if (path / sub / CONFIG_NAME).is_file():
            return path / sub
    latest = latest_checkpoint(path / "checkpoints")
    if latest is not None:
        return resolve_model_dir(latest)
    raise CheckpointError(
        f"{path} holds no model",
        "expected config.json + weights, a run folder with final/ or checkpoints/step-N/, or a step-N folder",
    )


def load_vae(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Load a VAE from any folder ``resolve_model_dir`` accepts."""
    return load_pretrained(resolve_model_dir(path), map_location=map_location)
