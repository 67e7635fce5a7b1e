"""serve-batch: exactly-once batch encoding of image collections and decoding of latents, with
reading, compute and writing overlapped.

    >>> from zturbo.config import ServeConfig
    >>> from zturbo.serve import encode_collection, decode_collection, merge_outputs

    >>> encode_collection("runs/demo", "photos/", "latents/", ServeConfig(size=256, batch_size=16))
    >>> decode_collection("runs/demo", "latents/", "decoded/", ServeConfig(image_format="png"))

Modules, in the order a batch meets them: ``inputs`` and ``latents`` (what to read),
``plan`` (batches and their size), ``readers`` and ``streams`` (the reading modes),
``step`` (the device step), ``writers``, ``store`` (the on-disk layout), and ``run``
(the loop and its report) under ``encode`` and ``decode``.
"""

from __future__ import annotations

from pathlib import Path

from zturbo.serve.decode import decode_collection
from zturbo.serve.encode import encode_collection
from zturbo.serve.inputs import Partition, parse_shard
from zturbo.serve.plan import auto_batch_size
from zturbo.serve.run import RunReport, reading_mode
from zturbo.serve.store import DiskFullError, build_index, load_index
from zturbo.serve.streams import compute_streams


def merge_outputs(out_dirs: list[str | Path], index_dir: str | Path | None = None) -> dict:
    """Merge the shards of several encode outputs (e.g. one per machine) into one ``index.json``."""
    dirs = [Path(d) for d in out_dirs]
    return build_index(dirs, Path(index_dir) if index_dir is not None else None)


__all__ = [
    "DiskFullError",
    "Partition",
    "RunReport",
    "auto_batch_size",
    "build_index",
    "compute_streams",
    "decode_collection",
    "encode_collection",
    "load_index",
    "merge_outputs",
    "parse_shard",
    "reading_mode",
]
