"""The batch pipeline: CPU workers read, the device computes, a background thread writes, all at once.

    from zturbo.config import ServeConfig
    from zturbo.serve import encode_collection, decode_collection

    report = encode_collection("runs/demo", "photos/", "latents/", ServeConfig(size=256))
    report = decode_collection("runs/demo", "latents/", "decoded/", ServeConfig())

Stages and what overlaps with what:

* readers open, decode and resize single images and stack them into uint8 batches
  of one size bucket each, in page-locked memory when the device is CUDA. Four kinds
  (``ServeConfig.overlap``): a thread pool beside compute (the default on a GPU),
  worker processes beside compute (a torch DataLoader), CPU compute streams that each
  read and then compute their own batches on their share of the cores (the default
  when the model computes on a multi-core CPU with every core, where readers beside
  one compute loop would preempt its threads), or reading between batches (one core);
* the main thread (or each compute stream) copies a batch to the device, normalises
  it there and runs the backend, then starts an asynchronous copy of the result back;
* a writer thread waits for that copy and writes shards (encode) or images
  (decode, on a small thread pool), atomically.

Bounded queues between the stages give back-pressure, so memory stays flat.
"""

from __future__ import annotations

import abc
import collections
import errno
import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zturbo.config import ServeConfig
from zturbo.errors import UsageError
from zturbo.serve import store
from zturbo.serve.inputs import (
    Failure,
    Partition,
    Probed,
    bucket_sizes,
    discover_sources,
    probe_all,
    resize_to_bucket,
)
from zturbo.serve.latents import LatentItem, LatentReader, check_channels, enumerate_latents
from zturbo.utils import atomic_path, atomic_write_json, usable_cores

# How many batches may wait between stages (loader -> compute, compute -> writer).
PREFETCH_BATCHES = 4
WRITE_QUEUE = 4


@dataclass
class RunReport:
    """What a run did and where its time went. Reading time is summed over the worker processes."""

    operation: str
    output: str
    total: int = 0  # inputs this process was responsible for
    already_done: int = 0  # found complete from an earlier run and skipped
    processed: int = 0
    failed: int = 0
    failures: list[dict] = field(default_factory=list)
    batch_size: int = 0
    workers: int = 0
    reading: str = ""  # 'overlapped' (processes beside compute), 'threads' (beside it), 'streams' / 'streams+processes' (CPU compute streams reading themselves / fed by processes) or 'phased' (between batches)
    backend: dict = field(default_factory=dict)
    partition: str = ""
    wall_seconds: float = 0.0
    read_seconds: float = 0.0  # worker CPU time decoding and resizing (summed over workers)
    wait_seconds: float = 0.0  # main thread waiting for the next batch (reading not hidden); streams: reading per stream
    compute_seconds: float = 0.0  # streams: per stream
    write_seconds: float = 0.0
    index: str | None = None
    index_count: int | None = None
    duplicates_dropped: int = 0

    @property
    def images_per_second(self) -> float:
        return self.processed / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "images_per_second": round(self.images_per_second, 3)}


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _seconds(t0: float) -> float:
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# Backend and batch size


def load_backend(model: Any, cfg: ServeConfig, device: str | torch.device | None = None):
    from zturbo.backends import create_backend

    return create_backend(cfg.backend, model, device=device or cfg.device, precision=cfg.precision)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def auto_batch_size(run: Callable[[int], None], device: torch.device, limit: int) -> int:
    """The largest batch that fits, found by doubling until out of memory (or ``limit``).

    On CUDA a batch "fits" when it runs and its peak stays under 90% of the card; the
    answer is that batch. On a CPU memory is rarely the limit and larger batches stop
    paying off early, so the answer is min(limit, 8).
    """
    if device.type != "cuda":
        return max(1, min(limit, 8))
    total = torch.cuda.get_device_properties(device).total_memory
    best, batch = 0, 1
    while batch <= limit:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            run(batch)
            torch.cuda.synchronize(device)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            break
        if torch.cuda.max_memory_allocated(device) > 0.9 * total:
            best = best or batch
            break
        best = batch
        batch *= 2
    torch.cuda.empty_cache()
    if best == 0:
        raise UsageError("even a batch of 1 does not fit in GPU memory", "use a smaller --size or --precision bf16")
    return min(best, limit)


def _resolve_batch(cfg: ServeConfig, run: Callable[[int], None], device: torch.device, n: int) -> int:
    if cfg.batch_size == "auto":
        return auto_batch_size(run, device, max(1, min(cfg.max_batch_size, n)))
    return int(cfg.batch_size)


