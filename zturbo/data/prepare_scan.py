"""Find the source images under a folder, classifying what cannot be used without opening it."""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from zturbo.data import IMAGE_EXTENSIONS

# Formats worth treating as photos, kept only where this Pillow build can read them.
_CANDIDATE_EXTENSIONS = IMAGE_EXTENSIONS + (
    ".jfif",
    ".jpe",
    ".tga",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
    ".ico",
    ".jp2",
    ".j2k",
    ".jpx",
    ".avif",
    ".qoi",
)


@lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of the image files prepare reads."""
    from PIL import Image

    Image.init()
    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return frozenset(ext for ext in _CANDIDATE_EXTENSIONS if ext in readable)


@dataclass(frozen=True)
class Candidate:
    """A file that looks like an image: ``path`` as walked (maybe through symlinks), ``rel`` in POSIX form."""

    path: str
    rel: str
    size: int
    mtime_ns: int


@dataclass
class ScanResult:
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"source", "reason", "detail"}
    ignored: int = 0  # hidden files and files that are not images by extension


def scan(root: str | os.PathLike, exclude: str | os.PathLike | None = None) -> ScanResult:
    """Walk ``root`` recursively, following symlinks safely.

    Broken symlinks, symlink loops (file or folder), unreadable folders and zero-byte
    image files are reported as skipped; a folder reached twice through symlinks is
    walked once; ``exclude`` (the output folder) is never entered.
    """
    exts = image_extensions()
    result = ScanResult()
    root_st = os.stat(root)
    excluded = set()
    if exclude is not None and os.path.exists(exclude):
        ex_st = os.stat(exclude)
        excluded.add((ex_st.st_dev, ex_st.st_ino))
    root_key = (root_st.st_dev, root_st.st_ino)
    visited = {root_key}
    stack: list[tuple[str, str, frozenset]] = [(os.fspath(root), "", frozenset({root_key}))]

    def skip(rel: str, reason: str, detail: str) -> None:
        result.skipped.append({"source": rel, "reason": reason, "detail": detail})

    while stack:
        dir_path, rel_dir, ancestors = stack.pop()
        try:
            with os.scandir(dir_path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skip(rel_dir or ".", "unreadable", f"cannot list folder: {exc.strerror or exc}")
            continue
        for entry in entries:
            if entry.name.startswith("."):  # hidden files, AppleDouble "._x.jpg", our own temp files
                result.ignored += 1
                continue
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                st = os.stat(entry.path)  # follows symlinks
            except OSError as exc:
                if entry.is_symlink():
                    if exc.errno == errno.ELOOP:
                        skip(rel, "symlink-loop", "too many levels of symbolic links")
                    elif exc.errno == errno.ENOENT:
                        skip(rel, "broken-symlink", f"target {os.readlink(entry.path)!r} does not exist")
                    else:
                        skip(rel, "unreadable", exc.strerror or str(exc))
                else:
                    skip(rel, "unreadable", exc.strerror or str(exc))
                continue
            if stat_mod.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    skip(rel, "symlink-loop", "links back to a folder that contains it")
                elif key not in visited and key not in excluded:
                    visited.add(key)
                    stack.append((entry.path, rel, ancestors | {key}))
                continue
            if not stat_mod.S_ISREG(st.st_mode) or os.path.splitext(entry.name)[1].lower() not in exts:
                result.ignored += 1
                continue
            if st.st_size == 0:
                skip(rel, "empty", "zero-byte file")
                continue
            result.candidates.append(Candidate(entry.path, rel, st.st_size, st.st_mtime_ns))
    result.candidates.sort(key=lambda c: c.rel)
    result.skipped.sort(key=lambda s: s["source"])
    return result


def is_inside(child: Path, parent: Path) -> bool:
    """True when ``child`` is ``parent`` or below it (both resolved)."""
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents
