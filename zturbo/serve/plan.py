"""Planning a run: batches of one size bucket each, the batch size, and how many threads read."""

from __future__ import annotations

from collections.abc import Callable

import torch

from zturbo.config import ServeConfig
from zturbo.errors import UsageError
from zturbo.utils import usable_cores


def reader_threads() -> int:
    """Threads that read beside compute: every core but one, at most 8 (at least 1)."""
    return max(1, min(8, usable_cores() - 1))


def plan_batches(buckets: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Item indices grouped by size bucket (``buckets[i]`` is item i's), each group cut into full
    batches with a partial one last; the most populated bucket comes first."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(buckets):
        groups.setdefault(tuple(key), []).append(i)
    out = []
    for key in sorted(groups, key=lambda k: -len(groups[k])):
        idx = groups[key]
        out += [idx[j : j + batch_size] for j in range(0, len(idx), batch_size)]
    return out


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


def resolve_batch_size(cfg: ServeConfig, run: Callable[[int], None], device: torch.device, items: int) -> int:
    """``cfg.batch_size``, or for 'auto' the largest that fits (``run(b)`` computes one trial batch of b)."""
    if cfg.batch_size == "auto":
        return auto_batch_size(run, device, max(1, min(cfg.max_batch_size, items)))
    return int(cfg.batch_size)
