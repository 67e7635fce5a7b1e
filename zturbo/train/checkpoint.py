"""Run-folder checkpoints: ``RUN_DIR/checkpoints/step-N/``, complete or absent.

A step folder holds ``model/`` and ``ema/`` (``save_pretrained`` layout, readable by
``zturbo.load_vae`` and diffusers), ``discriminator.safetensors``,
``trainer_state.pt`` (optimizers, schedulers, scalers, RNG states, data position;
tensors and plain values only, read back with ``weights_only=True``),
``trainer_state.json`` (the same position, human-readable) and ``settings.json``
(the resolved settings). It is written under a hidden temporary name and
renamed when complete, so an interrupted save never leaves a ``step-N`` behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zturbo.errors import CheckpointError
from zturbo.model.diffusers import read_config, read_weights
from zturbo.train.layout import latest_checkpoint, step_folders
from zturbo.utils import atomic_path, atomic_write_json, fsync_dir

STATE_NAME = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
SETTINGS_NAME = "settings.json"
DISC_NAME = "discriminator.safetensors"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    *,
    vae: torch.nn.Module,
    ema_vae: torch.nn.Module,
    discriminator: torch.nn.Module | None,
    engine_state: dict[str, Any],
    position: dict[str, Any],
    settings_json: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write ``step-N`` atomically (temp folder + rename) and prune to the newest ``keep_last``."""
    from safetensors.torch import save_file

    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}.", suffix=".tmp", dir=checkpoints_dir))
    try:
        vae.save_pretrained(tmp / "model")
        ema_vae.save_pretrained(tmp / "ema")
        if discriminator is not None:
            with atomic_path(tmp / DISC_NAME) as path:
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in discriminator.state_dict().items()},
                    str(path),
                )
        with atomic_path(tmp / STATE_NAME) as path:
            torch.save({**engine_state, "rng": rng_state(), "position": position}, path)
        atomic_write_json(tmp / STATE_JSON, position)
        atomic_write_json(tmp / SETTINGS_NAME, settings_json)
        fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (resumed exactly at it): replace as a whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(checkpoints_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(checkpoints_dir, keep_last)
    return final


def prune(checkpoints_dir: Path, keep_last: int) -> None:
    for _, path in step_folders(checkpoints_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def remove_partial(checkpoints_dir: Path) -> int:
    """Delete temp folders left by a save that was killed midway; returns how many."""
    if not checkpoints_dir.is_dir():
        return 0
    stale = [p for p in checkpoints_dir.iterdir() if p.name.startswith(".step-") and p.name.endswith(".tmp")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def find_resume(run_dir: Path, resume: str | os.PathLike) -> Path | None:
    """``auto``: the newest complete step in ``run_dir`` (None when there is none); else the path given."""
    if str(resume) == "auto":
        return latest_checkpoint(run_dir / "checkpoints")
    path = Path(resume)
    if (path / STATE_NAME).is_file():
        return path
    latest = latest_checkpoint(path / "checkpoints") if path.is_dir() else None
    if latest is not None:
        return latest
    raise CheckpointError(
        f"no resumable checkpoint at {path}",
        "give a checkpoints/step-N folder or a run folder that has one, or --resume auto",
    )


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """Weights and trainer state of a step folder, validated; raises CheckpointError when incomplete."""
    for needed in ("model", "ema", STATE_NAME, SETTINGS_NAME):
        if not (path / needed).exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {needed} is missing")
    try:
        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path / STATE_NAME}: {str(exc).splitlines()[0]}") from exc
    out = {
        "model": read_weights(path / "model", device),
        "model_config": read_config(path / "model"),
        "ema": read_weights(path / "ema", device),
        "state": state,
        "settings": json.loads((path / SETTINGS_NAME).read_text(encoding="utf-8")),
    }
    if (path / DISC_NAME).is_file():
        from safetensors.torch import load_file

        out["discriminator"] = load_file(str(path / DISC_NAME), device=str(device))
    return out
