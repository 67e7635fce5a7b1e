"""Readers: planned batches of item indices in, computed batches out, in plan order.

A reader reads each item of a batch (an image opened, decoded and resized, or a
latent loaded), stacks the batch, and has the device step compute it. How reading
and computing share the machine is the reading mode (``ServeConfig.reading``, and
``RunReport.reading`` after a run):

* ``threads`` (:class:`ThreadReader`): a thread pool reads a few batches ahead, beside
  compute. For a GPU, whose compute leaves the CPU cores free, and for a CPU model that
  leaves cores free. Pillow releases the GIL while decoding and resizing, and threads
  need no inter-process copies.
* ``phased`` (:class:`PhasedReader`): each batch is read just before it is computed, on
  every core. For compute on a CPU when torch's threads already occupy every core and
  there is one core only: reading beside compute there means sharing cores, and a
  compute thread the scheduler preempts for a reader stalls the whole op at its barrier.
* ``streams``: CPU compute streams that each read and then compute their own batches
  (:mod:`zturbo.serve.streams`).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from zturbo.data.images import ImageReadError, open_image_sized
from zturbo.data.images import resize_to_bucket
from zturbo.serve.inputs import Failure, Probed
from zturbo.serve.latents import LatentItem, LatentReader
from zturbo.serve.step import DeviceStep, StepResult

# How many batches a thread reader keeps in flight beyond the one being computed.
READ_AHEAD = 4


@dataclass
class Sample:
    """One item read: its pixels or latent, or why it could not be read."""

    index: int  # position in the run's item list
    key: str  # the item's name: the source key (encode) or the output name (decode)
    array: np.ndarray | None  # (H, W, 3) uint8 pixels or a (C, h, w) float32 latent; None on failure
    failure: Failure | None = None
    seconds: float = 0.0  # CPU time spent reading it
    size: tuple[int, int] | None = None  # a source image's displayed (width, height)


@dataclass
class Batch:
    """The items of one planned batch that could be read, stacked, and those that could not."""

    indices: list[int]
    keys: list[str]
    sizes: list[tuple[int, int] | None]
    data: torch.Tensor | None  # None when no item could be read
    failures: list[Failure] = field(default_factory=list)
    read_seconds: float = 0.0  # CPU time spent reading, summed over the items


@dataclass
class Computed:
    """A batch and what the device step made of it (None when no item could be read)."""

    batch: Batch
    result: StepResult | None


class ItemSource(Protocol):
    def read(self, index: int) -> Sample: ...


class ImageSource:
    """Reads the images to encode: open (EXIF-rotated, drafted for JPEG), resize and crop to the bucket."""

    def __init__(self, items: list[Probed], max_pixels: int):
        self.items = items
        self.max_pixels = max_pixels

    def read(self, index: int) -> Sample:
        t0 = time.thread_time()  # CPU time, not time spent waiting for a core
        item = self.items[index]
        try:
            # The displayed size comes from this one open (also when the header was probed up front).
            im, size = open_image_sized(item.source.path, self.max_pixels, draft_size=max(item.bucket))
            im, _ = resize_to_bucket(im, item.bucket)
            # frombuffer over tobytes: np.asarray goes through __array_interface__, slower.
            arr = np.frombuffer(im.tobytes(), np.uint8).reshape(im.height, im.width, 3)
            return Sample(index, item.source.key, arr, seconds=time.thread_time() - t0, size=size)
        except ImageReadError as exc:
            failure = Failure(item.source.key, exc.reason, exc.message)
            return Sample(index, item.source.key, None, failure, time.thread_time() - t0)


class LatentSource:
    """Reads the latents to decode (shard files stay open for the run: a shard holds many latents)."""

    def __init__(self, items: list[LatentItem]):
        self.items = items
        self.reader = LatentReader()

    def read(self, index: int) -> Sample:
        t0 = time.thread_time()
        item = self.items[index]
        latent = self.reader.load(item)
        finite = torch.isfinite(latent)
        if not bool(finite.all()):
            # A NaN or inf decodes to a black image: report it instead.
            failure = Failure(item.name, "non-finite", f"the latent holds {int((~finite).sum())} NaN or infinite values")
            return Sample(index, item.name, None, failure, time.thread_time() - t0)
        return Sample(index, item.name, latent.numpy(), seconds=time.thread_time() - t0)


def collate(samples: list[Sample], pin: bool) -> Batch:
    """Stack the samples that were read into one tensor (page-locked with ``pin``, for async copies)."""
    ok = [s for s in samples if s.array is not None]
    data = None
    if ok:
        first = ok[0].array
        data = torch.empty((len(ok), *first.shape), dtype=torch.from_numpy(np.empty(0, first.dtype)).dtype, pin_memory=pin)
        np.stack([s.array for s in ok], out=data.numpy())
    return Batch(
        indices=[s.index for s in ok],
        keys=[s.key for s in ok],
        sizes=[s.size for s in ok],
        data=data,
        failures=[s.failure for s in samples if s.failure is not None],
        read_seconds=sum(s.seconds for s in samples),
    )


def compute(step: DeviceStep, batch: Batch) -> Computed:
    return Computed(batch, step.run(batch.data, batch.keys) if batch.data is not None else None)


class Reader(Protocol):
    """Computed batches in plan order; what the run loop and its report need from a reading mode."""

    mode: str  # "threads", "phased" or "streams": the name in ServeConfig.reading and RunReport.reading
    reader_threads: int  # threads that read
    concurrency: int  # batches computed at the same time (compute streams), else 1
    wait_seconds: float  # time compute waited for input (per compute stream)

    def computed(self, step: DeviceStep) -> Iterator[Computed]: ...

    def close(self) -> None: ...


class ThreadReader:
    """``threads`` threads read ``ahead`` batches ahead of the one computed, beside compute."""

    mode = "threads"
    concurrency = 1

    def __init__(self, source: ItemSource, plans: list[list[int]], threads: int, pin: bool, ahead: int = READ_AHEAD):
        self.source, self.plans, self.pin, self.ahead = source, plans, pin, max(1, ahead)
        self.reader_threads = max(1, threads)
        self.pool = ThreadPoolExecutor(max_workers=self.reader_threads, thread_name_prefix="zturbo-read")
        self.wait_seconds = 0.0

    def computed(self, step: DeviceStep) -> Iterator[Computed]:
        plans = iter(self.plans)
        pending: collections.deque = collections.deque()

        def submit() -> None:
            plan = next(plans, None)
            if plan is not None:
                pending.append([self.pool.submit(self.source.read, i) for i in plan])

        for _ in range(self.ahead):
            submit()
        while True:
            submit()  # keeps `ahead` batches in flight beyond the one about to be computed
            if not pending:
                return
            t0 = time.perf_counter()
            batch = collate([f.result() for f in pending.popleft()], self.pin)
            self.wait_seconds += time.perf_counter() - t0
            yield compute(step, batch)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class PhasedReader:
    """Each batch is read just before it is computed, by ``threads`` threads (inline with one).

    Writing stays on its background thread: it is a small share of the work. A fixed pool
    replaced one that timed the main thread alone against it and kept the faster: side by
    side on 2 busy cores, reading took 0.09 s against 0.18 s tuned for 200 small images and
    0.82 s against 0.67 s for 96 large ones, under 4% of the run's wall time either way.
    """

    mode = "phased"
    concurrency = 1

    def __init__(self, source: ItemSource, plans: list[list[int]], threads: int, pin: bool):
        self.source, self.plans, self.pin = source, plans, pin
        self.reader_threads = max(1, threads)
        self.pool = (
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="zturbo-read") if threads > 1 else None
        )
        self.wait_seconds = 0.0

    def computed(self, step: DeviceStep) -> Iterator[Computed]:
        for plan in self.plans:
            t0 = time.perf_counter()
            read = map(self.source.read, plan) if self.pool is None else self.pool.map(self.source.read, plan)
            batch = collate(list(read), self.pin)
            self.wait_seconds += time.perf_counter() - t0
            yield compute(step, batch)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
