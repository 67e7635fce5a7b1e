"""Timing full training steps on synthetic data (for `zturbo bench` and benchmarks/)."""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch

from zturbo.config import Settings
from zturbo.train.engine import TrainEngine
from zturbo.utils import resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_step(
    settings: Settings,
    device: str | torch.device = "auto",
    *,
    steps: int = 5,
    warmup: int = 2,
    model: torch.nn.Module | None = None,
    lpips_random_backbone: bool = True,
    disc_active: bool | None = None,
    profile_top: int = 0,
    fit: bool = True,
) -> dict[str, Any]:
    """Median time of full optimizer steps at ``settings.train.batch_size`` on random images.

    The step is the trainer's own (micro-batching, autocast, losses, clipping,
    AdamW, EMA, discriminator when enabled), so the numbers are what training
    gets. LPIPS uses an untrained backbone by default: the same FLOPs and memory
    as the pretrained one, without needing its weights. ``disc_active`` forces
    the discriminator on (True) or off (False); None follows ``loss.disc_start``
    (counted from step 0).
    ``fit`` False keeps ``train.micro_batch_size`` (or the whole batch) instead of
    fitting the micro-batch to the device. ``profile_top`` > 0 profiles one more step
    (torch.profiler) and adds its ``profile_top`` most expensive kernels (CUDA) or ops (CPU).
    Returns step_ms (median), step_ms_all, images_per_s, peak_memory_gib (CUDA max
    allocated; on CPU the process's peak resident set size), micro_batch, precision and
    ``compile`` (whether compiled, graph breaks and their reasons).
    """
    device = resolve_device(device) if isinstance(device, str) else device
    size = settings.data.image_size
    batch = settings.train.batch_size
    engine = TrainEngine(
        settings, device, model=model, lpips_random_backbone=lpips_random_backbone, total_steps=10**6
    )
    if disc_active is not None and engine.disc is not None:
        start = 0 if disc_active else 10**9
        engine.settings = settings.model_copy(
            update={"loss": settings.loss.model_copy(update={"disc_start": start})}
        )
    if device.type == "cuda":
        if fit:
            engine.fit_micro_batch(size)
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, settings.model.in_channels, size, size, generator=gen) * 2 - 1
    if device.type == "cuda":
        images = images.pin_memory()
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        engine.step(images, i)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = _peak_rss() / 2**30
    top = profile_kernels(lambda: engine.step(images, warmup + steps), device, profile_top) if profile_top else []
    return {
        "compile": engine.compile_report(),
        "top_kernels": top,
        "step_ms": median * 1e3,
        "step_ms_all": [t * 1e3 for t in times],
        "images_per_s": batch / median,
        "peak_memory_gib": peak,
        "batch_size": batch,
        "micro_batch": engine.micro_batch,
        "image_size": size,
        "precision": engine.precision,
        "device": str(device),
    }


def profile_kernels(fn, device: torch.device, top: int) -> list[dict[str, Any]]:
    """The ``top`` kernels (CUDA) or operators (CPU) by self time in one call of ``fn``, with their share."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    if cuda:
        events = [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
                  if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    else:
        events = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(t for _, t, _ in events) or 1.0
    events.sort(key=lambda e: -e[1])
    return [{"name": name[:120], "ms": t / 1e3, "calls": n, "share": t / total} for name, t, n in events[:top]]


def _peak_rss() -> int:
    import resource

    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
