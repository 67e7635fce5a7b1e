"""What to encode: input discovery, stable partitioning, header probing and size buckets."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from zturbo.data import IMAGE_EXTENSIONS
from zturbo.errors import InputError, UsageError

# Aspect ratios (width / height) of the buckets in "aspect" mode, portrait to landscape.
ASPECT_RATIOS = (1 / 4, 1 / 3, 1 / 2, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 2.0, 3.0, 4.0)
MANIFEST_SUFFIXES = (".txt", ".lst", ".jsonl", ".json")


@dataclass(frozen=True)
class Source:
    """One input image: ``key`` is its name in the index (relative path), ``path`` where to read it."""

    key: str
    path: Path


@dataclass(frozen=True)
class Probed:
    source: Source
    width: int
    height: int
    bucket: tuple[int, int]  # (width, height) the image is resized and cropped to


@dataclass(frozen=True)
class Failure:
    key: str
    reason: str
    detail: str = ""

    def to_dict(self) -> dict:
        return {"source": self.key, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class Partition:
    """This process's part: machine shard ``index``/``count`` (--shard) and rank ``rank``/``world_size``."""

    index: int = 0
    count: int = 1
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise UsageError(f"--shard {self.index}/{self.count}: I must be in 0..{self.count - 1}")
        if not 0 <= self.rank < self.world_size:
            raise UsageError(f"rank {self.rank} is outside world size {self.world_size}")

    @property
    def name(self) -> str:
        return f"s{self.index}of{self.count}-r{self.rank}of{self.world_size}"

    def owns(self, key: str) -> bool:
        # A hash of the key, not the position in a listing: adding files later never moves
        # an already-processed file into another part.
        h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")
        return h % self.count == self.index and (h // self.count) % self.world_size == self.rank


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like I/N (e.g. 0/4), got '{text}'") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text}: need N >= 1 and 0 <= I < N")
    return i, n


def discover_sources(input_path: str | os.PathLike) -> tuple[list[Source], int]:
    """All images under a folder (recursively) or listed in a manifest; returns (sources, duplicates dropped).

    A manifest is a text file with one path per line (``#`` comments allowed), a
    ``.jsonl`` file of ``{"path": ...}`` objects or a ``.json`` list; relative paths
    are taken from the manifest's folder.
    """
    root = Path(input_path)
    if root.is_dir():
        found = [Source(path.relative_to(root).as_posix(), path) for path in _walk_images(root)]
        found.sort(key=lambda s: s.key)
        return found, 0
    if root.is_file():
        if root.suffix.lower() not in MANIFEST_SUFFIXES:
            raise InputError(
                f"{root} is neither a folder nor a manifest",
                f"give a folder of images or a manifest ({', '.join(MANIFEST_SUFFIXES)}) listing them",
            )
        return _read_manifest(root)
    raise InputError(f"input not found: {root}", "give a folder of images or a manifest file listing them")


def _walk_images(root: Path) -> list[Path]:
    """Image files under ``root``, through symlinked folders, each folder entered once: a link back to a
    folder already walked (``loop -> .``) is not followed again. Hidden entries are skipped."""
    found = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return found


def _read_manifest(manifest: Path) -> tuple[list[Source], int]:
    try:
        text = manifest.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read manifest {manifest}: {exc}") from exc
    suffix = manifest.suffix.lower()
    try:
        if suffix == ".json":
            raw = json.loads(text)
            if not isinstance(raw, list):
                raise ValueError("expected a JSON list of paths")
            names = [r["path"] if isinstance(r, dict) else r for r in raw]
        elif suffix == ".jsonl":
            names = [json.loads(line)["path"] for line in text.splitlines() if line.strip()]
        else:
            names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"manifest {manifest} is malformed: {exc}", 'use one path per line, or {"path": ...} objects') from exc
    seen: set[str] = set()
    sources = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise InputError(f"manifest {manifest} holds a non-path entry: {name!r}")
        if name in seen:
            continue
        seen.add(name)
        path = Path(name)
        sources.append(Source(name, path if path.is_absolute() else manifest.parent / path))
    return sources, len(names) - len(sources)


# ---------------------------------------------------------------------------------------------------------
# Buckets


def bucket_sizes(size: int, step: int, mode: str) -> list[tuple[int, int]]:
    """(width, height) of every bucket: multiples of ``step`` with about size^2 pixels."""
    if size % step:
        raise UsageError(f"--size {size} must be a multiple of {step} (the model's downsampling factor)")
    if mode == "square":
        return [(size, size)]
    out = []
    for ratio in ASPECT_RATIOS:
        w = max(step, round(size * math.sqrt(ratio) / step) * step)
        h = max(step, round(size / math.sqrt(ratio) / step) * step)
        if (w, h) not in out:
            out.append((w, h))
    return out


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), b))


def probe(source: Source, buckets: list[tuple[int, int]], max_pixels: int) -> Probed | Failure:
    """Read only the header: displayed size (after EXIF rotation) and bucket. Cheap; decodes no pixels."""
    from PIL import Image

    try:
        with Image.open(source.path) as im:
            width, height = im.size
            try:
                orientation = im.getexif().get(0x0112, 1)
            except Exception:  # noqa: BLE001 - a broken EXIF block only loses the rotation hint
                orientation = 1
    except FileNotFoundError:
        return Failure(source.key, "missing", "file or symlink target not found")
    except PermissionError:
        return Failure(source.key, "unreadable", "permission denied")
    except Image.UnidentifiedImageError:
        return Failure(source.key, "not-an-image")
    except Image.DecompressionBombError as exc:
        return Failure(source.key, "too-large", str(exc))
    except (OSError, SyntaxError, ValueError) as exc:
        return Failure(source.key, "corrupt", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if width * height > max_pixels:
        return Failure(source.key, "too-large", f"{width}x{height} exceeds {max_pixels} pixels")
    if width < 1 or height < 1:
        return Failure(source.key, "corrupt", f"empty image {width}x{height}")
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return Probed(source, width, height, nearest_bucket(width, height, buckets))


def _probe_chunk(args):
    sources, buckets, max_pixels = args
    return [probe(s, buckets, max_pixels) for s in sources]


def probe_all(
    sources: list[Source], buckets: list[tuple[int, int]], max_pixels: int, workers: int
) -> list[Probed | Failure]:
    """Probe headers, in worker processes when there are many."""
    if workers <= 1 or len(sources) < 512:
        return [probe(s, buckets, max_pixels) for s in sources]
    import multiprocessing as mp

    chunk = 256
    jobs = [(sources[i : i + chunk], buckets, max_pixels) for i in range(0, len(sources), chunk)]
    with mp.get_context("spawn" if os.name != "posix" else "fork").Pool(workers) as pool:
        return [r for part in pool.imap(_probe_chunk, jobs) for r in part]
