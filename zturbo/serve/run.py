"""The run loop shared by encode and decode, the choice of reading mode, and the run's report.

Stages and what overlaps with what:

* a reader (:mod:`zturbo.serve.readers`, :mod:`zturbo.serve.streams`) reads planned
  batches and has the device step compute them, in plan order;
* the device step (:mod:`zturbo.serve.step`) normalises a batch on the device, runs the
  backend and starts an asynchronous copy of the result back;
* a writer thread (:mod:`zturbo.serve.writers`) waits for that copy and writes shards or
  images, atomically.

Bounded queues between the stages give back-pressure, so memory stays flat.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from zturbo.config import ServeConfig
from zturbo.errors import UsageError
from zturbo.serve.readers import ItemSource, PhasedReader, Reader, ThreadReader
from zturbo.serve.step import DeviceStep
from zturbo.serve.streams import ComputeStreams, compute_streams
from zturbo.serve.writers import Writer
from zturbo.utils import usable_cores


@dataclass
class RunReport:
    """What a run did and where its time went."""

    operation: str
    output: str
    total: int = 0  # inputs this process was responsible for
    already_done: int = 0  # found complete from an earlier run and skipped
    processed: int = 0
    failed: int = 0
    failures: list[dict] = field(default_factory=list)
    batch_size: int = 0
    reader_threads: int = 0
    reading: str = ""  # the reading mode: 'threads', 'streams' or 'phased' (see zturbo.serve.readers)
    backend: dict = field(default_factory=dict)
    partition: str = ""
    wall_seconds: float = 0.0
    read_seconds: float = 0.0  # CPU time reading (opening, decoding, resizing), summed over the items
    wait_seconds: float = 0.0  # compute waiting for input (reading not hidden); per compute stream
    compute_seconds: float = 0.0  # per compute stream
    write_seconds: float = 0.0
    index: str | None = None
    index_count: int | None = None
    duplicates_dropped: int = 0

    @property
    def images_per_second(self) -> float:
        return self.processed / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "images_per_second": round(self.images_per_second, 3)}


def reading_mode(cfg: ServeConfig, device: torch.device, cores: int | None = None,
                 torch_threads: int | None = None) -> str:
    """The reading mode a run uses: ``cfg.reading``, or for 'auto' the one measured fastest for the case.

    * the model computes on a CPU with a torch thread on every core: ``streams`` from two
      cores on (2 cores: end to end beats the backend's own compute-only loop; 16 cores, one
      run: 755 images/s against 490 phased), ``phased`` on one core;
    * otherwise (a GPU, or a CPU model leaving cores free): ``threads`` (H100 and H200 at
      512 px: end to end / compute-only 0.945 and 0.947, against 0.924 reading in processes).
    """
    if cfg.reading == "streams" and device.type != "cpu":
        raise UsageError("--reading streams is for models computing on the CPU", "use auto, threads or phased")
    if cfg.reading != "auto":
        return cfg.reading
    cores = cores or usable_cores()
    threads = torch_threads or torch.get_num_threads()
    if device.type == "cpu" and threads >= cores:
        return "streams" if compute_streams(cores, cfg.streams)[0] > 1 else "phased"
    return "threads"


def open_reader(mode: str, source: ItemSource, plans: list[list[int]], device: torch.device, cfg: ServeConfig,
                threads: int) -> Reader:
    """The reader for ``mode``; ``threads`` reads beside compute in the ``threads`` mode."""
    if mode == "streams":
        streams, per_stream = compute_streams(streams=cfg.streams)
        return ComputeStreams(source, plans, streams, per_stream)
    pin = device.type == "cuda"
    if mode == "phased":
        return PhasedReader(source, plans, usable_cores(), pin)
    return ThreadReader(source, plans, threads, pin)


def run_batches(reader: Reader, step: DeviceStep, writer: Writer, report: RunReport,
                progress: Callable[[int], None] | None) -> None:
    """Compute every planned batch and hand it to the writer; the writer's first error stops everything.

    ``progress`` is advanced by the number of items each batch handled (read or failed).
    """
    report.reading = reader.mode
    report.reader_threads = reader.reader_threads
    writer.start()
    try:
        for computed in reader.computed(step):
            batch = computed.batch
            report.read_seconds += batch.read_seconds
            if batch.failures:
                report.failed += len(batch.failures)
                report.failures += [f.to_dict() for f in batch.failures]
            writer.put(computed)
            report.processed += len(batch.indices)
            if progress is not None:
                progress(len(batch.indices) + len(batch.failures))
    except BaseException:
        reader.close()
        writer.stop()  # keeps what is complete (unless the writer itself failed), then ends the thread
        raise
    reader.close()
    writer.finish()
    report.processed -= len(writer.failed)
    report.failed += len(writer.failed)
    report.failures += writer.failed
    report.wait_seconds = reader.wait_seconds
    report.compute_seconds = writer.compute_seconds / reader.concurrency
    report.write_seconds = writer.busy_seconds
