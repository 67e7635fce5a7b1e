"""The layout of a training run folder: ``final/``, ``checkpoints/step-N/{model,ema}/``.

``checkpoints/step-N`` folders only ever get that name once complete, so the
newest one found is always whole. ``zturbo.artifacts`` reads this layout to tell a
run folder or a step-N checkpoint from the other kinds of model path.
"""

from __future__ import annotations

import re
from pathlib import Path

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
