"""One source file -> one prepared image. Runs inside prepare's worker processes.

Everything here is a pure function of the source bytes and the render options, so a
re-run (or a run resumed after a crash) writes byte-identical outputs.
"""

from __future__ import annotations

import errno
import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image, ImageOps

from zturbo.data.images import ImageReadError, check_pixels, image_read_errors, to_srgb_rgb
from zturbo.paths import inside
from zturbo.utils import atomic_path

TMP_SUFFIX = ".zturbo-tmp"
OUTPUT_EXT = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
# Resize first with Image.reduce (box averaging) down to 3x the target, then LANCZOS:
# Pillow documents 3.0 as indistinguishable from a full-resolution resample.
REDUCING_GAP = 3.0
# Files up to this size are read once into memory (hash and decode share the bytes).
READ_ALL_LIMIT = 256 << 20
# Orientations 5-8 swap width and height once applied.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


@dataclass(frozen=True)
class RenderOptions:
    """What decides an output's pixels and where it goes (picklable, sent to workers)."""

    size: int
    resize: str  # "center-crop" | "pad"
    min_size: int
    max_pixels: int
    format: str  # "png" | "jpeg" | "webp"
    quality: int
    png_compress_level: int
    val_fraction: float


def split_for(sha256: str, val_fraction: float) -> str:
    """'val' or 'train' from the content hash alone: stable across runs and added images."""
    return "val" if int(sha256[:16], 16) < val_fraction * 2**64 else "train"


def output_name(rel_source: str, fmt: str) -> str:
    """``a/b/photo.jpg`` -> ``a/b/photo_jpg.png``: keeps the folder layout, unique per source file."""
    p = PurePosixPath(rel_source)
    return str(p.with_name(f"{p.stem}_{p.suffix[1:]}{OUTPUT_EXT[fmt]}"))


def process_file(source: str, rel: str, output_root: str, opts: RenderOptions) -> dict[str, Any]:
    """Read, hash, decode, fit and write one image; never raises for bad input.

    Returns a record: ``status`` is "written" (with output, split, sha256, source_size)
    or "skipped" (with reason and detail).
    """
    record: dict[str, Any] = {"source": rel}
    try:
        data, stat, sha = _read(source)
        record["stat"] = [stat.st_size, stat.st_mtime_ns]
        record["sha256"] = sha
        im, source_size = _decode(source, data, opts)
        record["source_size"] = list(source_size)
        payload = encode(render(source, im, opts), opts)
    except ImageReadError as exc:
        record.update(status="skipped", reason=exc.reason, detail=exc.detail)
        return record
    except MemoryError:
        record.update(status="skipped", reason="too-large", detail="out of memory while decoding")
        return record
    split = split_for(sha, opts.val_fraction)
    out_rel = f"{split}/{output_name(rel, opts.format)}"
    if not inside((Path(output_root) / out_rel).parent, Path(output_root)):  # a symlinked folder in OUTPUT
        record.update(status="skipped", reason="outside-output", detail=f"{out_rel} leads outside {output_root}")
        return record
    write_atomic(Path(output_root) / out_rel, payload)
    record.update(status="written", split=split, output=out_rel, output_bytes=len(payload))
    return record


def _read(source: str) -> tuple[bytes | None, os.stat_result, str]:
    """The file's bytes (None when large), its stat at read time and its sha256."""
    try:
        with open(source, "rb") as fh:
            stat = os.fstat(fh.fileno())
            if stat.st_size == 0:
                raise ImageReadError(source, "empty", "zero-byte file")
            if stat.st_size <= READ_ALL_LIMIT:
                data = fh.read()
                return data, stat, hashlib.sha256(data).hexdigest()
            digest = hashlib.sha256()
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
            return None, stat, digest.hexdigest()
    except ImageReadError:
        raise
    except FileNotFoundError as exc:
        raise ImageReadError(source, "missing", "vanished or dangling symlink") from exc
    except PermissionError as exc:
        raise ImageReadError(source, "unreadable", "permission denied") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageReadError(source, "symlink-loop", "too many levels of symbolic links") from exc
        raise ImageReadError(source, "unreadable", exc.strerror or type(exc).__name__) from exc


