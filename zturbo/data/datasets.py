"""Training datasets and loaders.

Works on a prepared folder (``train/`` and ``val/`` from ``zturbo prepare``), any
folder of images, or image shards (WebDataset tars, Parquet files: ``zturbo.data.shards``).
Augmentation randomness is derived from (seed, epoch, image index) rather than from
worker RNG state, so the sample stream is the same for any worker count and a resumed
run sees exactly what an uninterrupted one did. From shards the order is too: shards
(Parquet: row groups) are shuffled from (seed, epoch), then the samples of a few at a
time among themselves (``ResumableSampler(blocks=...)``), so a reader holds only those
few while the whole set is still mixed over the epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from zturbo.console import warn
from zturbo.data import IMAGE_EXTENSIONS
from zturbo.data.batch import TrainBatch
from zturbo.data.images import DEFAULT_MAX_PIXELS, ImageReadError, open_image, pil_to_tensor
from zturbo.data.jpeg_device import EncodedImage, collate_encoded, device_decodable, read_encoded
from zturbo.data.shards import block_of, check_undamaged, find_shards, index_shards
from zturbo.errors import InputError

# Shards (or Parquet row groups) whose samples are shuffled together: what one reader has in flight.
BLOCKS_IN_FLIGHT = 4


def list_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive, sorted; hidden and temp files skipped)."""
    root = Path(root)
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    )


@dataclass(frozen=True)
class DataSplit:
    train: list  # image files (Path), or samples in shards (``zturbo.data.shards``)
    val: list
    layout: str  # "prepared" (train/ + val/), "folder" or "shards"


