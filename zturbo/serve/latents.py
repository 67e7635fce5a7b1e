"""What to decode: latents from encode outputs, shards, ``.safetensors`` and ``.npy`` files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from zturbo.errors import InputError
from zturbo.serve import store
from zturbo.data.images import bucket_crop_box


@dataclass(frozen=True)
class LatentItem:
    """One latent to decode: ``name`` is the output path without extension."""

    name: str
    file: Path
    tensor: str | None  # safetensors tensor name; None for .npy
    row: int | None  # index into a batched (B, C, h, w) array; None for a single (C, h, w)
    shape: tuple[int, int, int]
    # For latents from an encode run: the source image's displayed (width, height) and the
    # size bucket it was resized to, so decode can restore the source resolution.
    source_size: tuple[int, int] | None = None
    bucket: tuple[int, int] | None = None

    def source_region(self) -> tuple[int, int] | None:
        """(width, height) in source pixels of the region this latent covers (the bucket's crop of the source)."""
        if not self.source_size or not self.bucket or not all(self.source_size):
            return None
        left, top, right, bottom = bucket_crop_box(*self.source_size, self.bucket)
        return max(1, round(right - left)), max(1, round(bottom - top))


def _entry_item(e: dict, file: Path) -> LatentItem:
    size = (int(e["width"]), int(e["height"])) if e.get("width") and e.get("height") else None
    bucket = tuple(int(v) for v in e["bucket"]) if e.get("bucket") else None
    return LatentItem(_stem(e["source"]), file, e["tensor"], None, tuple(e["shape"]), size, bucket)


def enumerate_latents(path: str | Path) -> list[LatentItem]:
    """Every latent under ``path``: an encode output folder, a folder of files, or one file."""
    path = Path(path)
    if path.is_dir():
        index = path / store.INDEX_NAME
        if index.is_file():
            return _from_index(index)
        if (path / store.SHARD_DIR).is_dir():
            files = sorted(p for p in (path / store.SHARD_DIR).glob("*.safetensors") if not store.is_temp(p))
        else:
            files = sorted(
                p for p in path.rglob("*") if p.suffix in (".safetensors", ".npy") and not store.is_temp(p)
            )
        if not files:
            raise InputError(f"no latents in {path}", "expected index.json, shards/, or .safetensors / .npy files")
        items: list[LatentItem] = []
        for f in files:
            prefix = "" if (path / store.SHARD_DIR).is_dir() else PurePosixPath(f.relative_to(path).parent.as_posix())
            items += _from_file(f, str(prefix) if prefix not in ("", ".") else "")
        return items
    if path.is_file():
        return _from_file(path, "")
    raise InputError(f"latents not found: {path}", "give an encode output folder, a shard, or .safetensors / .npy files")


def _from_index(index_path: Path) -> list[LatentItem]:
    index = store.load_index(index_path)
    return [_entry_item(e, index_path.parent / e["shard"]) for e in index["entries"]]


def _stem(source: str) -> str:
    p = PurePosixPath(source)
    return str(p.with_suffix("")) if p.suffix else str(p)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _from_file(path: Path, prefix: str) -> list[LatentItem]:
    if path.suffix == ".safetensors":
        return _from_safetensors(path, prefix)
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {path}: {exc}") from exc
        return _rows(path, None, tuple(arr.shape), str(arr.dtype), _join(prefix, path.stem))
    raise InputError(f"{path}: unsupported latent file", "give .safetensors or .npy files")


def _from_safetensors(path: Path, prefix: str) -> list[LatentItem]:
    from safetensors import safe_open

    try:
        entries = store.read_shard_entries(path)
        if entries is not None:
            return [_entry_item(e, path) for e in entries]
        items = []
        with safe_open(str(path), framework="pt") as fh:
            keys = sorted(fh.keys())
            for key in keys:
                sl = fh.get_slice(key)
                base = _join(prefix, path.stem if len(keys) == 1 else f"{path.stem}/{key}")
                items += _rows(path, key, tuple(sl.get_shape()), sl.get_dtype(), base)
        return items
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read {path}: {str(exc).splitlines()[0]}") from exc


def _rows(path: Path, tensor: str | None, shape: tuple, dtype: str, base: str) -> list[LatentItem]:
    if not any(t in dtype.lower() for t in ("float", "f16", "f32", "f64", "bf16", "half")):
        raise InputError(f"{path}{'[' + tensor + ']' if tensor else ''}: latents must be floating point, got {dtype}")
    if len(shape) == 3:
        return [LatentItem(base, path, tensor, None, shape)]
    if len(shape) == 4:
        return [LatentItem(f"{base}_{i:05d}", path, tensor, i, shape[1:]) for i in range(shape[0])]
    raise InputError(
        f"{path}{'[' + tensor + ']' if tensor else ''}: latents must be (C, h, w) or (B, C, h, w), got shape {shape}"
    )


def check_channels(items: list[LatentItem], latent_channels: int) -> None:
    """Reject every latent whose channel count is not the model's, before any work starts."""
    bad = [it for it in items if it.shape[0] != latent_channels]
    if bad:
        first = bad[0]
        where = f"{first.file}" + (f"[{first.tensor}]" if first.tensor else "")
        raise InputError(
            f"{len(bad)} of {len(items)} latents have the wrong channel count: {where} has shape "
            f"{tuple(first.shape)}, {first.shape[0]} channels, but this model's decoder takes {latent_channels}",
            "decode them with the VAE that encoded them (latents are not interchangeable between VAEs)",
        )


class LatentReader:
    """Loads items; keeps files open per process (a shard holds many latents)."""

    def __init__(self) -> None:
        self._open: dict[Path, object] = {}

    def load(self, item: LatentItem) -> torch.Tensor:
        if item.tensor is None:
            arr = np.load(item.file, mmap_mode="r", allow_pickle=False)
            row = arr if item.row is None else arr[item.row]
            return torch.from_numpy(np.array(row, dtype=np.float32))  # a copy: the memory map is read-only
        from safetensors import safe_open

        fh = self._open.get(item.file)
        if fh is None:
            fh = self._open[item.file] = safe_open(str(item.file), framework="pt")
        t = fh.get_slice(item.tensor)[item.row] if item.row is not None else fh.get_tensor(item.tensor)
        return t.float()
