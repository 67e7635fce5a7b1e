"""WebDataset tar shards: an index of each shard's samples, and damage found while building it.

A shard is indexed by walking its tar headers with the standard library's ``tarfile``
(seeking over the data, so only the headers are read); samples are grouped by key with
WebDataset's own rule (``webdataset.tariterators.base_plus_ext``: the key is the member
name up to the first dot of its last part). A sample's image is then read by offset
(``os.pread``), so a reader needs no more memory than the samples it holds.

Damage is found, not assumed away: ``tarfile`` in ``ignore_zeros`` mode steps over a
header it cannot parse one block at a time until it finds the next good one, so the
members after a corrupt one are kept; the gap it stepped over is reported. A member whose
data runs past the end of the file (a truncated shard) is reported and left out.
"""

from __future__ import annotations

import os
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from zturbo.data import IMAGE_EXTENSIONS, ShardSample
from zturbo.errors import require

BLOCK = 512
# The image member of a sample, by preference when a sample holds several.
TAR_IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


@dataclass(frozen=True, slots=True)
class TarMember(ShardSample):
    """One sample's image in a tar shard: readable by offset, named ``shard:member`` in messages."""

    shard: Path
    member: str  # the member's name in the tar, e.g. "000017.jpg"
    key: str  # the WebDataset sample key, e.g. "000017"
    offset: int  # where the member's data starts in the file
    size: int
    unit: str = ""  # the shard's name (zturbo.data.shards.ShardSet.name)

    @property
    def suffix(self) -> str:
        return "." + self.member.rsplit(".", 1)[-1].lower() if "." in self.member else ""

    @property
    def file(self) -> Path:
        return self.shard

    @property
    def size_hint(self) -> int:
        return self.size

    def read_bytes(self) -> bytes:
        data = os.pread(open_fd(self.shard), self.size, self.offset)
        if len(data) != self.size:
            raise EOFError(f"the shard ends {self.size - len(data)} bytes into this member (changed since indexed)")
        return data

    def __str__(self) -> str:
        return f"{self.shard}:{self.member}"


@dataclass
class TarIndex:
    samples: list[TarMember] = field(default_factory=list)
    damage: str | None = None  # one line: what is wrong with the file (None: whole)
    without_image: int = 0  # samples with no image member (captions only, say): not images, not counted


def index_tar(path: Path, unit: str = "") -> TarIndex:
    """The samples of one tar shard, in file order, and the damage found (corrupt headers, truncation)."""
    base_plus_ext = require("webdataset.tariterators", "reading WebDataset shards", "webdataset").base_plus_ext
    out = TarIndex()
    members: dict[str, dict[str, tuple[str, int, int]]] = {}  # key -> ext -> (name, offset, size)
    problems: list[str] = []
    last_key = "the start"
    try:
        size = path.stat().st_size
        expected = 0  # where the next header should start
        with tarfile.open(path, "r:", ignore_zeros=True) as tar:
            while True:
                try:
                    info = tar.next()
                except tarfile.ReadError as exc:  # data cut short: the file ends inside a member
                    problems.append(f"truncated after {last_key} ({exc})")
                    break
                if info is None:
                    break
                if info.offset > expected and _has_data(path, expected, info.offset):
                    problems.append(f"corrupt tar data at bytes {expected}-{info.offset} (after {last_key}), skipped")
                end = info.offset_data + info.size
                expected = info.offset_data + -(-info.size // BLOCK) * BLOCK
                if not info.isreg():
                    continue
                if end > size:
                    problems.append(f"truncated inside member {info.name} ({size - info.offset_data} of {info.size} "
                                    "bytes)")
                    break
                key, ext = base_plus_ext(info.name)
                if key is None or Path(info.name).name.startswith("__"):
                    continue
                members.setdefault(key, {}).setdefault(ext.lower(), (info.name, info.offset_data, info.size))
                last_key = key
            if not problems and expected < size and _has_data(path, expected, size):
                problems.append(f"unreadable data after {last_key} (bytes {expected}-{size})")
    except (tarfile.TarError, OSError, EOFError) as exc:
        problems.append(f"not a readable tar file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    for key, exts in members.items():
        image = next((exts[e] for e in TAR_IMAGE_EXTENSIONS if e in exts), None)
        if image is None:
            out.without_image += 1
            continue
        name, offset, length = image
        out.samples.append(TarMember(path, name, key, offset, length, unit))
    out.damage = "; ".join(problems) or None
    return out


def _has_data(path: Path, start: int, stop: int) -> bool:
    """Whether bytes [start, stop) hold anything but zeros (zero blocks end a tar, or pad it)."""
    with open(path, "rb") as fh:
        fh.seek(start)
        remaining = stop - start
        while remaining > 0:
            chunk = fh.read(min(remaining, 1 << 20))
            if not chunk:
                return False
            if chunk.count(0) != len(chunk):
                return True
            remaining -= len(chunk)
    return False


# Open shard files, per thread: a reader thread reads many members of few shards. Each thread keeps its own
# (at most _OPEN_LIMIT, the least recently used closed first), so no thread closes a file another is reading;
# a forked loader worker inherits them, and pread needs no shared file position.
_OPEN_LIMIT = 16
_local = threading.local()


def open_fd(path: Path) -> int:
    files: OrderedDict[Path, int] | None = getattr(_local, "files", None)
    if files is None:
        files = _local.files = OrderedDict()
    fd = files.get(path)
    if fd is not None:
        files.move_to_end(path)
        return fd
    fd = files[path] = os.open(path, os.O_RDONLY)
    while len(files) > _OPEN_LIMIT:
        os.close(files.popitem(last=False)[1])
    return fd