# ---------------------------------------------------------------------------------------------------------
# Workers: image reading (encode) and latent reading (decode)


class _ImageSet(torch.utils.data.Dataset):
    def __init__(self, items: list[Probed], max_pixels: int):
        self.items = items
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from zturbo.data.images import ImageReadError, open_image_sized

        t0 = time.thread_time()  # CPU time, not time spent waiting for a core
        item = self.items[i]
        try:
            # The displayed size comes from this one open (also when the header was probed up front).
            im, original = open_image_sized(item.source.path, self.max_pixels, draft_size=max(item.bucket))
            im, _ = resize_to_bucket(im, item.bucket)
            # A numpy array travels to the main process as plain bytes, cheaper than a
            # shared-memory tensor for the small and mid-sized images that dominate.
            # (frombuffer over tobytes: np.asarray goes through __array_interface__, slower.)
            arr = np.frombuffer(im.tobytes(), np.uint8).reshape(im.height, im.width, 3)
            return i, arr, None, time.thread_time() - t0, original
        except ImageReadError as exc:
            return i, None, Failure(item.source.key, exc.reason, exc.message), time.thread_time() - t0, None


class _LatentSet(torch.utils.data.Dataset):
    def __init__(self, items: list[LatentItem]):
        self.items = items
        self.reader = LatentReader()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        t0 = time.thread_time()  # CPU time, not time spent waiting for a core
        return i, self.reader.load(self.items[i]).numpy(), None, time.thread_time() - t0, None


def _collate(samples, pin: bool):
    ok = [s for s in samples if s[1] is not None]
    data = None
    if ok:
        first = ok[0][1]
        # Straight into page-locked memory on CUDA, so the copy to the device is asynchronous.
        data = torch.empty((len(ok), *first.shape), dtype=torch.from_numpy(np.empty(0, first.dtype)).dtype, pin_memory=pin)
        np.stack([s[1] for s in ok], out=data.numpy())
    return {
        "indices": [s[0] for s in ok],
        "sizes": [s[4] for s in ok],
        "data": data,
        "failures": [s[2] for s in samples if s[2] is not None],
        "read_seconds": sum(s[3] for s in samples),
    }


def _as_is(sample):
    return sample


