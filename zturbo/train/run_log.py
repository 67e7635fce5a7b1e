"""What a run records as it trains: ``metrics.jsonl``, TensorBoard scalars and images, the status line.

Only the main process records (``enabled``). On resume, whatever a killed run logged after
the checkpoint it resumes from is dropped: the lines of ``metrics.jsonl`` at once, the
TensorBoard events when the writer opens (``purge_step``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zturbo.utils import atomic_write_text


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool, log: Callable[[str], None]):
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard_dir = run_dir / "tensorboard"
        self.enabled = enabled
        self.log = log
        self._writer = None  # None: not opened yet; False: TensorBoard is unusable here
        self._purge_step: int | None = None

    def resume_at(self, step: int) -> None:
        """Drop what a killed run logged after ``step`` (the checkpoint this run resumes from)."""
        if not self.enabled:
            return
        self._purge_step = step + 1
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a kill
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def record(self, row: dict[str, Any], step: int) -> None:
        """One metrics line, and its numbers as TensorBoard scalars under ``train/``."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for key, value in row.items():
                if key not in ("step", "skipped") and isinstance(value, (int, float)):
                    writer.add_scalar(f"train/{key}", value, step)

    def image(self, tag: str, array: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 image in TensorBoard."""
        writer = self._tensorboard() if self.enabled else None
        if writer is not None:
            writer.add_image(tag, array, step, dataformats="HWC")

    def close(self) -> None:
        if self._writer:
            self._writer.close()

    def _tensorboard(self):
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but keep training if it is broken
                self._writer = False
                self.log("tensorboard is not importable: metrics go to metrics.jsonl only")
            else:
                self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=self._purge_step)
        return self._writer or None


def status_line(row: dict[str, Any], device: torch.device) -> str:
    """The progress bar's status: loss, its terms, learning rate, throughput and (CUDA) memory."""
    parts = [f"loss {row.get('loss', float('nan')):.4f}"]
    for key in ("rec", "lpips", "kl", "g", "d"):
        if key in row:
            parts.append(f"{key} {row[key]:.4g}")
    parts.append(f"lr {row['lr']:.2e}")
    parts.append(f"{row['images_per_s']:.1f} img/s")
    if "memory_gib" in row:
        parts.append(f"{row['memory_gib']:.1f} GiB")
        with contextlib.suppress(Exception):  # needs NVML; utilisation is optional information
            parts.append(f"util {torch.cuda.utilization(device)}%")
    if row.get("skipped"):
        parts.append("[skipped: non-finite]")
    return "  ".join(parts)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