def _decode(source: str, data: bytes | None, opts: RenderOptions) -> tuple[Image.Image, tuple[int, int]]:
    """Decode upright, in the file's own mode; JPEGs at the smallest DCT scale that still covers the target."""
    # Not a `with` block: closing would free the pixels we return. The bytes are in memory, and
    # Pillow closes a file it opened itself once a single-frame image is loaded.
    with image_read_errors(source):
        im = Image.open(io.BytesIO(data) if data is not None else source)
        check_pixels(source, im, opts.max_pixels)
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        w, h = im.size
        if im.getexif().get(0x0112) in _TRANSPOSING_ORIENTATIONS:
            w, h = h, w
        # The side that is scaled to `size`: the shorter one when cropping, the longer one when padding.
        side = min(w, h) if opts.resize == "center-crop" else max(w, h)
        if side < opts.min_size:
            raise ImageReadError(
                source, "too-small", f"{w}x{h}: {side} px is under the minimum {opts.min_size}"
            )
        if im.format in ("JPEG", "MPO"):
            scale = side / opts.size
            if scale >= 2:  # draft picks a 1/2, 1/4 or 1/8 decode that is still >= the requested size
                im.draft(None, (math.ceil(im.size[0] / scale), math.ceil(im.size[1] / scale)))
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of the decoded pixels
    return im, (w, h)


def render(source: str, im: Image.Image, opts: RenderOptions) -> Image.Image:
    """Decoded image (any mode) -> ``size`` x ``size`` 8-bit sRGB RGB.

    L, RGB and CMYK are resized in their own mode and colour-converted afterwards: an ICC
    transform (an sRGB-tagged camera JPEG, a Display P3 phone photo) then touches only the
    output's pixels, several times fewer than the source's. Other modes (alpha, palette,
    16-bit, float) are converted first, so alpha is composited before any resampling.
    """
    if im.mode not in _RESIZE_IN_SOURCE_MODE:
        im = _to_rgb(source, im)
    im = fit(im, opts.size, opts.resize)
    im = _to_rgb(source, im)
    if opts.resize == "pad":
        canvas = Image.new("RGB", (opts.size, opts.size), (0, 0, 0))
        canvas.paste(im, ((opts.size - im.width) // 2, (opts.size - im.height) // 2))
        im = canvas
    return im


_RESIZE_IN_SOURCE_MODE = {"L", "RGB", "CMYK"}


def _to_rgb(source: str, im: Image.Image) -> Image.Image:
    try:
        out = to_srgb_rgb(im)
    except (ValueError, OSError) as exc:
        raise ImageReadError(source, "unsupported-mode", f"cannot convert mode {im.mode} to RGB") from exc
    out.info.pop("icc_profile", None)  # converted: the pixels are sRGB now
    return out


def fit(im: Image.Image, size: int, resize: str) -> Image.Image:
    """Antialiased LANCZOS resize: the centred square to ``size`` x ``size`` ("center-crop"), or
    the whole image to a longer side of ``size`` ("pad"; the caller adds the bars).

    Only the cropped box is resampled; large inputs are first box-reduced by an integer
    factor (``reducing_gap``, Image.reduce) so the cost does not grow with the source resolution.
    """
    w, h = im.size
    if resize == "center-crop":
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        return im.resize(
            (size, size),
            Image.Resampling.LANCZOS,
            box=(left, top, left + side, top + side),
            reducing_gap=REDUCING_GAP,
        )
    scale = size / max(w, h)
    inner_size = (min(size, max(1, round(w * scale))), min(size, max(1, round(h * scale))))
    return im.resize(inner_size, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)


def encode(im: Image.Image, opts: RenderOptions) -> bytes:
    # Plain untagged sRGB pixels: no carried-over ICC profile, EXIF or a PNG transparency key
    # (which would make one RGB colour transparent), and byte-identical output on every run.
    im.info = {}
    buf = io.BytesIO()
    if opts.format == "png":
        im.save(buf, "PNG", compress_level=opts.png_compress_level)
    elif opts.format == "jpeg":
        # Full-resolution chroma at high quality: 4:2:0 visibly blurs colour edges a VAE should learn.
        im.save(buf, "JPEG", quality=opts.quality, subsampling=0 if opts.quality >= 90 else 2)
    else:
        im.save(buf, "WEBP", quality=opts.quality, method=4)
    return buf.getvalue()


def write_atomic(path: Path, payload: bytes) -> None:
    """Temp name in the same folder, then rename: a kill never leaves a truncated image in place."""
    with atomic_path(path, suffix=TMP_SUFFIX) as tmp, open(tmp, "wb") as fh:
        fh.write(payload)
