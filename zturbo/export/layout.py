"""The export folder: what an export writes and how a backend finds it.

    OUT/
      zturbo_export.json      metadata (written last; its presence marks a complete export)
      encoder.onnx            image (B, 3, H, W) in [-1, 1] -> latent mean (B, C, H/f, W/f)
      decoder.onnx            latent -> image
      encoder.plan            TensorRT engines (--format trt), built from the ONNX beside them
      decoder.plan
      timing.cache            TensorRT timing cache, reused by later builds into OUT

``zturbo_export.json`` holds the model config (diffusers' keys), scaling and
shift factors, whether the graphs apply them, precision, opset, the dynamic
ranges, the zturbo version, the fp32-kept nodes of an fp16 export, the
TensorRT / GPU versions of the engines and the verification figures.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from zturbo.errors import CheckpointError, InputError

META_NAME = "zturbo_export.json"
FORMAT_VERSION = 1
INPUT_NAMES = {"encoder": "image", "decoder": "latent"}
OUTPUT_NAMES = {"encoder": "latent", "decoder": "image"}


def onnx_name(part: str) -> str:
    return f"{part}.onnx"


def plan_name(part: str) -> str:
    return f"{part}.plan"


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / META_NAME).is_file()


def read_export_meta(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check ``zturbo_export.json`` of an export folder."""
    path = Path(path)
    meta_path = path / META_NAME
    if not meta_path.is_file():
        hint = "run `zturbo export CHECKPOINT --out DIR` first"
        if path.is_dir() and any(p.suffix in (".onnx", ".plan") for p in path.iterdir()):
            hint = "the export there is incomplete (interrupted?): run `zturbo export` again into that folder"
        raise CheckpointError(f"{path} is not a zturbo export folder (no {META_NAME})", hint)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path} is corrupt: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or "parts" not in meta:
        raise CheckpointError(
            f"{meta_path} is not a zturbo export description (format_version {FORMAT_VERSION})"
        )
    for part, info in meta["parts"].items():
        for key in ("onnx", "plan"):
            if info.get(key) and not (path / info[key]).is_file():
                raise CheckpointError(
                    f"export {path} lists {info[key]} for the {part}, but the file is missing"
                )
    return meta


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create OUT and prove it is writable, or say why not."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".zturbo-write-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(
            f"cannot write to output folder {out}: {exc.strerror or exc}",
            "choose another --out folder, or fix its permissions / free disk space",
        ) from exc
    return out
