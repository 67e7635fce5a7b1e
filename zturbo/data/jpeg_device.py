"""JPEG decoding on the GPU (nvJPEG through ``torchvision.io.decode_jpeg``) for training batches.

``data.decode`` chooses (``decode_on_device``): "cpu" never, "gpu" always (on a CUDA
device only), "auto" when training runs on CUDA and the training files include JPEGs the
device can decode as they are. With ``ImageFolderDataset(device_decode=True)`` a loader
worker does not decode a JPEG that needs no colour or geometry work: RGB or greyscale,
no ICC profile, no EXIF rotation, shorter side already the training size (what ``zturbo
prepare`` writes). It reads the file's bytes, draws the crop and flip exactly as the CPU
path would, and hands both on; ``EncodedBatch.decode`` then decodes the whole batch on
the device in one call and crops and flips there. Everything else (PNG, ICC profiles,
rotations, sizes that need a resize) is decoded by the worker as usual and travels as
pixels.

The decoders differ (nvJPEG against libjpeg-turbo: IDCT and chroma upsampling), so
pixels can differ by a level or two; the crop and flip are the same. Where the device
decoder is missing or fails, the batch's JPEGs are decoded by Pillow instead (warned once).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zturbo.data.images import DEFAULT_MAX_PIXELS, _may_carry_orientation, readable
from zturbo.errors import DeviceError, UsageError

_EXIF_ORIENTATION = 0x0112
_DEVICE_FAILED: list[str] = []  # the first failure; from then on Pillow decodes
AUTO_SAMPLE = 16  # files whose headers "auto" reads: enough to tell a JPEG set, cheap on a large one


@dataclass
class EncodedImage:
    """A JPEG's bytes (uint8, 1-D) with its square crop (side ``size``, top-left corner) and flip."""

    data: torch.Tensor
    size: int
    left: int
    top: int
    flip: bool


def device_decodable(path: Path, image_size: int, max_pixels: int) -> bool:
    """True when the file is a JPEG the device can decode to exactly what the CPU path would show."""
    if path.suffix.lower() not in (".jpg", ".jpeg"):
        return False
    try:
        with Image.open(readable(path)) as im:  # reads the header only
            w, h = im.size
            if im.format != "JPEG" or im.mode not in ("RGB", "L") or "icc_profile" in im.info or w * h > max_pixels:
                return False
            if min(w, h) != image_size:
                return False
            return not (_may_carry_orientation(im) and im.getexif().get(_EXIF_ORIENTATION, 1) != 1)
    except (OSError, ValueError, EOFError, Image.DecompressionBombError):
        return False  # the CPU path reports what is wrong with it


def decode_on_device(mode: str, device: torch.device, paths: Sequence[Path], image_size: int,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """``data.decode``: whether the training loader leaves JPEGs encoded for ``device`` to decode.

    "gpu" on a device other than CUDA is an error; "auto" reads the headers of up to
    ``AUTO_SAMPLE`` evenly spaced files and says yes on CUDA when one of them qualifies.
    """
    if mode == "cpu":
        return False
    if device.type != "cuda":
        if mode == "auto":
            return False
        if not torch.cuda.is_available():
            raise DeviceError("data.decode = \"gpu\" decodes training JPEGs on a CUDA GPU (nvJPEG), and CUDA is "
                              "not available on this machine", "set data.decode to \"auto\" or \"cpu\"")
        raise UsageError(f"data.decode = \"gpu\" needs training on a CUDA device, not {device}",
                         "set train.device to cuda, or data.decode to \"auto\" or \"cpu\"")
    if mode == "gpu":
        return True
    sample = paths[:: max(1, len(paths) // AUTO_SAMPLE)][:AUTO_SAMPLE]
    return any(device_decodable(path, image_size, max_pixels) for path in sample)


def read_encoded(path: Path, image_size: int, random_crop: bool, random_flip: bool,
                 generator: torch.Generator | None) -> EncodedImage:
    """The file's bytes and the crop and flip the CPU path would draw from ``generator`` (same order)."""
    raw = path.read_bytes()
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    with Image.open(io.BytesIO(raw)) as im:
        w, h = im.size
    if random_crop and generator is not None:
        left = int(torch.randint(0, w - image_size + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - image_size + 1, (1,), generator=generator))
    else:
        left, top = (w - image_size) // 2, (h - image_size) // 2
    flip = bool(random_flip and generator is not None and bool(torch.rand((), generator=generator) < 0.5))
    return EncodedImage(data, image_size, left, top, flip)


@dataclass
class EncodedBatch:
    """A training batch whose JPEGs are still encoded; ``decode`` gives the (B, 3, S, S) tensor in [-1, 1]."""

    items: list[torch.Tensor | EncodedImage]
    image_size: int
    _pinned: bool = field(default=False, repr=False)

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self) -> EncodedBatch:
        """What the DataLoader calls with ``pin_memory=True``: page-locked buffers copy to the GPU without waiting."""
        pinned = [EncodedImage(i.data.pin_memory(), i.size, i.left, i.top, i.flip) if isinstance(i, EncodedImage)
                  else i.pin_memory() for i in self.items]
        return EncodedBatch(pinned, self.image_size, True)

    def decode(self, device: torch.device) -> torch.Tensor:
        s = self.image_size
        out = torch.empty((len(self.items), 3, s, s), device=device)
        encoded = [(k, item) for k, item in enumerate(self.items) if isinstance(item, EncodedImage)]
        for k, item in enumerate(self.items):
            if not isinstance(item, EncodedImage):
                item = item.to(device, non_blocking=self._pinned)
                out[k] = item.float().div_(127.5).sub_(1.0) if item.dtype == torch.uint8 else item
        if not encoded:
            return out
        pixels = self._decode_on_device([item.data for _, item in encoded], device)
        for (k, item), image in zip(encoded, pixels):
            if image is None:  # the device decoder failed: Pillow, then the same crop and flip
                with Image.open(io.BytesIO(item.data.numpy().tobytes())) as im:
                    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
                image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).to(device)
            view = image[:, item.top : item.top + s, item.left : item.left + s]
            if item.flip:
                view = view.flip(-1)
            out[k] = view.float().div_(127.5).sub_(1.0)
        return out

    @staticmethod
    def _decode_on_device(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
        if device.type == "cuda" and not _DEVICE_FAILED:
            try:
                from torchvision.io import ImageReadMode, decode_jpeg

                return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except Exception as exc:  # noqa: BLE001 - a missing nvJPEG and a bad stream look alike here
                _DEVICE_FAILED.append(f"{type(exc).__name__}: {exc}")
                warnings.warn(f"GPU JPEG decoding unavailable, decoding with Pillow: {_DEVICE_FAILED[0]}",
                              RuntimeWarning, stacklevel=3)
        return [None] * len(data)


def collate_encoded(items: list) -> EncodedBatch:
    """The DataLoader's collate function for a dataset with ``device_decode=True``."""
    first = items[0]
    return EncodedBatch(list(items), first.size if isinstance(first, EncodedImage) else first.shape[-1])
