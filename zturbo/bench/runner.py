"""Run a benchmark: every (backend, resolution, batch, encode/decode) case, subjects interleaved.

    >>> from zturbo.config import load_settings
    >>> from zturbo.bench import run_bench
    >>> report = run_bench(load_settings("fast", overrides={"bench": {"against": "standard"}}))

The returned report is a plain JSON-ready dict (see ``schema.json``).

About 480 lines in one module: the plan, the case loop and the comparisons all write the
one report that is saved after every case, so a killed run still leaves its results.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import functools
import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zturbo.backends import AUTO, check_backend
from zturbo.bench.cases import (
    SkipCase,
    Subject,
    against_subject,
    build_diffusers_model,
    build_engine,
    our_subject,
    skip_reason,
)
from zturbo.bench.flops import flops_per_image, measure_matmul_peak, module_flops
from zturbo.bench.timing import free_device_memory, measure_peak_memory, time_interleaved
from zturbo.bench.train_case import time_train_step
from zturbo.config import Settings
from zturbo.environment import collect_environment
from zturbo.errors import UsageError
from zturbo.utils import resolve_device, resolve_dtype

SCHEMA_ID = "zturbo-bench/1"

CPU_DEFAULTS = {"resolutions": [256, 512], "batch_sizes": [1, 4], "repeats": 3, "peak_matmul_size": 1024}
GPU_DEFAULTS = {"resolutions": [512, 1024], "batch_sizes": [1, 8, 24], "repeats": 10, "peak_matmul_size": 8192}


@dataclass
class BenchPlan:
    """BenchConfig with the device-dependent defaults filled in."""

    device: torch.device
    resolutions: list[int]
    batch_sizes: list[int]
    backends: list[str]
    precision: str
    what: list[str]
    repeats: int
    warmup: int
    channels_last: bool
    against: str | None
    peak_matmul_size: int
    tiling: dict[str, Any] = field(default_factory=dict)  # backend options for tiled passes; {}: whole images
    peak_dtype: str = field(init=False)

    def __post_init__(self) -> None:
        # On GPU the denominator is the tensor cores' bf16 rate; a CPU has no such unit, fp32 is its peak.
        self.peak_dtype = "bf16" if self.device.type == "cuda" else "fp32"

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": str(self.device), "resolutions": self.resolutions, "batch_sizes": self.batch_sizes,
            "backends": self.backends, "precision": self.precision, "what": self.what, "repeats": self.repeats,
            "warmup": self.warmup, "channels_last": self.channels_last, "against": self.against,
            "peak_matmul_size": self.peak_matmul_size, "tiling": self.tiling,
        }


def make_plan(settings: Settings, auto_backend: str = "torch") -> BenchPlan:
    """The cases to run; ``auto_backend`` is what the backend ``auto`` means for the subject timed."""
    cfg = settings.bench
    device = resolve_device(cfg.device)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for name, values in (("resolutions", cfg.resolutions), ("batch sizes", cfg.batch_sizes)):
        if values is not None and (not values or any(v < 1 for v in values)):
            raise UsageError(f"bench {name} must be positive integers, got {values}")
    return BenchPlan(
        device=device,
        resolutions=list(cfg.resolutions or defaults["resolutions"]),
        batch_sizes=list(cfg.batch_sizes or defaults["batch_sizes"]),
        backends=list(dict.fromkeys(auto_backend if b == AUTO else b for b in cfg.backends)),
        precision=cfg.precision,
        what=list(dict.fromkeys(cfg.what)),
        repeats=cfg.repeats or defaults["repeats"],
        warmup=cfg.warmup,
        channels_last=cfg.channels_last,
        against=cfg.against,
        peak_matmul_size=cfg.peak_matmul_size or defaults["peak_matmul_size"],
        tiling=cfg.tile_options(),
    )


def case_key(subject: str, what: str, backend: str, precision: str, channels_last: bool, resolution: int,
             batch: int) -> str:
    """Stable identity of a case across runs (what the baseline gate matches on)."""
    layout = "-cl" if channels_last else ""
    return f"{subject}/{what}/{backend}/{precision}{layout}/{resolution}/b{batch}"


Logger = Callable[[str], None]


def run_bench(
    settings: Settings,
    *,
    profile_name: str | None = None,
    model_path: Path | None = None,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    log: Logger | None = None,
) -> dict[str, Any]:
    """Benchmark ``settings.model`` (or the model at ``model_path``) as ``settings.bench`` asks.

    ``on_update`` receives the report after every case (for partial results on disk);
    ``log`` receives one line per case.
    """
    say = log or (lambda _msg: None)
    if model_path is not None:
        name = Path(model_path).resolve().name or "model"
    else:
        name = profile_name or settings.profile or "model"
        name = Path(name).stem if Path(name).suffix else name
    ours = our_subject(settings.model, name, model_path)
    plan = make_plan(settings, ours.backend)
    if ours.artifact is not None:
        for backend in plan.backends:
            check_backend(ours.artifact, backend, "bench")
    subjects = [ours]
    if plan.against:
        subjects.append(against_subject(plan.against, ours))
    _check_resolutions(plan, subjects)

    report: dict[str, Any] = {
        "schema": SCHEMA_ID,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
        "environment": copy.deepcopy(_environment()),
        "plan": plan.to_dict(),
        "subjects": [s.describe() for s in subjects],
        "peak": None,
        "cases": [],
        "comparisons": [],
    }
    with _cudnn_autotuning():
        report["environment"]["torch_flags"] = _torch_flags()
        peak = measure_matmul_peak(plan.device, resolve_dtype(plan.peak_dtype), plan.peak_matmul_size)
        report["peak"] = peak.to_dict()
        say(f"matmul peak on {plan.device}: {peak.tflops:.2f} TFLOP/s ({peak.dtype}, {peak.size}^3)")
        flops = _FlopCache()

        def emit(case: dict[str, Any]) -> None:
            report["cases"].append(case)
            report["comparisons"] = compare(report["cases"])
            say(_case_line(case))
            if on_update is not None:
                on_update(report)

        inference = [w for w in plan.what if w in ("encode", "decode")]
        if inference:
            for backend in plan.backends:
                _run_backend(plan, backend, subjects, inference, flops, peak.tflops, emit)
        if "train" in plan.what:
            _run_train(plan, settings, ours, flops, peak.tflops, emit)

        # Measured again at the end, the better of the two is the peak: on a shared machine one
        # measurement can land in a busy spell and inflate every MFU.
        again = measure_matmul_peak(plan.device, resolve_dtype(plan.peak_dtype), plan.peak_matmul_size)
        best = max(peak, again, key=lambda p: p.tflops)
        report["peak"] = {**best.to_dict(), "measured_tflops": [peak.tflops, again.tflops]}
        for case in report["cases"]:
            if case["tflops"] is not None:
                case["mfu"] = case["tflops"] / best.tflops

    report["comparisons"] = compare(report["cases"])
    report["complete"] = True
    if on_update is not None:
        on_update(report)
    return report


@functools.lru_cache(maxsize=1)
def _environment() -> dict[str, Any]:
    """Versions, devices and commit; probed once per process (importing every optional backend is slow)."""
    return collect_environment()


@contextlib.contextmanager
def _cudnn_autotuning():
    """Let cuDNN pick the fastest kernels per shape, as a fixed-shape deployment would; warm-up absorbs the search."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _torch_flags() -> dict[str, Any]:
    return {
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "threads": torch.get_num_threads(),
    }


