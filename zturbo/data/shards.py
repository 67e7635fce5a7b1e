"""Image shards as an input: WebDataset tar files or Parquet files, named by a path, a glob or a brace pattern.

    >>> from zturbo.data.shards import find_shards, index_shards
    >>> shards = find_shards("data/{000000..000099}.tar")     # None for a folder of images
    >>> index = index_shards(shards)
    >>> index.units[0].name, index.units[0].samples[0].key    # ('000000', '000000017')

Every command that reads images (``serve-batch encode``, ``train``, ``eval``, ``prepare``)
takes these. A sample is known by its *source key*, ``<shard name>/<sample key>``
(``000003/000000017``): the shard's path relative to the shards' common folder, without
``.tar`` / ``.parquet``, then the key inside it. Samples come back as objects with
``read_bytes()`` (:class:`~zturbo.data.tar_shards.TarMember`,
:class:`~zturbo.data.parquet_shards.ParquetRow`), which ``zturbo.data.images`` opens like files.

A shard that is damaged as a file (a corrupt tar header, a truncated shard, a Parquet file
that cannot be read or has no image column) is listed in ``ShardIndex.damaged``, one line
each; its readable samples are kept. An image that does not decode is a bad sample, reported
by whoever decodes it as bad files are.
"""

from __future__ import annotations

import glob
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from zturbo.data import IMAGE_EXTENSIONS
from zturbo.data.parquet_shards import ParquetRow, index_parquet
from zturbo.data.tar_shards import TarMember, index_tar
from zturbo.errors import InputError, require

SHARD_KINDS = {".tar": "webdataset", ".parquet": "parquet"}
EXTRAS = {"webdataset": "webdataset", "parquet": "parquet"}  # the extra that reads each kind
_PATTERN_CHARS = "*?[{"


@dataclass(frozen=True)
class ShardSet:
    """The shard files one input names: all of one kind, sorted by path."""

    spec: str
    kind: str  # "webdataset" | "parquet"
    files: tuple[Path, ...]
    root: Path  # the folder shard names are relative to

    def name(self, path: Path) -> str:
        rel = Path(os.path.relpath(path, self.root)).as_posix()
        return rel[: -len(path.suffix)] if path.suffix else rel


@dataclass
class Unit:
    """One shard file and its samples, in file order (what ``--output-format webdataset`` writes one tar for)."""

    name: str
    path: Path
    samples: list[TarMember | ParquetRow]



@dataclass
class ShardIndex:
    shards: ShardSet
    units: list[Unit] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # one line per damaged shard: "PATH: what is wrong"

    @property
    def count(self) -> int:
        return sum(len(u.samples) for u in self.units)


def is_pattern(text: str) -> bool:
    return any(c in text for c in _PATTERN_CHARS)


def find_shards(spec: str | os.PathLike) -> ShardSet | None:
    """The shards ``spec`` names, or None when it names no shards (a folder of images, a manifest, an image).

    ``spec`` is a ``.tar`` / ``.parquet`` file, a glob (``shards/*.tar``), brace notation
    (``shards/{000000..000099}.tar``, every name it expands to must exist), or a folder that
    holds shard files and no images (searched recursively). An InputError when a pattern
    matches nothing, names missing files, or mixes tar and Parquet files.
    """
    text = os.fspath(spec)
    path = Path(text)
    if path.is_file():
        return _shard_set(text, [path]) if path.suffix.lower() in SHARD_KINDS else None
    if path.is_dir():
        found = []
        for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            names = [n for n in filenames if not n.startswith(".")]
            if any(Path(n).suffix.lower() in IMAGE_EXTENSIONS for n in names):
                return None  # a folder of images
            found += [Path(dirpath) / n for n in names if Path(n).suffix.lower() in SHARD_KINDS]
        return _shard_set(text, found) if found else None
    if not is_pattern(text):
        return None
    return _shard_set(text, _expand(text))


