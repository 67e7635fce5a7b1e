"""Writers: a background thread that takes computed batches and writes them, atomically.

Encode writes latent shards (:class:`ShardWriter`) and keeps the part's failure list;
decode writes one image per latent on a small thread pool (:class:`ImageWriter`). On
CUDA the writer is where the host waits for a batch's copy back to finish.
"""

from __future__ import annotations

import abc
import errno
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from zturbo.paths import EscapeError, prepare_parent, write_new
from zturbo.serve import store
from zturbo.serve.inputs import Failure, Probed
from zturbo.serve.latents import LatentItem
from zturbo.serve.readers import Computed

# How many computed batches may wait for the writer.
WRITE_QUEUE = 4


def image_suffix(fmt: str) -> str:
    return {"jpeg": "jpg"}.get(fmt, fmt)


def _disk_full(exc: BaseException) -> BaseException:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return store.DiskFullError(
            f"no space left on the device ({exc.filename or 'output folder'}); the run stopped, and every "
            "shard or image already written is complete",
            "free some space and rerun the same command: it continues where it stopped",
        )
    return exc


class Writer(threading.Thread, abc.ABC):
    """Runs ``handle`` for each queued batch; the first error stops it and is re-raised in the caller."""

    def __init__(self):
        super().__init__(daemon=True)
        self.queue: queue.Queue[Computed | None] = queue.Queue(maxsize=WRITE_QUEUE)  # None: no more batches
        self.error: BaseException | None = None
        self.busy_seconds = 0.0  # writing
        self.compute_seconds = 0.0  # the batches' compute time, summed
        # Items computed but not written (a non-finite output, an unusable name), as Failure.to_dict() rows.
        self.failed: list[dict] = []

    def put(self, computed: Computed) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(computed, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Write what is queued, close, and raise the writer's error if it had one."""
        self.stop()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """End the thread after what is queued (kept unless the writer itself failed)."""
        if self.is_alive():
            self.queue.put(None)
            self.join()

    def run(self) -> None:
        while True:
            computed = self.queue.get()
            if computed is None:
                break
            if self.error is not None:
                continue  # drain so the producer never blocks
            try:
                if computed.result is not None:
                    self.compute_seconds += computed.result.wait()
                t0 = time.perf_counter()
                self.handle(computed)
                self.busy_seconds += time.perf_counter() - t0
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.error = _disk_full(exc)
        if self.error is None:
            try:
                t0 = time.perf_counter()
                self.close()
                self.busy_seconds += time.perf_counter() - t0
            except BaseException as exc:  # noqa: BLE001
                self.error = _disk_full(exc)

    @abc.abstractmethod
    def handle(self, computed: Computed) -> None:
        """Write one batch (called on the writer thread)."""

    def close(self) -> None:
        """Write what is still buffered (called on the writer thread after the last batch)."""


class ShardWriter(Writer):
    """Latents into shards of ``shard_size``; failures into the part's failure list (``failures`` holds
    the earlier runs' and the header probe's, by source key)."""

    def __init__(self, out_dir: Path, part: str, shard_size: int, items: list[Probed], failures: dict[str, dict]):
        super().__init__()
        self.out_dir, self.part, self.shard_size, self.items = out_dir, part, shard_size, items
        self.seq = store.next_sequence(out_dir, part)
        self.failures = failures
        self.failures_dirty = True
        self.tensors: dict = {}
        self.entries: list[dict] = []
        self.written = 0

    def handle(self, computed: Computed) -> None:
        batch = computed.batch
        for f in batch.failures:
            self.failures[f.key] = f.to_dict()
            self.failures_dirty = True
        if computed.result is None:
            return
        host, finite = computed.result.host, computed.result.finite
        for row, (index, (width, height)) in enumerate(zip(batch.indices, batch.sizes)):
            item = self.items[index]
            if finite is not None and not bool(finite[row]):
                failure = Failure(item.source.key, "non-finite", "the encoder's output holds NaN or infinite values")
                self.failures[item.source.key] = failure.to_dict()
                self.failed.append(failure.to_dict())
                self.failures_dirty = True
                continue
            name = f"{len(self.entries):06d}"
            self.tensors[name] = host[row].clone()
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


class ImageWriter(Writer):
    """One image per latent, named after it, inside ``out_dir`` and never over an existing file; at the
    source region's size with ``restore_size``. A non-finite image is reported in ``failed``, not written."""

    def __init__(self, out_dir: Path, fmt: str, quality: int, threads: int, items: list[LatentItem],
                 restore_size: bool):
        super().__init__()
        self.out_dir, self.fmt, self.quality = out_dir, fmt, quality
        self.items, self.restore_size = items, restore_size
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="zturbo-write")
        self.pending: list[Future] = []
        self.written = 0

    def handle(self, computed: Computed) -> None:
        if computed.result is None:
            return
        arrays, finite = computed.result.host.numpy(), computed.result.finite
        for row, index in enumerate(computed.batch.indices):
            item = self.items[index]
            if finite is not None and not bool(finite[row]):
                # Clamped to 8 bits, NaN would be black and inf saturated: nothing is written.
                self.failed.append(Failure(item.name, "non-finite", "the decoded image holds NaN or infinite "
                                           "values (the latent is out of range for this model, or the "
                                           "precision overflowed)").to_dict())
                continue
            size = item.source_region() if self.restore_size else None
            self.pending.append(self.pool.submit(self._save, arrays[row], item.name, size))
        # Bound the in-flight work and surface the first error.
        while len(self.pending) > 4 * self.threads:
            self._settle(self.pending.pop(0))

    def _settle(self, future: Future) -> None:
        failure = future.result()
        if failure is None:
            self.written += 1
        else:
            self.failed.append(failure.to_dict())

    def _save(self, arr: np.ndarray, name: str, size: tuple[int, int] | None) -> Failure | None:
        """Write one image under ``out_dir``, never replacing a file; a Failure when it cannot be placed there."""
        options = {"compress_level": 1} if self.fmt == "png" else {"quality": self.quality}
        im = Image.fromarray(arr)
        if size is not None and im.size != size:
            im = im.resize(size, Image.Resampling.LANCZOS)
        try:
            path = prepare_parent(self.out_dir, f"{name}.{image_suffix(self.fmt)}")
            written = write_new(path, lambda tmp: im.save(tmp, format=self.fmt.upper(), **options))
            if not written and not path.is_file():
                return Failure(name, "unwritable", f"{path} exists and is not a file")
        except EscapeError as exc:
            return Failure(name, "outside-output", exc.message)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise
            return Failure(name, "unwritable", f"{exc.filename or name}: {exc.strerror or exc}")
        return None

    def close(self) -> None:
        try:
            for fut in self.pending:
                self._settle(fut)
        finally:
            self.pending = []
            self.pool.shutdown(wait=True)
