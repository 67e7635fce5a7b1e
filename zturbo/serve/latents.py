"""What to decode: latents from encode outputs, shards, ``.safetensors`` and ``.npy`` files."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from zturbo.data.images import bucket_crop_box
from zturbo.errors import InputError
from zturbo.paths import inside, safe_name, unique_names
from zturbo.serve import store


@dataclass(frozen=True)
class LatentItem:
    """One latent to decode: ``name`` is the output path without extension (see :func:`assign_names`)."""

    name: str
    file: Path
    tensor: str | None  # safetensors tensor name; None for .npy
    row: int | None  # index into a batched (B, C, h, w) array; None for a single (C, h, w)
    shape: tuple[int, int, int]
    # For latents from an encode run: the source image's displayed (width, height) and the
    # size bucket it was resized to, so decode can restore the source resolution.
    source_size: tuple[int, int] | None = None
    bucket: tuple[int, int] | None = None
    suffix: str = ""  # the source's or file's extension: what tells apart two latents of one name

    def source_region(self) -> tuple[int, int] | None:
        """(width, height) in source pixels of the region this latent covers (the bucket's crop of the source)."""
        if not self.source_size or not self.bucket or not all(self.source_size):
            return None
        left, top, right, bottom = bucket_crop_box(*self.source_size, self.bucket)
        return max(1, round(right - left)), max(1, round(bottom - top))


def enumerate_latents(path: str | Path) -> list[LatentItem]:
    """Every latent under ``path`` (an encode output folder, a folder of files, or one file), named for output."""
    return assign_names(_find_latents(Path(path)))


def assign_names(items: list[LatentItem]) -> list[LatentItem]:
    """Output names from the items' keys that cannot leave the output folder, distinct from each other.

    A key (a source path from an index or a file's metadata, or a file's own path) becomes a
    relative name with ``..``, absolute and drive parts re-rooted (``zturbo.paths.safe_name``).
    Names that still collide (``a.jpg`` and ``a.png``) get their extension (``a_jpg``, ``a_png``),
    then a counter.
    """
    stems = [safe_name(it.name) for it in items]
    counts = Counter(s.casefold() for s in stems)
    named = [f"{s}_{safe_name(it.suffix)}" if counts[s.casefold()] > 1 and it.suffix else s
             for s, it in zip(stems, items)]
    return [replace(it, name=name) for it, name in zip(items, unique_names(named))]


def _find_latents(path: Path) -> list[LatentItem]:
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
    if path.is_symlink():
        raise InputError(f"latents not found: {path} is a symlink to {os.readlink(path)}, which does not exist")
    raise InputError(f"latents not found: {path}", "give an encode output folder, a shard, or .safetensors / .npy files")


def _entry_item(e: object, file: Path, where: str) -> LatentItem:
    """An index or shard-metadata entry as an item; an InputError naming ``where`` when it is malformed."""
    try:
        if not isinstance(e, dict):
            raise TypeError(f"an object, not {type(e).__name__}")
        source, tensor = e["source"], e["tensor"]
        if not isinstance(source, str) or not isinstance(tensor, str):
            raise TypeError("'source' and 'tensor' must be strings")
        shape = tuple(int(v) for v in e["shape"])
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"'shape' must be (C, h, w), got {list(e['shape'])}")
        size = (int(e["width"]), int(e["height"])) if e.get("width") and e.get("height") else None
        bucket = tuple(int(v) for v in e["bucket"]) if e.get("bucket") else None
        if bucket is not None and (len(bucket) != 2 or min(bucket) < 1):
            raise ValueError(f"'bucket' must be (width, height), got {list(e['bucket'])}")
    except KeyError as exc:
        raise InputError(f"{where}: the entry lacks the key {exc}", "rebuild it: zturbo serve-batch merge FOLDER") from None
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: malformed entry: {exc}", "rebuild it: zturbo serve-batch merge FOLDER") from None
    stem = PurePosixPath(source)
    return LatentItem(str(stem.with_suffix("")) if stem.suffix else source, file, tensor, None, shape, size, bucket,
                      stem.suffix[1:])


def _from_index(index_path: Path) -> list[LatentItem]:
    """The index's entries, each shard kept to an encode output and checked to hold the entry's latent."""
    index = store.load_index(index_path)
    entries = index.get("entries")
    if not isinstance(entries, list):
        raise InputError(f"{index_path}: 'entries' is not a list", "rebuild it: zturbo serve-batch merge FOLDER")
    items = []
    shards: dict[str, Path] = {}
    for n, e in enumerate(entries):
        where = f"{index_path} entry {n}"
        item = _entry_item(e, index_path.parent, where)
        rel = e.get("shard")
        if rel not in shards:
            shards[rel] = _shard_file(index_path, rel, where)
        items.append(replace(item, file=shards[rel]))
    _check_shards(items)
    return items


def _shard_file(index_path: Path, rel: object, where: str) -> Path:
    """The shard an index entry names: a ``.safetensors`` file inside the index's folder, or in the shard
    folder of another encode output (what ``serve-batch merge`` writes); anything else is refused."""
    if not isinstance(rel, str) or not rel.endswith(".safetensors"):
        raise InputError(f"{where}: 'shard' must be the relative path of a .safetensors file, got {rel!r}")
    if Path(rel).is_absolute():
        raise InputError(f"{where}: shard {rel!r} is an absolute path", "paths in an index are relative to its folder")
    path = (index_path.parent / rel).resolve()
    in_output = path.parent.name == store.SHARD_DIR and (path.parent.parent / store.SETTINGS_NAME).is_file()
    if not (inside(path, index_path.parent) or in_output):
        raise InputError(f"{where}: shard {rel!r} points outside {index_path.parent}",
                         "an index's shards live in its folder or in another encode output's shards/ folder")
    if not path.is_file():
        raise InputError(f"{where}: shard {rel!r} not found ({path})", "rebuild the index: zturbo serve-batch merge FOLDER")
    return path


def _check_shards(items: list[LatentItem]) -> None:
    """Open every shard once (headers only): a truncated or foreign file, or a missing latent, is named now."""
    from safetensors import safe_open

    by_file: dict[Path, list[LatentItem]] = {}
    for it in items:
        by_file.setdefault(it.file, []).append(it)
    for file, members in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as fh:
                shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        except Exception as exc:  # safetensors raises its own error type for a damaged file
            raise InputError(f"cannot read shard {file}: {_first_line(exc)}",
                             "the file is damaged or not a safetensors shard; re-encode its sources") from exc
        for it in members:
            if shapes.get(it.tensor) != it.shape:
                found = "missing" if it.tensor not in shapes else f"of shape {list(shapes[it.tensor])}"
                raise InputError(f"shard {file}: latent {it.tensor!r} for {it.name!r} is {found}, "
                                 f"the index says {list(it.shape)}", "rebuild the index: zturbo serve-batch merge FOLDER")


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


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
            if not isinstance(entries, list):
                raise InputError(f"{path}: its metadata's entries are not a list")
            items = [replace(_entry_item(e, path, f"{path} metadata entry {n}"), file=path)
                     for n, e in enumerate(entries)]
            _check_shards(items)
            return items
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
        raise InputError(f"cannot read {path}: {_first_line(exc)}") from exc


def _rows(path: Path, tensor: str | None, shape: tuple, dtype: str, base: str) -> list[LatentItem]:
    if not any(t in dtype.lower() for t in ("float", "f16", "f32", "f64", "bf16", "half")):
        raise InputError(f"{path}{'[' + tensor + ']' if tensor else ''}: latents must be floating point, got {dtype}")
    suffix = path.suffix[1:]
    if len(shape) == 3:
        return [LatentItem(base, path, tensor, None, shape, suffix=suffix)]
    if len(shape) == 4:
        return [LatentItem(f"{base}_{i:05d}", path, tensor, i, shape[1:], suffix=suffix) for i in range(shape[0])]
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
        """The latent as float32; an InputError naming the file when it cannot be read (changed since listed)."""
        try:
            return self._load(item)
        except Exception as exc:  # numpy and safetensors raise their own error types
            where = f"{item.file}" + (f"[{item.tensor}]" if item.tensor else "")
            raise InputError(f"cannot read latent {where}: {_first_line(exc)}",
                             "the file changed or is damaged; decode the rest, then re-encode its sources") from exc

    def _load(self, item: LatentItem) -> torch.Tensor:
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
