"""Evaluation images: find them, read them robustly, batch them at a fixed or native size."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from zturbo.data import IMAGE_EXTENSIONS
from zturbo.data.images import ImageReadError, open_image
from zturbo.errors import InputError


@dataclass
class Skipped:
    path: str
    reason: str
    detail: str


@dataclass
class ImageBatch:
    names: list[str]
    pixels: torch.Tensor  # uint8 (B, 3, H, W)
    original_sizes: list[tuple[int, int]]  # (width, height) of each file before resizing


@dataclass
class ImageSet:
    root: Path
    paths: list[Path]
    skipped: list[Skipped] = field(default_factory=list)

    def name(self, path: Path) -> str:
        return path.name if self.root.is_file() else path.relative_to(self.root).as_posix()


def find_images(data_dir: str | Path, max_images: int | None = None) -> ImageSet:
    """Image files under ``data_dir`` (recursive, hidden entries skipped), sorted by path."""
    root = Path(data_dir)
    if not root.exists():
        raise InputError(f"data folder not found: {root}", "give --data a folder of images")
    if root.is_file():
        paths = [root]
    else:
        paths = sorted(
            p
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and (p.is_file() or (p.is_symlink() and not p.is_dir()))  # a dangling link is listed as skipped
        )
    if not paths:
        raise InputError(
            f"no images in {root}", f"eval reads {', '.join(IMAGE_EXTENSIONS)} files (subfolders included)"
        )
    if max_images is not None:
        paths = paths[:max_images]
    return ImageSet(root, paths)


def load_pixels(path: Path, size: int | str, max_pixels: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 (3, H, W): the image as is ('native') or shorter side resized to ``size`` and center-cropped."""
    im = open_image(path, max_pixels=max_pixels, draft_size=None if size == "native" else int(size))
    original_size = im.size
    if size != "native":
        im = ImageOps.fit(im, (int(size), int(size)), Image.Resampling.LANCZOS)
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), original_size


def iter_batches(images: ImageSet, size: int | str, batch_size: int, max_pixels: int) -> Iterator[ImageBatch]:
    """Batches of equally shaped images; unreadable files are recorded in ``images.skipped``.

    At native size consecutive images of the same shape share a batch; a new shape
    starts a new one.
    """
    names: list[str] = []
    pixels: list[torch.Tensor] = []
    sizes: list[tuple[int, int]] = []
    for path in images.paths:
        try:
            tensor, original_size = load_pixels(path, size, max_pixels)
        except ImageReadError as exc:
            images.skipped.append(Skipped(images.name(path), exc.reason, exc.message))
            continue
        if pixels and (tensor.shape != pixels[0].shape or len(pixels) == batch_size):
            yield ImageBatch(names, torch.stack(pixels), sizes)
            names, pixels, sizes = [], [], []
        names.append(images.name(path))
        pixels.append(tensor)
        sizes.append(original_size)
    if pixels:
        yield ImageBatch(names, torch.stack(pixels), sizes)
