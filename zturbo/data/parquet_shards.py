"""Parquet shards: images in a bytes column (or a Hugging Face ``{"bytes", "path"}`` struct), read with pyarrow.

A Parquet file is read by row group, Parquet's own unit of storage and compression: a
row group is the unit a reader keeps in memory (a few per reading thread), so memory is
bounded by the row groups in flight, not by the file. Only the schema and the row counts
are read to index a file, plus the key column (``__key__`` or ``key``) when there is one;
without it a sample's key is its row number in the file.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from zturbo.data import ShardSample
from zturbo.errors import require

# Column names tried first when several columns could hold the image.
IMAGE_COLUMN_NAMES = ("image", "jpg", "jpeg", "png", "webp", "img")
KEY_COLUMNS = ("__key__", "key")


@dataclass(frozen=True, slots=True)
class ParquetRow(ShardSample):
    """One sample's image in a Parquet file: row ``row`` of row group ``group``, column ``column``."""

    file: Path
    group: int
    row: int
    column: str
    key: str
    struct: bool  # the column is a {"bytes", "path"} struct (Hugging Face's Image feature)
    unit: str = ""  # the file's name (zturbo.data.shards.ShardSet.name)

    @property
    def suffix(self) -> str:
        return ""

    @property
    def size_hint(self) -> int:
        """Bytes are known only once read: prepare tells samples apart by their shard file's time."""
        return 0

    def read_bytes(self) -> bytes:
        cells = _row_group(self.file, self.group, self.column)
        value = cells[self.row]
        if self.struct:
            value = value["bytes"] if value is not None else None
        if value is None:
            raise ValueError(f"row {self.key} has no image bytes in column {self.column!r}")
        return value

    def __str__(self) -> str:
        return f"{self.file}:{self.key}"


@dataclass
class ParquetIndex:
    groups: list[list[ParquetRow]] = field(default_factory=list)  # the samples of each row group
    damage: str | None = None


def _pq():
    return require("pyarrow.parquet", "reading Parquet shards", "parquet")


def image_columns(schema) -> list[tuple[str, bool]]:
    """(name, is a struct) of every column that can hold image bytes."""
    import pyarrow as pa

    found = []
    for f in schema:
        if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type):
            found.append((f.name, False))
        elif pa.types.is_struct(f.type):
            inner = {c.name: c.type for c in f.type}
            if "bytes" in inner and (pa.types.is_binary(inner["bytes"]) or pa.types.is_large_binary(inner["bytes"])):
                found.append((f.name, True))
    return found


def index_parquet(path: Path, image_column: str | None, unit: str = "") -> ParquetIndex:
    """The samples of one Parquet file by row group; damage when it cannot be read or has no image column."""
    pq = _pq()
    out = ParquetIndex()
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError and others for a bad file
        out.damage = f"not a readable Parquet file ({_first_line(exc)})"
        return out
    candidates = image_columns(schema)
    names = ", ".join(schema.names)
    if image_column is not None:
        chosen = next((c for c in candidates if c[0] == image_column), None)
        if chosen is None:
            what = "holds no image bytes" if image_column in schema.names else "does not exist"
            out.damage = f"column {image_column!r} {what} (columns: {names})"
            return out
    elif not candidates:
        out.damage = f"no image column (no bytes column nor {{bytes, path}} struct; columns: {names}); " \
                     "give --image-column"
        return out
    else:
        preferred = [c for c in candidates if c[0].lower() in IMAGE_COLUMN_NAMES]
        chosen = candidates[0] if len(candidates) == 1 else preferred[0] if len(preferred) == 1 else None
        if chosen is None:
            out.damage = (f"several columns could hold the image ({', '.join(c for c, _ in candidates)}); "
                          "give --image-column")
            return out
    column, struct = chosen
    key_column = next((k for k in KEY_COLUMNS if k in schema.names), None)
    start = 0
    try:
        for g in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            if key_column is not None:
                keys = [str(k) for k in pf.read_row_group(g, columns=[key_column]).column(0).to_pylist()]
            else:
                keys = [f"{start + i:09d}" for i in range(rows)]
            out.groups.append([ParquetRow(path, g, i, column, keys[i], struct, unit) for i in range(rows)])
            start += rows
    except Exception as exc:  # noqa: BLE001
        out.damage = f"row group {len(out.groups)} is unreadable ({_first_line(exc)})"
    return out


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# Decoded row groups, per thread (a few: the ones a reader is working through), least recently used dropped.
_GROUPS_PER_THREAD = 4
_local = threading.local()


def _row_group(path: Path, group: int, column: str) -> list:
    cache: OrderedDict | None = getattr(_local, "groups", None)
    if cache is None:
        cache = _local.groups = OrderedDict()
    key = (path, group, column)
    cells = cache.get(key)
    if cells is None:
        table = _pq().ParquetFile(path).read_row_group(group, columns=[column])
        cells = cache[key] = table.column(0).to_pylist()
        while len(cache) > _GROUPS_PER_THREAD:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return cells
