"""The layout of a training run folder: ``final/``, ``checkpoints/step-N/{model,ema}/``.

``checkpoints/step-N`` folders only ever get that name once complete, so the
newest one found is always whole.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from zturbo.errors import CheckpointError
from zturbo.model import VAE, load_pretrained
from zturbo.model.diffusers import CONFIG_NAME

STEP_DIR = re.compile(r"^step-(\d+)$")
FINAL_DIR = "final"
CHECKPOINTS_DIR = "checkpoints"


def step_folders(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """``(N, folder)`` for every complete ``step-N`` folder, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(
        (int(m.group(1)), p) for p in checkpoints_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))
    )


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """Newest complete ``step-N`` folder (incomplete ones never get that name)."""
    steps = step_folders(checkpoints_dir)
    return steps[-1][1] if steps else None


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
    for sub in (FINAL_DIR, "ema", "model"):
        if (path / sub / CONFIG_NAME).is_file():
            return path / sub
    latest = latest_checkpoint(path / CHECKPOINTS_DIR)
    if latest is not None:
        return resolve_model_dir(latest)
    raise CheckpointError(
        f"{path} holds no model",
        "expected config.json + weights, a run folder with final/ or checkpoints/step-N/, or a step-N folder",
    )


def load_vae(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> VAE:
    """Load a VAE from a model folder, a run folder or a step-N checkpoint."""
    return load_pretrained(resolve_model_dir(path), map_location=map_location)