def _check_resolutions(plan: BenchPlan, subjects: list[Subject]) -> None:
    for subject in subjects:
        factor = subject.config.downsample_factor
        bad = [r for r in plan.resolutions if r % factor]
        if bad:
            raise UsageError(
                f"resolutions {bad} are not divisible by {factor}, the downsampling factor of '{subject.name}'",
                f"use multiples of {factor}",
            )


class _FlopCache:
    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], dict[str, int]] = {}

    def get(self, subject: Subject, resolution: int) -> dict[str, int]:
        key = (subject.name, resolution)
        if key not in self._cache:
            if subject.kind == "diffusers":
                self._cache[key] = _diffusers_flops(subject, resolution)
            else:
                self._cache[key] = flops_per_image(subject.config, resolution, subject.model.kernels)
        return self._cache[key]


def _diffusers_flops(subject: Subject, resolution: int) -> dict[str, int]:
    cfg = subject.config
    lat = resolution // cfg.downsample_factor
    build = lambda: build_diffusers_model(cfg)
    return {
        "encode": module_flops(build, lambda m, x: m.encode(x).latent_dist.mean, (1, cfg.in_channels, resolution,
                                                                                 resolution)),
        "decode": module_flops(build, lambda m, z: m.decode(z).sample, (1, cfg.latent_channels, lat, lat)),
    }