class _BatchStream:
    """Batches in plan order, assembled on a background thread from per-image worker results.

    Workers fetch single images (not whole batches), so the first batch is ready after
    batch/workers reads rather than batch reads, and a slow image delays one slot only.
    """

    _END = object()
    mode = "overlapped"

    def __init__(self, dataset, batches: list[list[int]], workers: int, pin: bool, depth: int = PREFETCH_BATCHES):
        order = [i for b in batches for i in b]
        per_worker = max(2, -(-2 * max(len(b) for b in batches) // max(1, workers)))
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=order, num_workers=workers, collate_fn=_as_is,
            prefetch_factor=per_worker if workers > 0 else None,
        )
        self.batches, self.pin = batches, pin
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="zturbo-batches")
        self.thread.start()

    def _run(self) -> None:
        it = iter(self.loader)
        try:
            for plan in self.batches:
                batch = _collate([next(it) for _ in plan], self.pin)
                if not self._put(batch):
                    return
            self._put(self._END)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            self._put(exc)
        finally:
            del it  # shuts the worker processes down

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class _ThreadPoolBatchStream:
    """Batches read by threads in this process, ``ahead`` batches ahead of the one computed.

    No inter-process copies: each image is decoded straight into this process (PIL
    releases the GIL while decoding and resizing).

    * ``ahead > 0`` ("threads"): a pool of ``threads`` reads beside compute, for GPUs,
      whose compute leaves the CPU cores free.
    * ``ahead == 0`` ("phased"): each batch is read just before it is computed, by this
      thread with ``threads - 1`` helpers, or by this thread alone (``_ReadTuner``
      picks). For compute on the CPU when torch's threads already occupy every core:
      reading beside compute there means sharing cores, and a compute thread the
      scheduler preempts for a reader stalls the whole op at its barrier, so reads cost
      more than their own CPU time. A burst between batches costs just that time.
      Writing stays on its background thread: it is a small share of the work.
    """

    def __init__(self, dataset, batches: list[list[int]], threads: int, pin: bool, ahead: int):
        self.dataset, self.batches, self.pin, self.ahead = dataset, batches, pin, max(0, ahead)
        self.mode = "threads" if self.ahead else "phased"
        helpers = max(1, threads) if self.ahead else max(0, threads - 1)
        self.pool = ThreadPoolExecutor(max_workers=helpers, thread_name_prefix="zturbo-read") if helpers else None
        self.tuner = _ReadTuner(can_share=self.pool is not None)

    def __iter__(self):
        if not self.ahead:
            for plan in self.batches:
                yield _collate(self._read_phased(plan), self.pin)
            return
        plans = iter(self.batches)
        pending: collections.deque = collections.deque()

        def submit() -> None:
            plan = next(plans, None)
            if plan is not None:
                pending.append([self.pool.submit(self.dataset.__getitem__, i) for i in plan])

        for _ in range(self.ahead):
            submit()
        while True:
            submit()  # keeps `ahead` batches in flight beyond the one about to be computed
            if not pending:
                return
            yield _collate([f.result() for f in pending.popleft()], self.pin)

    def _read_phased(self, plan: list[int]) -> list:
        way = self.tuner.choose()
        t0 = time.perf_counter()
        if way == "alone":
            samples = [self.dataset[i] for i in plan]
        else:
            # The helpers take images from the front; this thread takes from the back
            # whatever they have not started (a cancelled future was never started).
            futures = [self.pool.submit(self.dataset.__getitem__, i) for i in plan]
            samples = [None] * len(plan)
            for j in range(len(plan) - 1, -1, -1):
                if futures[j].cancel():
                    samples[j] = self.dataset[plan[j]]
            samples = [s if s is not None else f.result() for s, f in zip(samples, futures)]
        self.tuner.record(way, (time.perf_counter() - t0) / max(1, len(plan)))
        return samples

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _ReadTuner:
    """Whether a phased batch is read by the main thread alone or shared with helper threads, from
    measured seconds per image.

    Small images cost mostly Python (Pillow's header parsing), which holds the GIL: helpers
    only add hand-offs (2 cores, 48 px JPEG/PNG to 32 px: 0.36 ms per image alone against
    0.49 shared). Large images cost mostly decoding and resampling, which release it
    (300-400 px to 256 px: 6.6 ms alone against 3.7 shared). The first two batches try each
    way; then the faster is kept (its time smoothed) and the other is tried again every
    ``retry`` batches, so a collection whose image sizes change midway follows.
    """

    def __init__(self, can_share: bool, retry: int = 32):
        self.ways = ("alone", "shared") if can_share else ("alone",)
        self.seconds: dict[str, float] = {}
        self.retry = retry
        self.count = 0

    def choose(self) -> str:
        self.count += 1
        for way in self.ways:
            if way not in self.seconds:
                return way
        best = min(self.ways, key=self.seconds.__getitem__)
        if self.count % self.retry == 0 and len(self.ways) > 1:
            return next(w for w in self.ways if w != best)
        return best

    def record(self, way: str, seconds_per_image: float) -> None:
        old = self.seconds.get(way)
        self.seconds[way] = seconds_per_image if old is None else 0.5 * (old + seconds_per_image)


