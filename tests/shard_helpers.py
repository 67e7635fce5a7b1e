"""WebDataset and Parquet shards for the tests: made here, from small generated images."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(i: int, size: tuple[int, int] = (32, 32), fmt: str = "PNG") -> bytes:
    """A small image that differs from image ``i + 1`` (a gradient with a per-image colour and noise)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(i)
    arr = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, (i * 37) % 256)], -1)
    arr = np.clip(arr + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_tar_shards(root: Path, shards: int, per_shard: int, size: tuple[int, int] = (32, 32),
                    caption: bool = True) -> list[Path]:
    """``shards`` tars of ``per_shard`` samples each (KEY.png, and KEY.txt with ``caption``), as img2dataset
    lays them out: shard 000003 holds keys 000003xxxx."""
    paths = []
    for s in range(shards):
        members = []
        for i in range(per_shard):
            key = f"{s:06d}{i:04d}"
            members.append((f"{key}.png", image_bytes(s * per_shard + i, size)))
            if caption:
                members.append((f"{key}.txt", b"a caption"))
        paths.append(write_tar(root / f"{s:06d}.tar", members))
    return paths


def corrupt_header(path: Path, member: str) -> None:
    """Overwrite the tar header of ``member`` with garbage (its checksum no longer matches)."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 100] = b"\xff" * 100
    path.write_bytes(bytes(raw))


def truncate_inside(path: Path, member: str, keep: int = 10) -> None:
    """Cut the file ``keep`` bytes into ``member``'s data."""
    with tarfile.open(path) as tar:
        cut = tar.getmember(member).offset_data + keep
    path.write_bytes(path.read_bytes()[:cut])


def make_parquet(path: Path, count: int, struct: bool = True, row_group_size: int = 3, key: bool = False) -> Path:
    """A Parquet file of ``count`` images: Hugging Face's {"bytes", "path"} struct column "image" (or a plain
    bytes column "jpg"), a text column, and with ``key`` a "key" column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = [image_bytes(i) for i in range(count)]
    columns = {"image": [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(data)]} if struct else {"jpg": data}
    columns["text"] = [f"caption {i}" for i in range(count)]
    if key:
        columns["key"] = [f"k{i:03d}" for i in range(count)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path