def _input_shape(subject: Subject, what: str, resolution: int, batch: int) -> tuple[int, ...]:
    cfg = subject.config
    if what == "encode":
        return (batch, cfg.in_channels, resolution, resolution)
    lat = resolution // cfg.downsample_factor
    return (batch, cfg.latent_channels, lat, lat)


def _inputs(subject: Subject, what: str, resolution: int, batch: int, device: torch.device, dtype: torch.dtype,
            cache: dict) -> torch.Tensor:
    """Random inputs (never zeros: they can run faster than real data), shared by subjects of one shape."""
    shape = _input_shape(subject, what, resolution, batch)
    if shape not in cache:
        gen = torch.Generator(device=device).manual_seed(resolution * 131 + batch)
        if what == "encode":
            x = torch.rand(shape, generator=gen, device=device, dtype=torch.float32) * 2 - 1
        else:
            x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        cache[shape] = x.to(dtype)
    return cache[shape]


def _run_backend(plan: BenchPlan, backend: str, subjects: list[Subject], whats: list[str], flops: _FlopCache,
                 peak_tflops: float, emit: Callable[[dict[str, Any]], None]) -> None:
    dtype = resolve_dtype(plan.precision)
    engines: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    for subject in subjects:
        try:
            engines[subject.name] = build_engine(subject, backend, plan.device, plan.precision, plan.channels_last,
                                                    plan.tiling)
        except SkipCase as exc:
            reasons[subject.name] = str(exc)
    try:
        for resolution in plan.resolutions:
            for batch in plan.batch_sizes:
                for what in whats:
                    _run_case(plan, backend, what, resolution, batch, subjects, engines, reasons, dtype, flops,
                              peak_tflops, emit)
    finally:
        engines.clear()
        free_device_memory(plan.device)