class _ComputeStreams:
    """Several batches in flight on a multi-core CPU: each of ``streams`` threads takes the next
    batch, reads it and computes it with ``cores / streams`` of torch's threads, so one stream's
    reading overlaps the others' compute, and no core is shared between compute threads.

    Against one stream computing on every core, this wins twice over: reading is hidden
    behind the other streams' compute instead of stopping it, and a conv on small inputs
    scales worse across threads than independent batches do (2 cores, ultrafast
    channels at 32 px, batch 16: two single-thread streams compute 1.1-1.3x the images/s
    of one two-thread loop). Batches are taken in plan order and handed on in that
    order, so outputs are the same as with one stream. With ``feeder`` (worker processes
    reading in plan order, --workers N) the streams take decoded batches from it instead
    of reading themselves; that keeps Pillow off this process's GIL but measured slower
    for small images on 16 cores, so it is not the default. torch's thread count is
    process-wide: it is set for the run and restored after.
    """

    mode = "streams"
    computes = True

    def __init__(self, dataset, batches: list[list[int]], streams: int, threads_per_stream: int, feeder=None,
                 procs: int = 0):
        self.dataset, self.batches, self.feeder, self.procs = dataset, batches, feeder, procs
        if feeder is not None:
            self.mode = "streams+processes"
        self.streams = max(1, min(streams, len(batches)))
        self.threads_per_stream = max(1, threads_per_stream)
        self.take_lock = threading.Lock()
        self.next_batch = 0
        self.feed = iter(feeder) if feeder is not None else None
        self.ready: dict[int, dict] = {}
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.slots = threading.Semaphore(2 * self.streams)  # batches taken but not yet handed on
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.read_wall = [0.0] * self.streams  # per stream: time spent reading (or waiting for the feeder)
        self.saved_threads: int | None = None

    def start(self, step: _DeviceStep, job_args) -> None:
        self.saved_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads_per_stream)
        for s in range(self.streams):
            t = threading.Thread(target=self._run, args=(s, step, job_args), daemon=True, name=f"zturbo-stream{s}")
            t.start()
            self.threads.append(t)

    def _take(self, s: int) -> tuple[int | None, dict | None]:
        t0 = time.perf_counter()
        with self.take_lock:
            k = self.next_batch
            if k >= len(self.batches):
                return None, None
            self.next_batch += 1
            if self.feed is not None:  # the feeder yields in plan order: its next batch is batch k
                batch = next(self.feed)
                self.read_wall[s] += _seconds(t0)
                return k, batch
        batch = _collate([self.dataset[i] for i in self.batches[k]], False)
        self.read_wall[s] += _seconds(t0)
        return k, batch

    def _run(self, s: int, step: _DeviceStep, job_args) -> None:
        try:
            while not self.stop.is_set():
                if not self.slots.acquire(timeout=0.1):
                    continue
                k, batch = self._take(s)
                if k is None:
                    return
                if batch["data"] is not None:
                    args = job_args(batch)
                    batch["job"] = args[0]
                    batch["result"] = step.run(batch["data"], args[1])
                with self.cond:
                    self.ready[k] = batch
                    self.cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            with self.cond:
                self.error = self.error or exc
                self.cond.notify_all()

    def __iter__(self):
        for k in range(len(self.batches)):
            with self.cond:
                while k not in self.ready and self.error is None:
                    self.cond.wait(0.1)
                if k not in self.ready:
                    raise self.error
                batch = self.ready.pop(k)
            self.slots.release()
            yield batch

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
        if self.feeder is not None:
            self.feeder.close()
        if self.saved_threads is not None:
            torch.set_num_threads(self.saved_threads)
            self.saved_threads = None


