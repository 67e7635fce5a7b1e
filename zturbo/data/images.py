"""Robust image reading: any Pillow format and mode to 8-bit sRGB RGB.

Shared by prepare, the training dataset, eval and serve-batch so every path
treats EXIF orientation, ICC profiles, alpha and odd modes the same way.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps

from zturbo.errors import InputError

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own default decompression-bomb threshold


class ImageReadError(InputError):
    """An image could not be decoded; ``reason`` is a short machine-friendly tag."""

    def __init__(self, path: Path | str, reason: str, detail: str = ""):
        super().__init__(f"cannot read image {path}: {reason}{': ' + detail if detail else ''}")
        self.path = str(path)
        self.reason = reason
        self.detail = detail


_SRGB = ImageCms.createProfile("sRGB")


def to_srgb_rgb(im: Image.Image) -> Image.Image:
    """Convert any mode to 8-bit RGB in sRGB; alpha is composited over white."""
    icc = im.info.get("icc_profile")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 or im.mode.startswith("I;16") else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        peak = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba).convert("RGB")
    if icc and im.mode in ("RGB", "CMYK", "L"):
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            im = ImageCms.profileToProfile(im, src, _SRGB, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: fall back to a plain conversion below
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


@contextlib.contextmanager
def image_read_errors(path: str | Path) -> Iterator[None]:
    """Turn any failure while opening or decoding ``path`` into ImageReadError with a reason tag.

    Reasons: too-large, missing, unreadable, not-an-image, symlink-loop, corrupt (and whatever an
    ImageReadError raised inside carries).
    """
    try:
        yield
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, "too-large", str(exc)) from exc
    except FileNotFoundError as exc:
        raise ImageReadError(path, "missing", "file or symlink target not found") from exc
    except PermissionError as exc:
        raise ImageReadError(path, "unreadable", "permission denied") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageReadError(path, "not-an-image") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageReadError(path, "symlink-loop", "too many levels of symbolic links") from exc
        raise ImageReadError(path, "corrupt", str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
    except (SyntaxError, ValueError, EOFError) as exc:  # truncated data, bad headers
        raise ImageReadError(path, "corrupt", str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc


def check_pixels(path: str | Path, im: Image.Image, max_pixels: int) -> None:
    """Refuse a decompression bomb from its header, before any pixel is decoded."""
    w, h = im.size
    if w * h > max_pixels:
        raise ImageReadError(path, "too-large", f"{w}x{h} exceeds {max_pixels} pixels")


def readable(path) -> str | os.PathLike | io.BytesIO:
    """What ``Image.open`` reads for ``path``: a file path as it is, or the bytes of a sample in a shard (an
    object with ``read_bytes()``, such as ``zturbo.data.tar_shards.TarMember``, named by its ``str``)."""
    return path if isinstance(path, (str, os.PathLike)) else io.BytesIO(path.read_bytes())


def open_image(path, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Open, apply EXIF orientation, and return 8-bit sRGB RGB; raise ImageReadError on any failure.

    ``path`` is a file or a sample in a shard (see :func:`readable`). ``draft_size`` lets JPEG
    decoding happen at a reduced scale when the image is much larger than needed (the final
    resize still antialiases).
    """
    return open_image_sized(path, max_pixels, draft_size)[0]


def open_image_sized(
    path, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """``open_image`` plus the image's displayed size (after EXIF rotation) before any JPEG draft scaling."""
    path = Path(path) if isinstance(path, str) else path
    with image_read_errors(path), Image.open(readable(path)) as im:
        check_pixels(path, im, max_pixels)
        w, h = im.size
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        if draft_size is not None and im.format == "JPEG":
            scale = min(w, h) / draft_size
            if scale >= 2:
                im.draft("RGB", (max(1, round(w / scale)), max(1, round(h / scale))))
        im.load()
        if _may_carry_orientation(im):
            stored = im.size
            im = ImageOps.exif_transpose(im)
            if im.size != stored:  # rotated by 90 or 270 degrees
                w, h = h, w
        return to_srgb_rgb(im), (w, h)


# Everywhere Pillow's getexif() looks for an orientation: EXIF blocks, PNG text, XMP, TIFF tags.
_ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def _may_carry_orientation(im: Image.Image) -> bool:
    """False when the image has nowhere to hold an orientation tag, so exif_transpose (which parses
    EXIF, a tenth of the cost of reading a small image) can be skipped with the same result."""
    return hasattr(im, "tag_v2") or any(key in im.info for key in _ORIENTATION_SOURCES)


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (B, 3, H, W) in [-1, 1] -> uint8 HWC / BHWC, clamped and rounded."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return (x.permute(0, 2, 3, 1) if x.dim() == 4 else x.permute(1, 2, 0)).cpu().numpy()


# Full-range BT.601 (JPEG's YCbCr): the rows give Cb and Cr from R, G, B. Linear, so the chroma of a
# difference is the difference of the chromas, and grey (R = G = B) has none.
CHROMA_MATRIX = ((-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def chroma_planes(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 2, H, W) Cb, Cr around 0, in the pixels' own units, in float32 at least."""
    x = pixels.float() if pixels.dtype in (torch.uint8, torch.float16, torch.bfloat16) else pixels
    weights = torch.tensor(CHROMA_MATRIX, dtype=x.dtype, device=x.device)
    return torch.einsum("kc,bchw->bkhw", weights, x)


def bucket_crop_box(width: int, height: int, bucket: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centered region of a ``width`` x ``height`` image that, scaled to cover ``bucket``, fills it exactly."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    cw, ch = min(width, bw / scale), min(height, bh / scale)
    left, top = max(0.0, (width - cw) / 2), max(0.0, (height - ch) / 2)
    return left, top, min(width, left + cw), min(height, top + ch)


def resize_to_bucket(im, bucket: tuple[int, int]):
    """Scale to cover the bucket (antialiased), center-cropping the overflow; returns (image, crop box)."""
    bw, bh = bucket
    # The crop box in source pixels, so only the kept region is resampled.
    box = bucket_crop_box(*im.size, bucket)
    if im.size == (bw, bh):
        return im, box
    return im.resize((bw, bh), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0), box
