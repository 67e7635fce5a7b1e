"""On-disk layout of an encode output: safetensors shards, failure lists and the merged index.

::

    OUT/serve.json                      settings the latents were made with (checked on every rerun)
    OUT/shards/<part>-<seq>.safetensors up to shard_size latents each; metadata lists their sources
    OUT/failures/<part>.json            inputs of that part that could not be read, with the reason
    OUT/index.json                      every latent (source -> shard, tensor, shape, original size) and the
                                        encoding model's path and encoder_fingerprint (zturbo.distill.fingerprint)
    OUT/report.json                     the last run's counts and timings

A shard appears under its final name only once it is complete (temp name + fsync +
``os.replace``), so the shards on disk are the single source of truth for what is
done: a rerun skips exactly the sources they hold, and the index is rebuilt from
them. A crash loses at most the latents not yet in a shard, and those are redone.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zturbo.data.latent_shards import INDEX_NAME
from zturbo.data.latent_shards import LATENTS_FORMAT as FORMAT
from zturbo.data.latent_shards import LATENTS_VERSION as VERSION
from zturbo.errors import InputError, UsageError, ZTurboError
from zturbo.utils import atomic_path, atomic_write_json, fsync_dir

META_KEY = "zturbo"
SETTINGS_NAME = "serve.json"
REPORT_NAME = "report.json"
SHARD_DIR = "shards"
FAILURE_DIR = "failures"


class DiskFullError(ZTurboError):
    """Writing stopped because the disk is full; everything already written is intact."""


def write_shard(path: Path, tensors: dict[str, torch.Tensor], entries: list[dict]) -> None:
    """Write one shard atomically: temp file in the same folder, fsync, rename.

    Through safetensors' numpy writer where every dtype has a numpy twin: the same file,
    about 5x faster than the torch writer for a shard of small latents (its per-tensor
    shared-storage checks dominate there). bfloat16 has no numpy twin and takes the torch one.
    """
    meta = {META_KEY: json.dumps({"format": FORMAT, "version": VERSION, "entries": entries}, separators=(",", ":"))}
    with atomic_path(path, suffix=".tmp") as tmp:
        if any(t.dtype == torch.bfloat16 for t in tensors.values()):
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata=meta)
        else:
            from safetensors.numpy import save_file

            save_file({k: t.numpy() for k, t in tensors.items()}, str(tmp), metadata=meta)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    fsync_dir(path.parent)


def read_shard_entries(path: Path) -> list[dict] | None:
    """The entries a shard holds, or None when it is not one of ours."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    raw = meta.get(META_KEY)
    if raw is None:
        return None
    data = json.loads(raw)
    if data.get("format") != FORMAT:
        return None
    return data["entries"]


def is_temp(path: Path) -> bool:
    return path.name.startswith(".")


@dataclass
class ShardScan:
    """What the shards under one output folder hold."""

    entries: list[dict] = field(default_factory=list)  # each with "shard" (relative to the folder) added
    shards: list[Path] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    @property
    def sources(self) -> set[str]:
        return {e["source"] for e in self.entries}


def scan_shards(out_dir: Path, set_aside_unreadable: bool = False) -> ShardScan:
    """Read every complete shard's metadata (no tensor data). Leftover temp files are ignored."""
    scan = ShardScan()
    folder = out_dir / SHARD_DIR
    if not folder.is_dir():
        return scan
    for path in sorted(folder.glob("*.safetensors")):
        if is_temp(path):
            continue
        try:
            entries = read_shard_entries(path)
        except Exception as exc:  # noqa: BLE001 - a damaged file: its sources are redone
            scan.unreadable.append(f"{path.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            if set_aside_unreadable:
                os.replace(path, path.with_name(path.name + ".unreadable"))
            continue
        if entries is None:
            continue
        rel = path.relative_to(out_dir).as_posix()
        for entry in entries:
            scan.entries.append({**entry, "shard": rel})
        scan.shards.append(path)
    return scan


def remove_temp_files(out_dir: Path, part: str) -> int:
    """Delete the temp files a killed run of this part left behind (never renamed into place).

    Only this part's: under torchrun the other ranks may be writing theirs right now.
    """
    removed = 0
    for pattern in (f"{SHARD_DIR}/.{part}-*.tmp", f"{FAILURE_DIR}/.{part}.json.*.tmp"):
        for path in out_dir.glob(pattern):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def next_sequence(out_dir: Path, part: str) -> int:
    folder = out_dir / SHARD_DIR
    seqs = [
        int(p.stem.rsplit("-", 1)[1])
        for p in folder.glob(f"{part}-*.safetensors*")
        if not is_temp(p) and p.stem.rsplit("-", 1)[1].isdigit()
    ] if folder.is_dir() else []
    return max(seqs, default=-1) + 1


def shard_path(out_dir: Path, part: str, seq: int) -> Path:
    return out_dir / SHARD_DIR / f"{part}-{seq:06d}.safetensors"


# ---------------------------------------------------------------------------------------------------------
# Settings of an output folder


def check_settings(out_dir: Path, settings: dict) -> None:
    """Record the settings on first use; on reruns refuse ones that would mix incompatible latents."""
    path = out_dir / SETTINGS_NAME
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path} is corrupt: {exc}", "move the output folder aside and start again") from exc
        keys = ("latent_channels", "downsample_factor", "size", "resize", "latent_mode", "precision", "seed")
        diff = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in keys if old.get(k) != settings.get(k)]
        if _fingerprints_differ(old, settings):
            diff.append(f"model: {old.get('model')} -> {settings.get('model')} (other encoder weights)")
        if diff:
            raise UsageError(
                f"{out_dir} already holds latents made with other settings ({'; '.join(diff)})",
                "rerun with the same settings to continue, or choose a new --output",
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings)