def _run_case(plan, backend, what, resolution, batch, subjects, engines, reasons, dtype, flops, peak_tflops, emit):
    base = {"what": what, "backend": backend, "precision": plan.precision, "channels_last": plan.channels_last,
            "resolution": resolution, "batch": batch}
    if plan.tiling:  # tiled passes are other cases than whole-image ones, also for the baseline gate
        base.update(tile=plan.tiling["tile"], tile_mode=plan.tiling["tile_mode"]
                    + ("-recompute" if plan.tiling.get("tile_recompute") else ""))
    cache: dict = {}
    runnable: list[tuple[Subject, Callable[[], object]]] = []
    results: dict[str, dict[str, Any]] = {}
    for subject in subjects:
        row = _row(subject, base)
        results[subject.name] = row
        if subject.name in reasons:
            row.update(status="skipped", reason=reasons[subject.name])
            continue
        engine = engines[subject.name]
        try:
            x = _inputs(subject, what, resolution, batch, plan.device, dtype, cache)
        except Exception as exc:  # noqa: BLE001 - an input that does not fit is a skipped case
            row["status"], row["reason"] = skip_reason(exc, batch)
            continue
        fn = (lambda e=engine, t=x: e.encode(t)) if what == "encode" else (lambda e=engine, t=x: e.decode(t))
        runnable.append((subject, fn))

    # Probe each subject alone first (compiles, catches unsupported precision/backends, OOM).
    ready = []
    for subject, fn in runnable:
        try:
            for _ in range(max(plan.warmup, 1)):
                fn()
            ready.append((subject, fn))
        except Exception as exc:  # noqa: BLE001 - listed as skipped/failed with its reason, never a crash
            row = results[subject.name]
            row["status"], row["reason"] = skip_reason(exc, batch)
            free_device_memory(plan.device)

    if ready:
        try:
            timings = time_interleaved([fn for _, fn in ready], plan.device, warmup=0, repeats=plan.repeats)
            for (subject, fn), timing in zip(ready, timings):
                row = results[subject.name]
                resident = _param_bytes(subject, dtype) + _tensor_bytes(cache, subject, what, resolution, batch)
                mem, kind = measure_peak_memory(fn, plan.device, resident)
                flops_img = flops.get(subject, resolution)[what]
                _fill(row, timing.samples_ms, timing.median_ms, timing.p90_ms, timing.min_ms, batch, flops_img,
                      peak_tflops, mem, kind)
        except Exception as exc:  # noqa: BLE001
            status, reason = skip_reason(exc, batch)
            for subject, _ in ready:
                if results[subject.name]["status"] == "pending":
                    results[subject.name].update(status=status, reason=reason)
            free_device_memory(plan.device)
    del cache
    for subject in subjects:
        emit(results[subject.name])


def _param_bytes(subject: Subject, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in subject.model.parameters()) * torch.empty((), dtype=dtype).element_size()


def _tensor_bytes(cache: dict, subject: Subject, what: str, resolution: int, batch: int) -> int:
    x = cache.get(_input_shape(subject, what, resolution, batch))
    return 0 if x is None else x.numel() * x.element_size()


def _row(subject: Subject, base: dict[str, Any]) -> dict[str, Any]:
    row = {
        "key": case_key(subject.name, base["what"], base["backend"], base["precision"], base["channels_last"],
                        base["resolution"], base["batch"])
        + (f"/tile{base['tile']}-{base['tile_mode']}" if "tile" in base else ""),
        "subject": subject.name,
        "role": subject.role,
        **base,
        "status": "pending",
        "reason": None,
    }
    for name in ("median_ms", "p90_ms", "min_ms", "images_per_s", "peak_memory_mb", "memory_kind",
                 "flops_per_image", "tflops", "mfu", "samples_ms"):
        row[name] = None
    return row


def _fill(row, samples, median_ms, p90_ms, min_ms, batch, flops_img, peak_tflops, mem_bytes, mem_kind) -> None:
    seconds = median_ms / 1000.0
    tflops = flops_img * batch / seconds / 1e12 if seconds > 0 else None
    row.update(
        status="ok",
        median_ms=median_ms,
        p90_ms=p90_ms,
        min_ms=min_ms,
        samples_ms=[round(s, 4) for s in samples],
        images_per_s=batch / seconds if seconds > 0 else None,
        peak_memory_mb=mem_bytes / 2**20,
        memory_kind=mem_kind,
        flops_per_image=int(flops_img),
        tflops=tflops,
        mfu=tflops / peak_tflops if tflops is not None and peak_tflops > 0 else None,
    )


# ---------------------------------------------------------------------------------------------------------
# Train case


