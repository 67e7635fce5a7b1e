"""serve-batch: exactly-once, overlapped batch encoding of image collections and decoding of latents.

    from zturbo.config import ServeConfig
    from zturbo.serve import encode_collection, decode_collection, merge_outputs

    encode_collection("runs/demo", "photos/", "latents/", ServeConfig(size=256, batch_size=16))
    decode_collection("runs/demo", "latents/", "decoded/", ServeConfig(image_format="png"))
"""

from __future__ import annotations

from pathlib import Path

from zturbo.serve.inputs import Partition, parse_shard
from zturbo.serve.pipeline import RunReport, auto_batch_size, decode_collection, encode_collection
from zturbo.serve.store import DiskFullError, build_index, load_index


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
    "decode_collection",
    "encode_collection",
    "load_index",
    "merge_outputs",
    "parse_shard",
]
