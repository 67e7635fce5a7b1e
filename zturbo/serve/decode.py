"""Decode latents into images, each written once.

    >>> from zturbo.config import ServeConfig
    >>> from zturbo.serve import decode_collection

    >>> report = decode_collection("runs/demo", "latents/", "decoded/", ServeConfig(image_format="png"))
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zturbo.config import ServeConfig
from zturbo.paths import check_output_folder, ensure_output_folder, inside
from zturbo.serve.inputs import Partition
from zturbo.serve.latents import check_channels, enumerate_latents
from zturbo.serve.plan import plan_batches, reader_threads, resolve_batch_size
from zturbo.serve.readers import LatentSource
from zturbo.serve.run import RunReport, open_reader, reading_mode, run_batches
from zturbo.serve.step import DeviceStep, load_backend
from zturbo.serve.writers import ImageWriter, image_suffix


def decode_collection(
    model: Any,
    latents_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    cfg: ServeConfig | None = None,
    partition: Partition | None = None,
    *,
    device: str | torch.device | None = None,
    backend=None,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> RunReport:
    """Decode latents (an encode output, shards, ``.safetensors`` or ``.npy`` files) into images.

    Each image is written atomically under a name derived from its latent's key that stays
    inside ``output_dir`` (``assign_names``), never over an existing file, so a rerun skips
    the ones that exist. A latent or decoded image holding NaN or inf is reported in the
    report's failures and nothing is written for it.
    """
    cfg = cfg or ServeConfig()
    partition = partition or Partition()
    out_dir = check_output_folder(output_dir)
    t_start = time.perf_counter()
    items = [it for it in enumerate_latents(latents_path) if partition.owns(it.name)]
    backend = backend or load_backend(model, cfg, device)
    mode = reading_mode(cfg, backend.device)
    check_channels(items, backend.latent_channels)
    suffix = image_suffix(cfg.image_format)
    todo = [it for it in items if not _written(out_dir, f"{it.name}.{suffix}")]
    report = RunReport("decode", str(out_dir), total=len(items), already_done=len(items) - len(todo),
                       backend=backend.describe(), partition=partition.name)
    writer = ImageWriter(out_dir, cfg.image_format, cfg.quality, reader_threads(), todo, cfg.restore_size)
    step = DeviceStep(backend, "decode")
    if todo:
        ensure_output_folder(out_dir)
        largest = max((it.shape for it in todo), key=lambda s: s[1] * s[2])

        def trial(b: int) -> None:
            step.decode(torch.zeros(b, *largest, device=backend.device))

        report.batch_size = resolve_batch_size(cfg, trial, backend.device, len(todo))
        plans = plan_batches([it.shape[1:] for it in todo], report.batch_size)
        # Loading a latent is cheap: two threads keep ahead of the device.
        reader = open_reader(mode, LatentSource(todo), plans, backend.device, cfg, min(2, reader_threads()))
        advance = progress(len(items), report.already_done) if progress else None
        run_batches(reader, step, writer, report, advance)
    else:
        writer.start()
        writer.finish()
    report.wall_seconds = time.perf_counter() - t_start
    return report


def _written(out_dir: Path, name: str) -> bool:
    """An earlier run wrote this image (a file of that name inside ``out_dir``)."""
    path = out_dir / name
    return path.is_file() and inside(path, out_dir)