def compute_streams(cores: int | None = None, streams: int | None = None) -> tuple[int, int]:
    """(streams, torch threads per stream) for serving on a CPU with ``cores`` cores: ``streams`` if
    given (at most one per core), else two up to 8 cores, then one per 4 cores, at most 4; the threads
    split the cores evenly."""
    cores = cores or usable_cores()
    if streams is None:
        streams = 1 if cores < 2 else max(2, min(4, cores // 4))
    streams = max(1, min(streams, cores))
    return streams, max(1, cores // streams)


def _stream(dataset, batches: list[list[int]], workers: int, device: torch.device, cfg: ServeConfig):
    """Compute streams when the model computes on a multi-core CPU with a thread on every core;
    phased reading with one core, or when asked (--overlap off); beside compute in threads for a GPU
    (on an H100 at 512 px: end to end / compute-only 0.945 against 0.924 with processes); else
    worker processes."""
    fills_cpu = device.type == "cpu" and torch.get_num_threads() >= usable_cores()
    streams, threads = compute_streams(streams=cfg.streams)
    if cfg.overlap == "streams" or (cfg.overlap == "auto" and fills_cpu and streams > 1):
        if device.type != "cpu":
            raise UsageError("--overlap streams is for models computing on the CPU", "use auto, threads or on")
        # Readers: the stream threads themselves (the default), or worker processes feeding the streams
        # when --workers N is given. On a 16-core host (400 images, 32 px, 4 streams) the streams
        # reading themselves gave 783 images/s, 2 feeding processes 686 and 4 processes 528; at 64 px,
        # 276 against 226 with 2 processes.
        procs = 0 if cfg.workers is None else cfg.workers
        feeder = _BatchStream(dataset, batches, procs, False) if procs > 0 else None
        return _ComputeStreams(dataset, batches, streams, threads, feeder, procs)
    if cfg.overlap == "off" or (cfg.overlap == "auto" and fills_cpu):
        return _ThreadPoolBatchStream(dataset, batches, usable_cores(), pin=False, ahead=0)
    if cfg.overlap == "threads" or (cfg.overlap == "auto" and device.type == "cuda"):
        return _ThreadPoolBatchStream(dataset, batches, max(1, workers), device.type == "cuda", ahead=PREFETCH_BATCHES)
    return _BatchStream(dataset, batches, workers, device.type == "cuda")


def _batches(keys: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by size bucket, each group cut into full batches (a partial one last)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(tuple(key), []).append(i)
    out = []
    for key in sorted(groups, key=lambda k: -len(groups[k])):
        idx = groups[key]
        out += [idx[j : j + batch_size] for j in range(0, len(idx), batch_size)]
    return out


# ---------------------------------------------------------------------------------------------------------
# Device step


class _DeviceStep:
    """Normalise on the device, run the backend, start the copy back; timing by CUDA events there."""

    def __init__(self, backend, op: str, latent_mode: str = "mean", seed: int = 0):
        self.backend = backend
        self.op = op
        self.device = backend.device
        self.cuda = self.device.type == "cuda"
        self.sample = latent_mode == "sample"
        self.seed = seed
        if self.sample and not hasattr(backend, "vae"):
            raise UsageError(
                f"--sample needs the posterior's variance, which the '{backend.name}' backend does not output",
                "use --mean, or --backend torch / compile",
            )

    def images_in(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True)
        return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()

    @torch.inference_mode()
    def encode(self, x: torch.Tensor, keys: list[str]) -> torch.Tensor:
        if not self.sample:
            return self.backend.encode(x)
        vae = self.backend.vae
        posterior = vae.encode(x.to(self.backend.dtype))
        noise = torch.stack([
            torch.randn(posterior.mean.shape[1:], generator=self._generator(k), dtype=torch.float32) for k in keys
        ]).to(posterior.mean.device, posterior.mean.dtype, non_blocking=True)
        return posterior.mean + posterior.std * noise

    def _generator(self, key: str) -> torch.Generator:
        # Per-image noise seeded by the image's name: a rerun after a crash gives the same sample.
        digest = hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "big") & ((1 << 63) - 1))

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.backend.decode(z.to(self.device, non_blocking=True))
        # To uint8 on the device: a quarter of the bytes to copy back.
        return ((x.float().clamp_(-1, 1) + 1.0) * 127.5).round_().to(torch.uint8).permute(0, 2, 3, 1)

    def run(self, data: torch.Tensor, keys: list[str]):
        """Returns (host tensor, ready event or None, compute timer) without waiting for a GPU."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        out = self.encode(self.images_in(data), keys) if self.op == "encode" else self.decode(data)
        if not self.cuda:
            return out.contiguous().cpu(), None, _seconds(t0)
        end.record()
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done, (start, end)


# ---------------------------------------------------------------------------------------------------------
# Writers


class _Writer(threading.Thread, abc.ABC):
    """Runs ``handle(job)`` for queued jobs; the first error stops it and is re-raised in the caller."""

    def __init__(self):
        super().__init__(daemon=True)
        self.queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
        self.error: BaseException | None = None
        self.busy_seconds = 0.0
        self.compute_seconds = 0.0

    def put(self, job) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(job, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self.stop()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self.is_alive():
            self.queue.put(None)
            self.join()

    def run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                break
            if self.error is not None:
                continue  # drain so the producer never blocks
            try:
                host, done, timer = job[0], job[1], job[2]
                if done is not None:
                    done.synchronize()
                    self.compute_seconds += timer[0].elapsed_time(timer[1]) / 1000.0
                else:
                    self.compute_seconds += timer
                t0 = time.perf_counter()
                self.handle(host, *job[3:])
                self.busy_seconds += _seconds(t0)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.error = _disk_full(exc)
        if self.error is None:
            try:
                t0 = time.perf_counter()
                self.close()
                self.busy_seconds += _seconds(t0)
            except BaseException as exc:  # noqa: BLE001
                self.error = _disk_full(exc)

    @abc.abstractmethod
    def handle(self, host, *args) -> None:
        """Write one batch (called on the writer thread)."""

    def close(self) -> None:
        pass


def _disk_full(exc: BaseException) -> BaseException:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return store.DiskFullError(
            f"no space left on the device ({exc.filename or 'output folder'}); the run stopped, and every "
            "shard or image already written is complete",
            "free some space and rerun the same command: it continues where it stopped",
        )
    return exc


class _ShardWriter(_Writer):
    def __init__(self, out_dir: Path, part: str, shard_size: int, failures: dict[str, dict]):
        super().__init__()
        self.out_dir, self.part, self.shard_size = out_dir, part, shard_size
        self.seq = store.next_sequence(out_dir, part)
        self.failures = failures
        self.failures_dirty = True
        self.tensors: dict[str, torch.Tensor] = {}
        self.entries: list[dict] = []
        self.written = 0

    def add_failures(self, failures: list[Failure]) -> None:
        # From the main thread between batches; the dict is only read in _flush on this thread's side
        # after the queue hands over the next job, so ordering is preserved by put().
        self.put((None, None, 0.0, failures))

    def handle(self, host, items: list[tuple[Probed, tuple[int, int]]] | list[Failure]) -> None:
        if host is None:
            for f in items:
                self.failures[f.key] = f.to_json()
            self.failures_dirty = True
            return
        for i, (item, (width, height)) in enumerate(items):
            name = f"{len(self.entries):06d}"
            self.tensors[name] = host[i].clone()
            self.entries.append({
                "tensor": name,
                "source": item.source.key,
                "shape": list(host.shape[1:]),
                "width": width,
                "height": height,
                "bucket": list(item.bucket),
            })
            if len(self.entries) >= self.shard_size:
                self._flush()

    def _flush(self) -> None:
        if self.entries:
            store.write_shard(store.shard_path(self.out_dir, self.part, self.seq), self.tensors, self.entries)
            self.seq += 1
            self.written += len(self.entries)
            for e in self.entries:
                self.failures.pop(e["source"], None)
            self.failures_dirty = True
            self.tensors, self.entries = {}, []
        if self.failures_dirty:
            path = store.failure_path(self.out_dir, self.part)
            if self.failures or path.exists():
                store.write_failures(self.out_dir, self.part, self.failures)
            self.failures_dirty = False

    def close(self) -> None:
        self._flush()


class _ImageWriter(_Writer):
    def __init__(self, out_dir: Path, fmt: str, quality: int, threads: int):
        super().__init__()
        self.out_dir, self.fmt, self.quality = out_dir, fmt, quality
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="zturbo-write")
        self.pending: list = []
        self.written = 0

    def handle(self, host, names: list[tuple[str, tuple[int, int] | None]]) -> None:
        arrays = host.numpy()
        self.pending += [self.pool.submit(self._save, arrays[i], *job) for i, job in enumerate(names)]
        # Bound the in-flight work and surface the first error.
        while len(self.pending) > 4 * self.threads:
            self.pending.pop(0).result()
            self.written += 1

    def _save(self, arr: np.ndarray, name: str, size: tuple[int, int] | None = None) -> None:
        from PIL import Image

        path = self.out_dir / f"{name}.{image_suffix(self.fmt)}"
        options = {"compress_level": 1} if self.fmt == "png" else {"quality": self.quality}
        im = Image.fromarray(arr)
        if size is not None and im.size != size:
            im = im.resize(size, Image.Resampling.LANCZOS)
        with atomic_path(path, suffix=".tmp") as tmp:
            im.save(tmp, format=self.fmt.upper(), **options)

    def close(self) -> None:
        try:
            for fut in self.pending:
                fut.result()
                self.written += 1
        finally:
            self.pending = []
            self.pool.shutdown(wait=True)


def image_suffix(fmt: str) -> str:
    return {"jpeg": "jpg"}.get(fmt, fmt)


# ---------------------------------------------------------------------------------------------------------
# The loop shared by encode and decode


def _drive(stream: _BatchStream | _ThreadPoolBatchStream | _ComputeStreams, step: _DeviceStep, writer: _Writer,
           report: RunReport, job_args, progress_cb) -> None:
    """Pull batches, compute, hand results to the writer; the writer's first error stops everything."""
    report.reading = stream.mode
    computed = getattr(stream, "computes", False)
    writer.start()
    if computed:
        report.workers = stream.procs  # reader processes feeding the streams (0: they read themselves)
        stream.start(step, job_args)
    it = iter(stream)
    try:
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            report.wait_seconds += _seconds(t0)
            report.read_seconds += batch["read_seconds"]
            failures = batch["failures"]
            if failures:
                report.failed += len(failures)
                report.failures += [f.to_json() for f in failures]
                if isinstance(writer, _ShardWriter):
                    writer.add_failures(failures)
            n = 0
            if batch["data"] is not None:
                if computed:
                    (host, done, timer), job = batch["result"], batch["job"]
                else:
                    job, keys = job_args(batch)
                    host, done, timer = step.run(batch["data"], keys)
                writer.put((host, done, timer, job))
                n = len(batch["indices"])
                report.processed += n
            if progress_cb is not None:
                progress_cb(n + len(failures))
    except BaseException:
        stream.close()  # stops the workers
        writer.stop()  # keeps what is complete (unless the writer itself failed), then ends the thread
        raise
    stream.close()
    writer.finish()
    report.compute_seconds = writer.compute_seconds
    report.write_seconds = writer.busy_seconds
    if computed:  # per stream: summed times over the streams, as wall time
        report.compute_seconds /= stream.streams
        report.wait_seconds = sum(stream.read_wall) / stream.streams


# ---------------------------------------------------------------------------------------------------------
# Encode


def encode_collection(
    model: Any,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    cfg: ServeConfig | None = None,
    partition: Partition | None = None,
    *,
    device: str | torch.device | None = None,
    barrier: Callable[[], None] | None = None,
    backend=None,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> RunReport:
    """Encode every image under ``input_path`` (a folder or manifest) into latent shards in ``output_dir``.

    Exactly once: sources already in a complete shard are skipped, so a rerun after any
    crash only does what is missing. With ``partition`` this process takes only its part
    (``--shard I/N`` across machines, rank/world size under torchrun); ``barrier`` (e.g.
    ``torch.distributed.barrier``) lets rank 0 wait for the others before merging the index.
    ``progress(total, done)`` may return a callback advanced by the number of images handled.
    """
    cfg = cfg or ServeConfig()
    partition = partition or Partition()
    out_dir = Path(output_dir)
    t_start = time.perf_counter()
    sources, _ = discover_sources(input_path)
    if not sources:
        from zturbo.errors import InputError

        raise InputError(f"no images found in {input_path}", "supported: .png .jpg .jpeg .webp .bmp .tif .tiff .gif")
    mine = [s for s in sources if partition.owns(s.key)]

    backend = backend or load_backend(model, cfg, device)
    size = cfg.size or _model_sample_size(backend)
    buckets = bucket_sizes(size, backend.downsample_factor, cfg.resize)
    vae_cfg = getattr(getattr(backend, "vae", None), "config", None)
    store.check_settings(out_dir, {
        "format": store.FORMAT,
        "model": str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__,
        "latent_channels": backend.latent_channels,
        "downsample_factor": backend.downsample_factor,
        "scaling_factor": getattr(vae_cfg, "scaling_factor", getattr(backend, "scaling_factor", None)),
        "shift_factor": getattr(vae_cfg, "shift_factor", getattr(backend, "shift_factor", None)),
        "size": size,
        "resize": cfg.resize,
        "latent_mode": cfg.latent_mode,
        "precision": cfg.precision,
        "seed": cfg.seed,
    })
    store.remove_temp_files(out_dir, partition.name)
    done = store.scan_shards(out_dir, set_aside_unreadable=partition.rank == 0).sources
    todo = [s for s in mine if s.key not in done]
    workers = default_workers() if cfg.workers is None else cfg.workers
    report = RunReport("encode", str(out_dir), total=len(mine), already_done=len(mine) - len(todo),
                       workers=workers, backend=backend.describe(), partition=partition.name)

    if len(buckets) == 1:  # one size for all: no need to read headers first; workers report failures
        probed = [Probed(s, 0, 0, buckets[0]) for s in todo]
    else:
        probed = probe_all(todo, buckets, cfg.max_pixels, workers)
    items = [p for p in probed if isinstance(p, Probed)]
    header_failures = [p for p in probed if isinstance(p, Failure)]
    previous = {f["source"]: f for f in _read_part_failures(out_dir, partition.name)}
    writer = _ShardWriter(out_dir, partition.name, cfg.shard_size, previous)
    for f in header_failures:
        writer.failures[f.key] = f.to_json()
    report.failed = len(header_failures)
    report.failures = [f.to_json() for f in header_failures]

    step = _DeviceStep(backend, "encode", cfg.latent_mode, cfg.seed)
    if items:
        largest = max((p.bucket for p in items), key=lambda b: b[0] * b[1])

        def trial(b: int) -> None:
            step.encode(torch.zeros(b, 3, largest[1], largest[0], device=backend.device), ["probe"] * b)

        report.batch_size = _resolve_batch(cfg, trial, backend.device, len(items))
        batches = _batches([p.bucket for p in items], report.batch_size)
        loader = _stream(_ImageSet(items, cfg.max_pixels), batches, workers, backend.device, cfg)
        advance = progress(len(mine), report.already_done + len(header_failures)) if progress else None
        def job(batch):
            idx = batch["indices"]
            return list(zip([items[i] for i in idx], batch["sizes"])), [items[i].source.key for i in idx]

        _drive(loader, step, writer, report, job, advance)
    else:
        writer.start()
        writer.finish()
    waited = 0.0
    if partition.world_size > 1 and barrier is not None:
        t0 = time.perf_counter()
        barrier()
        waited = _seconds(t0)
    if partition.rank == 0 or barrier is None:
        index = store.build_index([out_dir])
        report.index = str(out_dir / store.INDEX_NAME)
        report.index_count = index["count"]
        report.duplicates_dropped = index["duplicates_dropped"]
    report.wall_seconds = _seconds(t_start) - waited  # this process's own time, not waiting for other ranks
    if partition.rank == 0:
        atomic_write_json(out_dir / store.REPORT_NAME, report.to_json())
    return report


def _read_part_failures(out_dir: Path, part: str) -> list[dict]:
    import json

    path = store.failure_path(out_dir, part)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []


def _model_sample_size(backend) -> int:
    size = getattr(getattr(getattr(backend, "vae", None), "config", None), "sample_size", None)
    size = size or getattr(backend, "sample_size", None)
    size = size or (getattr(backend, "meta", None) or {}).get("model", {}).get("sample_size")  # export folders
    if not size:
        raise UsageError(f"the '{backend.name}' backend does not say its image size", "give --size")
    return int(size)


# ---------------------------------------------------------------------------------------------------------
# Decode


def decode_collection(
    model: Any,
    latents_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    cfg: ServeConfig | None = None,
    partition: Partition | None = None,
    *,
    device: str | torch.device | None = None,
    backend=None,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> RunReport:
    """Decode latents (an encode output, shards, ``.safetensors`` or ``.npy`` files) into images.

    Each image is written atomically, so a rerun skips the ones that exist.
    """
    cfg = cfg or ServeConfig()
    partition = partition or Partition()
    out_dir = Path(output_dir)
    t_start = time.perf_counter()
    items = [it for it in enumerate_latents(latents_path) if partition.owns(it.name)]
    backend = backend or load_backend(model, cfg, device)
    check_channels(items, backend.latent_channels)
    _disambiguate_names(items)
    suffix = image_suffix(cfg.image_format)
    todo = [it for it in items if not (out_dir / f"{it.name}.{suffix}").is_file()]
    workers = min(2, default_workers()) if cfg.workers is None else cfg.workers
    report = RunReport("decode", str(out_dir), total=len(items), already_done=len(items) - len(todo),
                       workers=workers, backend=backend.describe(), partition=partition.name)
    writer = _ImageWriter(out_dir, cfg.image_format, cfg.quality, threads=default_workers())
    step = _DeviceStep(backend, "decode")
    if todo:
        out_dir.mkdir(parents=True, exist_ok=True)
        largest = max((it.shape for it in todo), key=lambda s: s[1] * s[2])

        def trial(b: int) -> None:
            step.decode(torch.zeros(b, *largest, device=backend.device))

        report.batch_size = _resolve_batch(cfg, trial, backend.device, len(todo))
        batches = _batches([it.shape[1:] for it in todo], report.batch_size)
        loader = _stream(_LatentSet(todo), batches, workers, backend.device, cfg)
        advance = progress(len(items), report.already_done) if progress else None
        def job(batch):
            picked = [todo[i] for i in batch["indices"]]
            return [(it.name, it.source_region() if cfg.restore_size else None) for it in picked], None

        _drive(loader, step, writer, report, job, advance)
    else:
        writer.start()
        writer.finish()
    report.wall_seconds = _seconds(t_start)
    return report


def _disambiguate_names(items: list[LatentItem]) -> None:
    """Two sources that differ only in extension (a.jpg, a.png) would overwrite each other's image."""
    seen: dict[str, int] = {}
    for it in items:
        seen[it.name] = seen.get(it.name, 0) + 1
    if any(n > 1 for n in seen.values()):
        raise UsageError(
            f"several latents would be written to the same image name (e.g. "
            f"'{next(k for k, n in seen.items() if n > 1)}')",
            "decode them into separate output folders",
        )
