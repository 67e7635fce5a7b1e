"""The train case: one full optimizer step of the training loop, timed like the inference cases.

The step comes from the training package (``zturbo.train.benchmark_step``), so it is
the real thing: losses (LPIPS with an untrained backbone: same FLOPs, no download),
the micro-batching that fits the profile's batch on the device, mixed precision,
the optimizer update and EMA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zturbo.bench.cases import SkipCase, Subject
from zturbo.bench.timing import percentile
from zturbo.config import Settings
from zturbo.model import TinyConfig
from zturbo.train import benchmark_step


@dataclass
class TrainMeasurement:
    samples_ms: list[float]
    median_ms: float
    p90_ms: float
    min_ms: float
    peak_memory: int
    memory_kind: str
    micro_batch: int | None


def time_train_step(settings: Settings, ours: Subject, device: torch.device, resolution: int, precision: str,
                    warmup: int, repeats: int) -> TrainMeasurement:
    """Median time of one optimizer step at the profile's batch size and ``resolution``."""
    if isinstance(ours.config, TinyConfig):
        raise SkipCase("a tiny model trains by distillation, with its teacher in the step: time it with "
                       "benchmarks/bench_tiny.py")
    local = settings.model_copy(deep=True)
    local.model = ours.config
    local.data.image_size = resolution
    local.train.precision = precision
    result = benchmark_step(local, device, steps=repeats, warmup=max(warmup, 1))
    samples = [float(t) for t in result["step_ms_all"]]
    on_cuda = device.type == "cuda"
    return TrainMeasurement(
        samples_ms=samples,
        median_ms=float(result["step_ms"]),
        p90_ms=percentile(samples, 90.0),
        min_ms=min(samples),
        peak_memory=int(result["peak_memory_gib"] * 2**30),
        memory_kind="cuda_max_allocated" if on_cuda else "process_peak_rss",
        micro_batch=result.get("micro_batch"),
    )
