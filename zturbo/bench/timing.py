"""Timing and memory measurement: warm-up, repeats, median and p90, peaks.

On CUDA each call is bracketed by CUDA events (the device's own clock, no host
jitter); elsewhere by ``perf_counter`` after the call has returned. Work that
torch's stream does not see (ONNX Runtime's or TensorRT's own CUDA streams, worker
processes) is timed by ``perf_counter`` between two calls of a ``sync`` callable
that waits for it. Several callables are timed *interleaved* (A B A B ..., or
A B B A with ``alternate``) so that a slow spell on a shared machine hits every
variant alike and their ratio stays honest.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    """Latencies of one callable, in milliseconds."""

    samples_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p90_ms(self) -> float:
        return percentile(self.samples_ms, 90.0)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device, *, sync: Callable[[], None] | None = None) -> float:
    """Milliseconds one call takes, measured so that queued device work is counted.

    ``sync``, when given, replaces the CUDA events: the call is timed by ``perf_counter``
    from one return of ``sync()`` to the next (it must wait for all the work ``fn`` queued).
    """
    if sync is None and device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    wait = sync if sync is not None else (lambda: synchronize(device))
    wait()
    t0 = time.perf_counter()
    fn()
    wait()
    return (time.perf_counter() - t0) * 1000.0


def time_rounds(
    fns: Sequence[Callable[[int], object]],
    device: torch.device,
    *,
    rounds: int,
    alternate: bool = False,
    sync: Callable[[], None] | None = None,
) -> list[Timing]:
    """Time callables side by side: each round calls every one once, with the round's index.

    For variants whose calls consume something per round (a fresh output folder, the
    next chunk of inputs). ``alternate`` reverses the order in odd rounds (A B, B A, ...),
    so neither variant always runs first after the other's caches or files.
    """
    timings = [Timing() for _ in fns]
    order = list(range(len(fns)))
    for index in range(rounds):
        for i in reversed(order) if alternate and index % 2 else order:
            timings[i].samples_ms.append(time_once(lambda i=i, index=index: fns[i](index), device, sync=sync))
    return timings


def time_interleaved(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    alternate: bool = False,
    sync: Callable[[], None] | None = None,
) -> list[Timing]:
    """Warm every callable up, then time them round-robin ``repeats`` times."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    synchronize(device)
    if sync is not None:
        sync()
    return time_rounds([lambda _, fn=fn: fn() for fn in fns], device, rounds=repeats, alternate=alternate,
                       sync=sync)


# ---------------------------------------------------------------------------------------------------------
# Memory


class _RssSampler:
    """Highest resident set size of this process seen while active (sampled every few ms)."""

    def __init__(self, interval_s: float = 0.002):
        import psutil

        self._process = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def measure_peak_memory(fn: Callable[[], object], device: torch.device, resident_bytes: int = 0) -> tuple[int, str]:
    """Peak memory of one call: (bytes, what was measured).

    CUDA: ``resident_bytes`` (the caller's weights and input) plus the most the caching
    allocator held above what was allocated before the call, so other models resident
    on the device for interleaving do not count. Elsewhere: the process's peak RSS,
    sampled, which includes the Python runtime and loaded libraries.
    """
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return int(resident_bytes + torch.cuda.max_memory_allocated(device) - before), "cuda_max_allocated"
    with _RssSampler() as sampler:
        fn()
    return int(sampler.peak), "process_peak_rss"


def free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
