"""Encode a collection of images into latent shards, exactly once.

    >>> from zturbo.config import ServeConfig
    >>> from zturbo.serve import encode_collection

    >>> report = encode_collection("runs/demo", "photos/", "latents/", ServeConfig(size=256))
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zturbo.config import ServeConfig
from zturbo.errors import InputError
from zturbo.paths import check_output_folder
from zturbo.serve import store
from zturbo.serve.inputs import Failure, Partition, Probed, bucket_sizes, discover_sources, probe_all
from zturbo.serve.plan import plan_batches, reader_threads, resolve_batch_size
from zturbo.serve.readers import ImageSource
from zturbo.serve.run import RunReport, open_reader, reading_mode, run_batches
from zturbo.serve.step import DeviceStep, load_backend, model_sample_size
from zturbo.serve.writers import ShardWriter
from zturbo.utils import atomic_write_json


def encode_collection(
    model: Any,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    cfg: ServeConfig | None = None,
    partition: Partition | None = None,
    *,
    device: str | torch.device | None = None,
    barrier: Callable[[], None] | None = None,
    backend=None,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> RunReport:
    """Encode every image under ``input_path`` (a folder or manifest) into latent shards in ``output_dir``.

    Exactly once: sources already in a complete shard are skipped, so a rerun after any
    crash only does what is missing. With ``partition`` this process takes only its part
    (``--shard I/N`` across machines, rank/world size under torchrun); ``barrier`` (e.g.
    ``torch.distributed.barrier``) lets rank 0 wait for the others before merging the index.
    ``progress(total, done)`` may return a callback advanced by the number of images handled.
    """
    cfg = cfg or ServeConfig()
    partition = partition or Partition()
    out_dir = check_output_folder(output_dir)
    t_start = time.perf_counter()
    sources, _ = discover_sources(input_path)
    if not sources:
        raise InputError(f"no images found in {input_path}", "supported: .png .jpg .jpeg .webp .bmp .tif .tiff .gif")
    mine = [s for s in sources if partition.owns(s.key)]

    backend = backend or load_backend(model, cfg, device)
    mode = reading_mode(cfg, backend.device)
    size = cfg.size or model_sample_size(backend)
    buckets = bucket_sizes(size, backend.downsample_factor, cfg.resize)
    store.check_settings(out_dir, _latent_settings(model, backend, cfg, size))
    store.remove_temp_files(out_dir, partition.name)
    done = store.scan_shards(out_dir, set_aside_unreadable=partition.rank == 0).sources
    todo = [s for s in mine if s.key not in done]
    report = RunReport("encode", str(out_dir), total=len(mine), already_done=len(mine) - len(todo),
                       backend=backend.describe(), partition=partition.name)

    if len(buckets) == 1:  # one size for all: no need to read headers first; readers report failures
        probed = [Probed(s, 0, 0, buckets[0]) for s in todo]
    else:
        probed = probe_all(todo, buckets, cfg.max_pixels, reader_threads())
    items = [p for p in probed if isinstance(p, Probed)]
    header_failures = [p for p in probed if isinstance(p, Failure)]
    failures = {f["source"]: f for f in _part_failures(out_dir, partition.name)}
    failures.update({f.key: f.to_dict() for f in header_failures})
    writer = ShardWriter(out_dir, partition.name, cfg.shard_size, items, failures)
    report.failed = len(header_failures)
    report.failures = [f.to_dict() for f in header_failures]

    step = DeviceStep(backend, "encode", cfg.latent_mode, cfg.seed)
    if items:
        largest = max((p.bucket for p in items), key=lambda b: b[0] * b[1])

        def trial(b: int) -> None:
            step.encode(torch.zeros(b, 3, largest[1], largest[0], device=backend.device), ["probe"] * b)

        report.batch_size = resolve_batch_size(cfg, trial, backend.device, len(items))
        plans = plan_batches([p.bucket for p in items], report.batch_size)
        reader = open_reader(mode, ImageSource(items, cfg.max_pixels), plans, backend.device, cfg, reader_threads())
        advance = progress(len(mine), report.already_done + len(header_failures)) if progress else None
        run_batches(reader, step, writer, report, advance)
    else:
        writer.start()
        writer.finish()
    waited = 0.0
    if partition.world_size > 1 and barrier is not None:
        t0 = time.perf_counter()
        barrier()
        waited = time.perf_counter() - t0
    if partition.rank == 0 or barrier is None:
        index = store.build_index([out_dir])
        report.index = str(out_dir / store.INDEX_NAME)
        report.index_count = index["count"]
        report.duplicates_dropped = index["duplicates_dropped"]
    report.wall_seconds = time.perf_counter() - t_start - waited  # this process's own time, not other ranks'
    if partition.rank == 0:
        atomic_write_json(out_dir / store.REPORT_NAME, report.to_dict())
    return report


def _latent_settings(model: Any, backend, cfg: ServeConfig, size: int) -> dict:
    """What the latents depend on (recorded in serve.json and checked on every rerun)."""
    vae_cfg = getattr(getattr(backend, "vae", None), "config", None)
    return {
        "format": store.FORMAT,
        "model": str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__,
        "encoder_fingerprint": backend.fingerprint,
        "latent_channels": backend.latent_channels,
        "downsample_factor": backend.downsample_factor,
        "scaling_factor": getattr(vae_cfg, "scaling_factor", getattr(backend, "scaling_factor", None)),
        "shift_factor": getattr(vae_cfg, "shift_factor", getattr(backend, "shift_factor", None)),
        "size": size,
        "resize": cfg.resize,
        "latent_mode": cfg.latent_mode,
        "precision": cfg.precision,
        "seed": cfg.seed,
    }


def _part_failures(out_dir: Path, part: str) -> list[dict]:
    """This part's failure list from an earlier run (empty when there is none or it is unreadable)."""
    try:
        return json.loads(store.failure_path(out_dir, part).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
