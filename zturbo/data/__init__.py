"""Data: the bundled demo photos, preparation pipeline, datasets and loaders."""

from __future__ import annotations

from pathlib import Path

from zturbo.config import demo_data_dir

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class ShardSample:
    """Base of a sample in a shard (a tar member, a Parquet row), which its dataclass gives a
    ``unit`` (the shard's name) and a ``key``: known by its source key ``<unit>/<key>``
    (``zturbo.data.shards``)."""

    __slots__ = ()
    unit: str
    key: str

    @property
    def source(self) -> str:
        """The sample's source key: ``<shard name>/<key>``."""
        return f"{self.unit}/{self.key}"


def demo_dir() -> Path:
    """Folder of the bundled CC0 / public-domain sample photos (see SOURCES.md there)."""
    return demo_data_dir()


def demo_images() -> list[Path]:
    """Paths of the bundled sample photos, sorted by name."""
    return sorted(p for p in demo_dir().iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def load_demo_images(size: int | None = None):
    """The demo photos as 8-bit RGB PIL images, optionally center-cropped to ``size`` x ``size``."""
    from PIL import Image, ImageOps

    images = []
    for path in demo_images():
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
        if size is not None:
            im = ImageOps.fit(im, (size, size), Image.Resampling.LANCZOS)
        images.append(im)
    return images