def _expand(pattern: str) -> list[Path]:
    """Files a brace and/or glob pattern names; an InputError when it names nothing or missing files."""
    if "{" in pattern:
        names = list(require("braceexpand", "brace patterns of shards", "webdataset").braceexpand(pattern))
    else:
        names = [pattern]
    files: list[Path] = []
    missing = []
    for name in names:
        if any(c in name for c in "*?["):
            files += [Path(p) for p in sorted(glob.glob(name, recursive=True)) if Path(p).is_file()]
        elif Path(name).is_file():
            files.append(Path(name))
        else:
            missing.append(name)
    if not files:
        raise InputError(f"no shards match {pattern}" + (f" ({len(names)} names expanded, none exists)"
                                                         if len(names) > 1 else ""),
                         "check the pattern, e.g. shards/{000000..000099}.tar or 'shards/*.parquet'")
    if missing:
        raise InputError(f"{len(missing)} of the {len(names)} shards {pattern} names are missing "
                         f"(first: {missing[0]})", "fix the range, or name the shards that exist with a glob")
    return files


def _shard_set(spec: str, files: list[Path]) -> ShardSet:
    kinds = {SHARD_KINDS.get(p.suffix.lower()) for p in files}
    if None in kinds:
        odd = next(p for p in files if p.suffix.lower() not in SHARD_KINDS)
        raise InputError(f"{spec} matches {odd}, which is neither a .tar nor a .parquet shard")
    if len(kinds) > 1:
        raise InputError(f"{spec} matches both .tar and .parquet files", "give one kind of shard at a time")
    files = sorted(dict.fromkeys(Path(os.path.abspath(p)) for p in files))
    root = Path(os.path.commonpath([p.parent for p in files]))
    return ShardSet(spec, kinds.pop(), tuple(files), root)


# Indexes built in this process, by the files' identity (path, size, mtime) and the image column: a
# command that checks its input before loading a model and then reads it indexes it once.
_INDEXES: OrderedDict[tuple, ShardIndex] = OrderedDict()


def index_shards(shards: ShardSet, image_column: str | None = None, threads: int = 8) -> ShardIndex:
    """Every shard's samples (headers and row counts only, read by ``threads`` threads) and what is damaged."""
    require(*(("webdataset", "reading WebDataset shards", "webdataset") if shards.kind == "webdataset"
              else ("pyarrow.parquet", "reading Parquet shards", "parquet")))
    try:
        ident = tuple((p, p.stat().st_size, p.stat().st_mtime_ns) for p in shards.files)
    except OSError as exc:
        raise InputError(f"cannot read shard {exc.filename}: {exc.strerror or exc}") from exc
    key = (ident, image_column)
    if key in _INDEXES:
        _INDEXES.move_to_end(key)
        return _INDEXES[key]

    def one(path: Path):
        if shards.kind == "webdataset":
            tar = index_tar(path, shards.name(path))
            return tar.samples, tar.damage
        pq = index_parquet(path, image_column, shards.name(path))
        return [row for group in pq.groups for row in group], pq.damage

    index = ShardIndex(shards)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards.files)))) as pool:
        for path, (samples, damage) in zip(shards.files, pool.map(one, shards.files)):
            if damage is not None:
                index.damaged.append(f"{path}: {damage}")
            index.units.append(Unit(shards.name(path), path, samples))
    if index.count == 0:
        first = index.damaged[0] if index.damaged else f"{shards.files[0]}: no image members"
        raise InputError(f"no readable images in {shards.spec} ({first})",
                         f"images are read from members named KEY.{{{','.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}}}"
                         if shards.kind == "webdataset" else "give --image-column, or check the files")
    _INDEXES[key] = index
    while len(_INDEXES) > 4:
        _INDEXES.popitem(last=False)
    return index


def block_of(sample: TarMember | ParquetRow) -> tuple:
    """What a reader holds while reading ``sample``: its tar file, or its Parquet row group."""
    return (sample.shard,) if isinstance(sample, TarMember) else (sample.file, sample.group)


def check_undamaged(index: ShardIndex, hint: str) -> None:
    """An InputError naming the first damaged shard (and how many there are), for jobs that must not run on less."""
    if index.damaged:
        more = f" (and {len(index.damaged) - 1} more damaged shard(s))" if len(index.damaged) > 1 else ""
        raise InputError(f"damaged shard {index.damaged[0]}{more}", hint)
