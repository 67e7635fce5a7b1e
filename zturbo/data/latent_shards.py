"""Training pairs from `zturbo serve-batch encode` output: (image, stored latent).

Reads the on-disk format (``index.json`` of format ``zturbo-latents`` version 1,
safetensors shards) that ``zturbo.serve.store`` writes; the format's names live here, in
the lower layer, and the image preparation is the encoder's own (``data.images.resize_to_bucket``).
Each image is prepared as the encoder saw it: opened as sRGB RGB with EXIF rotation,
scaled (Lanczos, antialiased) to cover its size bucket and centre-cropped to it. When
the training crop is smaller than the bucket, a random crop on the latent grid is
taken of both, so the image crop is exactly the region its latent crop covers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate

from zturbo.data.batch import TrainBatch
from zturbo.data.images import DEFAULT_MAX_PIXELS, open_image_sized, pil_to_tensor, resize_to_bucket
from zturbo.errors import InputError, UsageError

# The on-disk latents format, shared with the writer (zturbo.serve.store).
LATENTS_FORMAT = "zturbo-latents"
LATENTS_VERSION = 1
INDEX_NAME = "index.json"


@dataclass(frozen=True)
class LatentEntry:
    source: str  # path of the image relative to the encoded folder
    shard: Path
    tensor: str
    shape: tuple[int, int, int]  # (C, h, w)
    bucket: tuple[int, int]  # (width, height) the image was scaled and cropped to


@dataclass(frozen=True)
class LatentIndex:
    folder: Path
    latent_channels: int
    downsample_factor: int
    scaling_factor: float | None
    shift_factor: float | None
    latent_mode: str
    precision: str
    model: str | None
    fingerprint: str | None  # encoder_fingerprint of the encoding model; None in indexes written before it
    entries: list[LatentEntry]


def read_latent_index(folder: str | Path) -> LatentIndex:
    """The index of an encode output folder (``serve-batch encode`` writes it when it finishes)."""
    folder = Path(folder)
    path = folder / INDEX_NAME
    if not path.is_file():
        raise InputError(f"no {INDEX_NAME} in {folder}", "give the output folder of `zturbo serve-batch encode`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != LATENTS_FORMAT or data.get("version") != LATENTS_VERSION:
            raise InputError(f"{path} is not a zturbo latent index (format {LATENTS_FORMAT} v{LATENTS_VERSION})")
        entries = [
            LatentEntry(e["source"], folder / e["shard"], e["tensor"], tuple(e["shape"]), tuple(e["bucket"]))
            for e in data["entries"]
        ]
        return LatentIndex(
            folder, int(data["latent_channels"]), int(data["downsample_factor"]), data.get("scaling_factor"),
            data.get("shift_factor"), str(data.get("latent_mode")), str(data.get("precision")), data.get("model"),
            data.get("encoder_fingerprint"), entries,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read latent index {path}: {exc}") from exc


def bucket_image(path: str | Path, bucket: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """The image as `serve-batch encode` fed it to the encoder: (3, bucket_h, bucket_w) in [-1, 1]."""
    im, _ = open_image_sized(path, max_pixels, draft_size=max(bucket))
    return pil_to_tensor(resize_to_bucket(im, bucket)[0])


class LatentPairDataset(Dataset):
    """(image crop (3, S, S), latent crop (C, S/f, S/f)) pairs; keys as ``ImageFolderDataset``'s."""

    def __init__(self, index: LatentIndex, image_root: str | Path, entries: list[LatentEntry], image_size: int):
        f = index.downsample_factor
        if image_size % f:
            raise UsageError(f"image size {image_size} is not a multiple of the latents' downsampling factor {f}")
        small = [e for e in entries if min(e.bucket) < image_size]
        if small:
            raise UsageError(
                f"{len(small)} latents cover less than the {image_size} px training crop (e.g. {small[0].source}, "
                f"{small[0].bucket[0]}x{small[0].bucket[1]})",
                "encode at --size at least the training --image-size, or lower --image-size",
            )
        if not entries:
            raise InputError(f"no latents in {index.folder} for the training images")
        self.index, self.root, self.entries, self.image_size = index, Path(image_root), entries, image_size
        self._open: dict[Path, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def latent(self, entry: LatentEntry) -> torch.Tensor:
        from safetensors import safe_open

        fh = self._open.get(entry.shard)
        if fh is None:
            fh = self._open[entry.shard] = safe_open(str(entry.shard), framework="pt")
        return fh.get_tensor(entry.tensor).float()

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        entry = self.entries[index]
        image, latent = bucket_image(self.root / entry.source, entry.bucket), self.latent(entry)
        f, size = self.index.downsample_factor, self.image_size // self.index.downsample_factor
        _, h, w = latent.shape
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
            top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
        else:
            top, left = (h - size) // 2, (w - size) // 2
        latent = latent[:, top : top + size, left : left + size]
        image = image[:, top * f : (top + size) * f, left * f : (left + size) * f]
        return image.contiguous(), latent.contiguous()

    def collate(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> TrainBatch:
        """The loader's batch of these pairs: images and their latents."""
        images, latents = default_collate(items)
        return TrainBatch(images, latents)
