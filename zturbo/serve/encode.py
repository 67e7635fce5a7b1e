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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zturbo.config import ServeConfig
from zturbo.errors import InputError
from zturbo.paths import check_output_folder
from zturbo.serve import store, tar_output
from zturbo.serve.inputs import (
    Failure,
    Inputs,
    Partition,
    Probed,
    Source,
    bucket_sizes,
    discover_inputs,
    probe_all,
)
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
    """Encode every image ``input_path`` names (a folder, a manifest, or WebDataset / Parquet shards) into
    latent shards in ``output_dir``, in ``cfg.output_format`` ("zturbo" safetensors shards plus
    index.json, or "webdataset" tars: :mod:`zturbo.serve.tar_output`).

    Exactly once: sources already in a complete shard are skipped, so a rerun after any
    crash only does what is missing. Damaged input shards are listed in the report's
    ``damaged``; their readable images and every other shard are encoded. With ``partition`` this process takes only its part
    (``--shard I/N`` across machines, rank/world size under torchrun); ``barrier`` (e.g.
    ``torch.distributed.barrier``) lets rank 0 wait for the others before merging the index.
    ``progress(total, done)`` may return a callback advanced by the number of images handled.
    """
    cfg = cfg or ServeConfig()
    partition = partition or Partition()
    out_dir = check_output_folder(output_dir)
    t_start = time.perf_counter()
    inputs = discover_inputs(input_path, cfg.image_column)
    if not inputs.sources:
        raise InputError(f"no images found in {input_path}", "supported: .png .jpg .jpeg .webp .bmp .tif .tiff .gif")
    mine = [s for s in inputs.sources if partition.owns_source(s)]

    backend = backend or load_backend(model, cfg, device)
    mode = reading_mode(cfg, backend.device)
    size = cfg.size or model_sample_size(backend)
    settings = latent_settings(model, backend, cfg, size)
    store.check_settings(out_dir, settings)
    step = DeviceStep(backend, "encode", cfg.latent_mode, cfg.seed)

    def trial(b: int, bucket: tuple[int, int]) -> None:
        step.encode(torch.zeros(b, 3, bucket[1], bucket[0], device=backend.device), ["probe"] * b)

    plan = plan_encode(out_dir, inputs, mine, cfg, partition, bucket_sizes(size, backend.downsample_factor, cfg.resize),
                       lambda n, bucket: resolve_batch_size(cfg, lambda b: trial(b, bucket), backend.device, n))
    report = RunReport("encode", str(out_dir), total=len(mine), already_done=len(plan.done),
                       backend=backend.describe(), partition=partition.name, damaged=inputs.damaged,
                       output_format=cfg.output_format, batch_size=plan.batch_size)
    if plan.groups is not None:
        writer = tar_output.TarShardWriter(out_dir, partition.name, plan.groups, plan.items, plan.failures, settings,
                                           cfg.latent_file)
    else:
        writer = ShardWriter(out_dir, partition.name, cfg.shard_size, plan.items, plan.failures)
    report.failed = len(plan.header_failures)
    report.failures = [f.to_dict() for f in plan.header_failures]
    if plan.batches:
        reader = open_reader(mode, ImageSource(plan.items, cfg.max_pixels), plan.batches, backend.device, cfg,
                             reader_threads())
        advance = progress(len(mine), report.already_done + len(plan.header_failures)) if progress else None
        run_batches(reader, step, writer, report, advance)
    else:
        writer.start()
        writer.finish()
    waited = 0.0
    if partition.world_size > 1 and barrier is not None:
        t0 = time.perf_counter()
        barrier()
        waited = time.perf_counter() - t0
    if cfg.output_format == "zturbo" and (partition.rank == 0 or barrier is None):
        index = store.build_index([out_dir])
        report.index = str(out_dir / store.INDEX_NAME)
        report.index_count = index["count"]
        report.duplicates_dropped = index["duplicates_dropped"]
    report.wall_seconds = time.perf_counter() - t_start - waited  # this process's own time, not other ranks'
    if partition.rank == 0:
        atomic_write_json(out_dir / store.REPORT_NAME, report.to_dict())
    return report


@dataclass
class EncodePlan:
    """What a run computes: ``batches`` of indices into ``items``, composed as an uninterrupted run composes
    them (all of this part's images are planned, then what is done is left out), so a rerun after a crash
    computes every remaining latent in the same batch as an uninterrupted run, and gets the same bits."""

    items: list[Probed]
    done: set[str]  # source keys of this part already in a finished output
    header_failures: list[Failure]
    failures: dict[str, dict]  # the part's failure list: earlier runs' and the header probe's, by source key
    batch_size: int = 0
    batches: list[list[int]] = field(default_factory=list)
    groups: list[tar_output.Group] | None = None  # webdataset output: the tars to write


def plan_encode(out_dir: Path, inputs: Inputs, mine: list[Source], cfg: ServeConfig, partition: Partition,
                buckets: list[tuple[int, int]], batch_size: Callable[[int, tuple[int, int]], int]) -> EncodePlan:
    """Plan a run of this part (``batch_size(items, largest bucket)`` resolves the batch size); removes the
    part's leftover temp files."""
    if cfg.output_format == "webdataset":
        done = tar_output.done_sources(out_dir, inputs, mine)
    else:
        store.remove_temp_files(out_dir, partition.name)
        done = store.scan_shards(out_dir, set_aside_unreadable=partition.rank == 0).sources & {s.key for s in mine}
    whole_shards = cfg.output_format == "webdataset" and inputs.units is not None
    to_probe = [s for s in mine if s.key not in done] if whole_shards else mine
    if len(buckets) == 1:  # one size for all: no need to read headers first; readers report failures
        probed = [Probed(s, 0, 0, buckets[0]) for s in to_probe]
    else:
        probed = probe_all(to_probe, buckets, cfg.max_pixels, reader_threads())
    items = [p for p in probed if isinstance(p, Probed)]
    header_failures = [p for p in probed if isinstance(p, Failure) and p.key not in done]
    failures = {f["source"]: f for f in _part_failures(out_dir, partition.name)}
    failures.update({f.key: f.to_dict() for f in header_failures})
    plan = EncodePlan(items, done, header_failures, failures)
    if cfg.output_format == "webdataset":
        plan.groups = tar_output.plan_groups(out_dir, inputs, to_probe, items, done, partition.name, cfg.shard_size)
        tar_output.remove_temp_tars(out_dir, plan.groups)
    if not items:
        return plan
    plan.batch_size = batch_size(len(items), max((p.bucket for p in items), key=lambda b: b[0] * b[1]))
    if plan.groups is not None:
        plan.batches = tar_output.group_plans(plan.groups, items, plan.batch_size)
    else:
        batches = [[i for i in b if items[i].source.key not in done]
                   for b in plan_batches([p.bucket for p in items], plan.batch_size)]
        plan.batches = [b for b in batches if b]
    return plan


def latent_settings(model: Any, backend, cfg: ServeConfig, size: int) -> dict:
    """What the latents depend on (recorded in serve.json and checked on every rerun)."""
    vae_cfg = getattr(getattr(backend, "vae", None), "config", None)
    return {
        "format": store.FORMAT if cfg.output_format == "zturbo" else tar_output.FORMAT,
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
