"""What the benchmark scripts share and the zturbo package does not need.

The scripts import zturbo as installed (``pip install -e .``) and this module by its
plain name: Python puts a script's own folder first on ``sys.path``.
"""

from __future__ import annotations

from collections.abc import Callable

import tomllib
import torch

from zturbo.model import ModelConfig

PARTS = ("decode", "encode")


def model_input(
    config: ModelConfig,
    part: str,
    resolution: int,
    batch: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> torch.Tensor:
    """A seeded random input for one pass: images in [-1, 1] to encode, or latents to decode
    into ``resolution`` x ``resolution`` images."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    generator = torch.Generator().manual_seed(seed)
    if part == "encode":
        x = torch.rand(batch, config.in_channels, resolution, resolution, generator=generator) * 2 - 1
    else:
        side = resolution // config.downsample_factor
        x = torch.randn(batch, config.latent_channels, side, side, generator=generator)
    return x.to(device=device, dtype=dtype)


def profiler_us(event, field: str) -> float:
    """A torch.profiler time in microseconds; newer torch names device times 'device', older 'cuda'."""
    for name in (field, field.replace("device", "cuda")):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def is_cuda_event(event) -> bool:
    return str(getattr(event, "device_type", "")).endswith("CUDA")


def profile_calls(fn: Callable[[], object], steps: int, cuda: bool):
    """A torch.profiler trace of ``steps`` calls of ``fn`` (CPU operators, and CUDA kernels on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    return prof


def summarise_profile(prof, steps: int, top: int, cuda: bool, kind: Callable[[str], str] | None = None) -> dict:
    """Per call of the profiled function: the total self time of its CUDA kernels (CPU operators on a CPU),
    the ``top`` of them by self time with their share and, with ``kind`` (a name -> kind function), the
    time summed by kind."""
    if cuda:
        timed = [(e.key, e.count, profiler_us(e, "self_device_time_total")) for e in prof.key_averages() if is_cuda_event(e)]
    else:
        timed = [(e.key, e.count, float(e.self_cpu_time_total)) for e in prof.key_averages()]
    timed = sorted((t for t in timed if t[2] > 0), key=lambda t: -t[2])
    total = sum(us for _, _, us in timed) or 1.0
    summary: dict = {
        "ms_per_call": total / 1000 / steps,
        "top": [{"name": name, "calls": calls // steps, "ms": us / 1000 / steps, "share": us / total}
                for name, calls, us in timed[:top]],
    }
    if kind is not None:
        kinds: dict[str, float] = {}
        for name, _, us in timed:
            kinds[kind(name)] = kinds.get(kind(name), 0.0) + us
        summary["kinds"] = {k: {"ms": us / 1000 / steps, "share": us / total}
                            for k, us in sorted(kinds.items(), key=lambda kv: -kv[1])}
        for row in summary["top"]:
            row["kind"] = kind(row["name"])
    return summary


def parse_set(items: list[str]) -> dict:
    """``section.key=value`` pairs (values parsed as TOML: 4e-3, [32,64], true) into a nested mapping."""
    tree: dict = {}
    for item in items:
        key, _, raw = item.partition("=")
        section, _, name = key.partition(".")
        if not name or not raw:
            raise SystemExit(f"--set wants section.key=value, got {item!r}")
        tree.setdefault(section, {})[name] = tomllib.loads(f"v = {raw}")["v"]
    return tree
