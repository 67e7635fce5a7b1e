"""Latents as WebDataset tar shards: what ``serve-batch encode --output-format webdataset`` writes and
``train --latents`` reads.

::

    OUT/serve.json                    settings the latents were made with (checked on every rerun)
    OUT/shards/<input shard>.tar      one per input shard (shard inputs), or <part>-<seq>.tar of up to
                                      --shard-size latents (folder inputs); each sample is
                                        KEY.latent.safetensors   one tensor, "latent", (C, h, w)
                                        (or KEY.latent.npy)
                                        KEY.json                 source key, size, crop and bucket,
                                                                 encoder fingerprint, factors
    OUT/failures/<part>.json          inputs that could not be read, with the reason
    OUT/report.json                   the last run's counts and timings

A tar appears under its final name only once it is whole (temp name, fsync, then linked
into place without replacing anything), so the tars on disk say what is done.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zturbo.data.tar_shards import open_fd
from zturbo.errors import InputError, require
from zturbo.paths import safe_name, write_new
from zturbo.utils import fsync_dir

FORMAT = "zturbo-latents-webdataset"
VERSION = 1
LATENT_EXTS = {"safetensors": "latent.safetensors", "npy": "latent.npy"}
META_EXT = "json"


def tar_key(source_key: str) -> str:
    """A WebDataset key for ``source_key`` that cannot leave a folder it is extracted to and has no dot
    in its last part (a dot there would split the key from the extension)."""
    parts = safe_name(source_key).split("/")
    return "/".join(parts[:-1] + [parts[-1].replace(".", "_")])


def latent_bytes(latent: torch.Tensor, file: str) -> bytes:
    """One latent as a ``.safetensors`` file (tensor "latent") or a ``.npy`` file."""
    if file == "npy":
        if latent.dtype == torch.bfloat16:
            raise ValueError("a .npy file cannot hold bfloat16")
        buf = io.BytesIO()
        np.save(buf, latent.numpy(), allow_pickle=False)
        return buf.getvalue()
    from safetensors.torch import save

    return save({"latent": latent.contiguous()})


def read_latent(data: bytes, ext: str) -> torch.Tensor:
    if ext.endswith("npy"):
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).copy())
    from safetensors.torch import load

    return load(data)["latent"]


def write_latent_tar(path: Path, samples: list[tuple[str, str, bytes, dict]]) -> bool:
    """Write ``samples`` ((key, latent extension, latent bytes, metadata)) as one tar at ``path``, whole or
    not at all; False (nothing written) when ``path`` exists already."""
    wds = require("webdataset", "writing WebDataset shards", "webdataset")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            # mtime fixed: the same latents make the same file.
            with wds.TarWriter(fh, encoder=False, mtime=0.0) as sink:
                for key, ext, data, meta in samples:
                    sink.write({"__key__": key, ext: data,
                                META_EXT: json.dumps(meta, separators=(",", ":")).encode()})
            fh.flush()
            os.fsync(fh.fileno())

    path.parent.mkdir(parents=True, exist_ok=True)
    written = write_new(path, write)
    fsync_dir(path.parent)
    return written


@dataclass(frozen=True)
class StoredLatent:
    """One latent in a tar: its metadata and where its bytes are."""

    meta: dict
    tar: Path
    member: str
    offset: int
    size: int

    def load(self) -> torch.Tensor:
        data = os.pread(open_fd(self.tar), self.size, self.offset)
        return read_latent(data, self.member)


def read_latent_tar(path: Path) -> list[StoredLatent]:
    """The latents one tar holds, with their metadata; an InputError naming the tar when it is not readable."""
    found: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isreg() or "." not in Path(info.name).name:
                    continue
                stem, _, ext = info.name.rpartition("/")[2].partition(".")
                key = f"{info.name.rpartition('/')[0]}/{stem}".lstrip("/") if "/" in info.name else stem
                entry = found.setdefault(key, {})
                if ext == META_EXT:
                    entry["meta"] = json.loads(tar.extractfile(info).read())
                elif ext in LATENT_EXTS.values():
                    entry["latent"] = (info.name, info.offset_data, info.size)
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise InputError(f"cannot read latent shard {path}: {str(exc).splitlines()[0] if str(exc) else exc}",
                         "re-encode its input shard (move the file aside and rerun serve-batch encode)") from exc
    out = []
    for key, entry in found.items():
        if "meta" not in entry or "latent" not in entry:
            raise InputError(f"latent shard {path}: sample {key!r} lacks its .json or its latent",
                             "re-encode its input shard (move the file aside and rerun serve-batch encode)")
        out.append(StoredLatent(entry["meta"], path, *entry["latent"]))
    return out


def latent_tars(out_dir: Path) -> list[Path]:
    """The finished tars of an output folder (temp files, which start with a dot, are not)."""
    folder = out_dir / "shards"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*.tar") if not any(part.startswith(".") for part in
                                                             p.relative_to(folder).parts))
