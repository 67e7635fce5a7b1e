"""The train case: one full optimizer step of the training loop, timed like the inference cases.

The step comes from the training package (``zturbo.train.benchmark_step``), so it is
the real thing: losses, the micro-batching that fits the profile's batch on the
device, mixed precision and the optimizer update. Where the installed training
code offers no such hook the case is skipped with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zturbo.bench.cases import SkipCase, Subject
from zturbo.bench.timing import measure_peak_memory, time_interleaved
from zturbo.config import Settings


@dataclass
class TrainMeasurement:
    samples_ms: list[float]
    median_ms: float
    p90_ms: float
    min_ms: float
    peak_memory: int
    memory_kind: str
    micro_batch: int | None


def _benchmark_step_factory():
    try:
        from zturbo import train
    except ImportError as exc:
        raise SkipCase(f"the training package cannot be imported: {exc}") from exc
    factory = getattr(train, "benchmark_step", None)
    if factory is None:
        raise SkipCase("the installed training code offers no zturbo.train.benchmark_step to time")
    return factory


def time_train_step(settings: Settings, ours: Subject, device: torch.device, resolution: int, precision: str,
                    warmup: int, repeats: int) -> TrainMeasurement:
    """Median time of one optimizer step at the profile's batch size and ``resolution``."""
    factory = _benchmark_step_factory()
    local = settings.model_copy(deep=True)
    local.model = ours.config
    local.data.image_size = resolution
    local.train.precision = precision
    step = factory(local, device)
    if not callable(step):
        raise SkipCase(f"zturbo.train.benchmark_step returned {type(step).__name__}, not a step to call")
    (timing,) = time_interleaved([step], device, warmup=max(warmup, 1), repeats=repeats)
    # The step's model, optimizer state and EMA were allocated before it: count them all.
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    memory, kind = measure_peak_memory(step, device, resident)
    return TrainMeasurement(
        samples_ms=timing.samples_ms,
        median_ms=timing.median_ms,
        p90_ms=timing.p90_ms,
        min_ms=timing.min_ms,
        peak_memory=memory,
        memory_kind=kind,
        micro_batch=getattr(step, "micro_batch_size", None),
    )