def _run_train(plan, settings, ours: Subject, flops: _FlopCache, peak_tflops: float, emit) -> None:
    batch = settings.train.batch_size
    for resolution in plan.resolutions:
        base = {"what": "train", "backend": "torch", "precision": plan.precision, "channels_last": False,
                "resolution": resolution, "batch": batch}
        row = _row(ours, base)
        try:
            measured = time_train_step(settings, ours, plan.device, resolution, plan.precision, plan.warmup,
                                       plan.repeats)
            _fill(row, measured.samples_ms, measured.median_ms, measured.p90_ms, measured.min_ms, batch,
                  flops.get(ours, resolution)["train"], peak_tflops, measured.peak_memory, measured.memory_kind)
            row["micro_batch"] = measured.micro_batch
        except Exception as exc:  # noqa: BLE001 - listed with its reason, never a crash
            row["status"], row["reason"] = skip_reason(exc, batch)
        finally:
            gc.collect()
            free_device_memory(plan.device)
        emit(row)


# ---------------------------------------------------------------------------------------------------------
# Comparisons


def compare(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours vs the comparison subject per (what, backend, precision, layout, resolution, batch).

    ``speedup`` = their median / ours; ``flop_ratio`` = their FLOPs / ours (the speedup the
    arithmetic predicts); ``efficiency`` = speedup / flop_ratio. An ``encode+decode`` row sums
    both medians and both FLOP counts where both were measured.
    """
    def group(c):
        return (c["backend"], c["precision"], c["channels_last"], c["resolution"], c["batch"])

    ok = [c for c in cases if c["status"] == "ok"]
    ours = {(c["what"], *group(c)): c for c in ok if c["role"] == "ours"}
    theirs = {(c["what"], *group(c)): c for c in ok if c["role"] == "against"}
    out = []
    for key, mine in ours.items():
        other = theirs.get(key)
        if other is not None:
            out.append(_comparison(key[0], mine, other, mine["median_ms"], other["median_ms"],
                                   mine["flops_per_image"], other["flops_per_image"]))
    for key in {k[1:] for k in ours}:
        parts = [(ours.get((w, *key)), theirs.get((w, *key))) for w in ("encode", "decode")]
        if all(a is not None and b is not None for a, b in parts):
            (e_mine, e_other), (d_mine, d_other) = parts
            out.append(_comparison(
                "encode+decode", e_mine, e_other,
                e_mine["median_ms"] + d_mine["median_ms"], e_other["median_ms"] + d_other["median_ms"],
                e_mine["flops_per_image"] + d_mine["flops_per_image"],
                e_other["flops_per_image"] + d_other["flops_per_image"],
            ))
    order = {"encode": 0, "decode": 1, "encode+decode": 2, "train": 3}
    out.sort(key=lambda r: (r["backend"], r["resolution"], r["batch"], order.get(r["what"], 9)))
    return out


def _comparison(what, mine, other, mine_ms, other_ms, mine_flops, other_flops) -> dict[str, Any]:
    speedup = other_ms / mine_ms
    flop_ratio = other_flops / mine_flops if mine_flops else None
    return {
        "what": what, "backend": mine["backend"], "precision": mine["precision"],
        "channels_last": mine["channels_last"], "resolution": mine["resolution"], "batch": mine["batch"],
        "ours": mine["subject"], "against": other["subject"],
        "ours_ms": mine_ms, "against_ms": other_ms,
        "speedup": speedup,
        "flop_ratio": flop_ratio,
        "efficiency": speedup / flop_ratio if flop_ratio else None,
    }


def _case_line(case: dict[str, Any]) -> str:
    head = (f"{case['subject']} {case['what']} {case['backend']} {case['precision']}"
            f"{' channels_last' if case['channels_last'] else ''} {case['resolution']}px b{case['batch']}")
    if case["status"] != "ok":
        return f"{head}: {case['status']} ({case['reason']})"
    mfu = f", MFU {case['mfu'] * 100:.1f}% (provisional)" if case.get("mfu") is not None else ""
    return f"{head}: {case['median_ms']:.2f} ms median, {case['images_per_s']:.2f} img/s{mfu}"