def split_data(data_dir: str | Path, val_images: int, image_column: str | None = None) -> DataSplit:
    """Training images and the fixed validation images for the sample grid.

    A prepared folder uses its ``val/`` split; a plain folder, or shards, hold out
    ``val_images`` evenly spaced images (kept when there are too few to spare). Damaged
    shards are an InputError: training would silently see less than asked for.
    """
    shards = find_shards(data_dir)
    if shards is not None:
        index = index_shards(shards, image_column)
        check_undamaged(index, "repair or leave out the damaged shard (a glob or brace pattern can name the others)")
        return _hold_out([s for unit in index.units for s in unit.samples], val_images, "shards")
    if image_column is not None:
        raise InputError(f"data.image_column is for Parquet data; {data_dir} is not Parquet shards")
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(
            f"data folder not found: {root}", "give a folder of images or the output of `zturbo prepare`"
        )
    if (root / "train").is_dir():
        train = list_images(root / "train")
        val = list_images(root / "val")[:val_images] if (root / "val").is_dir() else []
        if not val and val_images:
            val = train[:: max(1, len(train) // val_images)][:val_images]
        layout = "prepared"
    else:
        split = _hold_out(list_images(root), val_images, "folder")
        train, val, layout = split.train, split.val, split.layout
    if not train:
        raise InputError(f"no images found in {root}", f"supported extensions: {', '.join(IMAGE_EXTENSIONS)}")
    return DataSplit(train=train, val=val, layout=layout)


def _hold_out(images: list, val_images: int, layout: str) -> DataSplit:
    step = max(1, len(images) // val_images) if val_images else 0
    val = images[::step][:val_images] if val_images else []
    held = set(val)
    train = [p for p in images if p not in held] if len(images) - len(held) >= len(held) else images
    return DataSplit(train=train, val=val, layout=layout)


def shard_blocks(samples: list) -> list[list[int]]:
    """Indices of ``samples`` in runs that share a shard (or Parquet row group): the sampler's blocks."""
    blocks: list[list[int]] = []
    last = None
    for i, sample in enumerate(samples):
        block = block_of(sample)
        if block != last:
            blocks.append([])
            last = block
        blocks[-1].append(i)
    return blocks


def augment_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed: same image, same epoch, same crop, whatever the worker or rank."""
    return ((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2**63 - 1)


class ImageFolderDataset(Dataset):
    """Square ``image_size`` crops in [-1, 1], shape (3, S, S).

    The shorter side is resized to ``image_size`` (antialiased) when it differs,
    then a random (or centre) square is cropped and optionally flipped. An
    unreadable file is reported once and replaced by the next readable one.

    With ``as_uint8`` the crops come as uint8 (0..255), a quarter of the bytes through
    the workers' shared memory and the copy to the GPU; ``to_unit_range`` makes the
    same [-1, 1] values on the device. With ``device_decode`` JPEGs that need no colour or geometry work come back
    still encoded (``EncodedImage``: bytes plus the same crop and flip), for the
    GPU to decode a whole batch at once (``zturbo.data.jpeg_device``); the loader
    then collates ``EncodedBatch`` objects.
    """

    def __init__(
        self,
        paths: list,  # image files, or samples in shards (objects with read_bytes(): zturbo.data.shards)
        image_size: int,
        random_crop: bool = True,
        random_flip: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        device_decode: bool = False,
        as_uint8: bool = False,
    ):
        if not paths:
            raise InputError("the dataset is empty")
        self.paths = list(paths)
        self.image_size = image_size
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.max_pixels = max_pixels
        self.device_decode = device_decode
        self.as_uint8 = as_uint8
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor | EncodedImage:
        index, seed = key if isinstance(key, tuple) else (key, None)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for attempt in range(len(self.paths)):
            path = self.paths[(index + attempt) % len(self.paths)]
            if self.device_decode and device_decodable(path, self.image_size, self.max_pixels):
                try:
                    return read_encoded(path, self.image_size, self.random_crop, self.random_flip, generator)
                except OSError:
                    pass  # vanished or unreadable since the check: the CPU path reports it
            try:
                image = open_image(path, max_pixels=self.max_pixels, draft_size=self.image_size)
            except ImageReadError as exc:
                self._report(exc)
                continue
            return self._transform(image, generator)
        raise InputError("no readable image in the dataset", "check the files in the data folder")

    def collate(self, items: list[torch.Tensor | EncodedImage]) -> TrainBatch:
        """The loader's batch of these items (still-encoded JPEGs with ``device_decode``)."""
        return TrainBatch(collate_encoded(items) if self.device_decode else default_collate(items))

    def _report(self, exc: ImageReadError) -> None:
        if exc.path not in self._reported:
            self._reported.add(exc.path)
            warn(f"skipping unreadable image {exc.path} ({exc.reason})")

    def _transform(self, image: Image.Image, generator: torch.Generator | None) -> torch.Tensor:
        size = self.image_size
        w, h = image.size
        if min(w, h) != size:
            scale = size / min(w, h)
            new = (max(size, round(w * scale)), max(size, round(h * scale)))
            image = image.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)
            w, h = image.size
        if self.random_crop and generator is not None:
            left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
            top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
        else:
            left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
        tensor = pil_to_uint8(image) if self.as_uint8 else pil_to_tensor(image)
        if self.random_flip and generator is not None and bool(torch.rand((), generator=generator) < 0.5):
            tensor = tensor.flip(-1)
        return tensor


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that yields (index, augmentation seed) and can start mid-epoch.

    ``set_epoch`` fixes the shuffle; ``skip`` drops the first samples of the next
    pass only (what a resumed run already consumed of the current epoch). With ``blocks``
    (index runs that share a shard: ``shard_blocks``) the epoch's order is the blocks
    shuffled, then ``blocks_in_flight`` blocks at a time shuffled among themselves, all from
    (seed, epoch); ranks take every ``num_replicas``-th index of it, as DistributedSampler does.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
        blocks: list[list[int]] | None = None, blocks_in_flight: int = BLOCKS_IN_FLIGHT,
    ):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self._skip = 0
        self.blocks, self.blocks_in_flight = blocks, max(1, blocks_in_flight)

    def skip(self, samples: int) -> None:
        self._skip = samples

    def _epoch_indices(self) -> list[int]:
        if self.blocks is None:
            return list(super().__iter__())
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        blocks = [self.blocks[i] for i in torch.randperm(len(self.blocks), generator=g)] if self.shuffle \
            else self.blocks
        order: list[int] = []
        for c in range(0, len(blocks), self.blocks_in_flight):
            chunk = [i for block in blocks[c : c + self.blocks_in_flight] for i in block]
            order += [chunk[k] for k in torch.randperm(len(chunk), generator=g)] if self.shuffle else chunk
        order += (order * math.ceil(self.total_size / len(order)))[: self.total_size - len(order)]  # pad as upstream
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = self._epoch_indices()[self._skip :]
        self._skip = 0
        for index in indices:
            yield index, augment_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self.num_samples


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_unit_range(batch: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] (the same operations as ``pil_to_tensor``, so the same values)."""
    return batch.float().div_(127.5).sub_(1.0) if batch.dtype == torch.uint8 else batch


def make_loader(
    dataset: Dataset,
    sampler: ResumableSampler,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
) -> DataLoader:
    """``TrainBatch`` objects (the dataset's ``collate``), full batches only (drop_last), workers kept alive across epochs."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(0),  # keeps the global RNG out of loader start-up
        collate_fn=dataset.collate,
    )


def steps_per_epoch(num_images: int, world_size: int, per_rank_batch: int) -> int:
    return math.ceil(num_images / world_size) // per_rank_batch


def check_batch_fits(data_dir: str | Path, val_images: int, batch_size: int, world_size: int,
                     hint: str = "add images or lower --batch-size", image_column: str | None = None) -> int:
    """The number of training images under ``data_dir``; an InputError (with ``hint``) when they are fewer
    than one per-process batch. Cheap (it lists files, or indexes shards once for the run), so a run can
    check it before loading any model."""
    train = split_data(data_dir, val_images, image_column).train
    per_rank = max(1, batch_size // max(1, world_size))
    if steps_per_epoch(len(train), world_size, per_rank) == 0:
        raise InputError(
            f"{len(train)} training images in {data_dir} are fewer than the per-process batch of {per_rank}", hint
        )
    return len(train)


def load_batch(paths: list, image_size: int) -> torch.Tensor:
    """A fixed, unaugmented batch (centre crops), e.g. for the sample grid."""
    dataset = ImageFolderDataset(paths, image_size, random_crop=False, random_flip=False)
    return torch.stack([dataset[i] for i in range(len(dataset))])