def _fingerprints_differ(a: dict, b: dict) -> bool:
    """Both record the encoding model's fingerprint and they differ (folders written before it was
    recorded, or by a backend that cannot tell, are judged by their other settings alone)."""
    fa, fb = a.get("encoder_fingerprint"), b.get("encoder_fingerprint")
    return fa is not None and fb is not None and fa != fb


def read_settings(out_dir: Path) -> dict:
    path = out_dir / SETTINGS_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------------------
# Failures


def failure_path(out_dir: Path, part: str) -> Path:
    return out_dir / FAILURE_DIR / f"{part}.json"


def read_failures(out_dir: Path) -> list[dict]:
    folder = out_dir / FAILURE_DIR
    out: list[dict] = []
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            if is_temp(path):
                continue
            try:
                out.extend(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
    return out


def write_failures(out_dir: Path, part: str, failures: dict[str, dict]) -> None:
    atomic_write_json(failure_path(out_dir, part), sorted(failures.values(), key=lambda f: f["source"]))


# ---------------------------------------------------------------------------------------------------------
# Index


def build_index(out_dirs: list[Path], index_dir: Path | None = None) -> dict:
    """Merge the shards of one or more output folders into ``index.json`` (written in ``index_dir``).

    Shard paths in the index are relative to the index's folder. A source found in two
    shards (only possible when folders from separate runs are merged) is kept once, from
    the first shard in name order, and counted as ``duplicates_dropped``.
    """
    if not out_dirs:
        raise UsageError("nothing to merge")
    index_dir = index_dir or out_dirs[0]
    settings = read_settings(out_dirs[0])
    by_source: dict[str, dict] = {}
    duplicates = 0
    unreadable: list[str] = []
    failures: dict[str, dict] = {}
    for out_dir in out_dirs:
        if not out_dir.is_dir():
            raise InputError(f"output folder not found: {out_dir}")
        other = read_settings(out_dir)
        for key in ("latent_channels", "size", "resize", "latent_mode", "precision"):
            if settings and other and other.get(key) != settings.get(key):
                raise UsageError(f"cannot merge {out_dir}: its {key} is {other.get(key)!r}, not {settings.get(key)!r}")
        if _fingerprints_differ(settings, other):
            raise UsageError(f"cannot merge {out_dir}: its latents come from model {other.get('model')}, "
                             f"another encoder than {out_dirs[0]}'s ({settings.get('model')})")
        scan = scan_shards(out_dir)
        unreadable += [f"{out_dir}/{u}" for u in scan.unreadable]
        for entry in scan.entries:
            shard = os.path.relpath(out_dir / entry["shard"], index_dir)
            entry = {**entry, "shard": Path(shard).as_posix()}
            if entry["source"] in by_source:
                duplicates += 1
                continue
            by_source[entry["source"]] = entry
        for failure in read_failures(out_dir):
            failures.setdefault(failure["source"], failure)
    entries = [by_source[k] for k in sorted(by_source)]
    still_failed = [failures[k] for k in sorted(failures) if k not in by_source]
    index = {
        "format": FORMAT,
        "version": VERSION,
        **{k: settings.get(k) for k in ("model", "encoder_fingerprint", "latent_channels", "downsample_factor", "scaling_factor",
                                         "shift_factor", "latent_mode", "size", "resize", "precision")},
        "count": len(entries),
        "failed": len(still_failed),
        "duplicates_dropped": duplicates,
        "unreadable_shards": unreadable,
        "entries": entries,
        "failures": still_failed,
    }
    try:
        atomic_write_json(index_dir / INDEX_NAME, index)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(
                f"no space left on the device while writing {index_dir / INDEX_NAME}",
                "free some space and run `zturbo serve-batch merge` on the output folder",
            ) from exc
        raise
    return index


def load_index(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read index {path}: {exc}") from exc
    if data.get("format") != FORMAT:
        raise InputError(f"{path} is not a zturbo latent index")
    return data
