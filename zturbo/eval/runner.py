"""Run one model, or two side by side, over a folder of images and collect every metric.

    >>> from zturbo.config import EvalConfig
    >>> from zturbo.eval import evaluate
    >>> report = evaluate("runs/demo", "photos/", EvalConfig(size="native", metrics=["psnr", "ssim"]))
    >>> report.summary["model"]["psnr"]["mean"]

With ``compare=OTHER`` both models reconstruct the same batches, in alternating
order so neither always runs on a warmer cache, and the report holds each
metric side by side with the ratio, plus the speed ratio from the same run.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from zturbo.artifacts import ALL_KINDS, require
from zturbo.backends import Backend, open_backend
from zturbo.config import EvalConfig
from zturbo.errors import CheckpointError, InputError, ZTurboError
from zturbo.eval.data import ImageBatch, find_images, iter_batches
from zturbo.eval.metrics import MS_SSIM_MIN_SIDE, MetricSuite, higher_is_better
from zturbo.eval.sheet import SheetCollector
from zturbo.utils import resolve_device

MODEL_KEYS = ("model", "other")
_RANK_PREFERENCE = (
    "psnr", "ssim", "lpips_alex", "lpips_vgg", "lpips_alex_random", "lpips_vgg_random", "chroma_outlier"
)


@dataclass
class EvaluatedModel:
    """A backend under evaluation and the time it spent reconstructing."""

    key: str
    name: str
    source: str
    backend: Backend
    encode_s: float = 0.0
    decode_s: float = 0.0
    images: int = 0

    def describe(self) -> dict[str, Any]:
        images_per_s = self.images / (self.encode_s + self.decode_s) if self.images else None
        return {
            "name": self.name,
            "source": self.source,
            **self.backend.describe(),
            "latent_channels": self.backend.latent_channels,
            "downsample_factor": self.backend.downsample_factor,
            "images_timed": self.images,
            "encode_s": round(self.encode_s, 4),
            "decode_s": round(self.decode_s, 4),
            "images_per_s": images_per_s,
        }


@dataclass
class EvalReport:
    """Everything an evaluation produced; ``to_dict()`` is the --json / summary.json object."""

    config: dict[str, Any]
    models: dict[str, dict[str, Any]]
    data: dict[str, Any]
    metrics: list[str]
    rank_metric: str | None
    per_image: list[dict[str, Any]]
    summary: dict[str, dict[str, Any]]
    dataset_metrics: dict[str, dict[str, float]]
    unavailable: dict[str, str]
    timing: dict[str, Any]
    compare: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    sheet: SheetCollector | None = None

    def to_dict(self, per_image: bool = True) -> dict[str, Any]:
        out = {
            "config": self.config,
            "models": self.models,
            "data": self.data,
            "metrics": self.metrics,
            "rank_metric": self.rank_metric,
            "summary": self.summary,
            "dataset_metrics": self.dataset_metrics,
            "compare": self.compare,
            "unavailable": self.unavailable,
            "timing": self.timing,
            "notes": self.notes,
        }
        if per_image:
            out["per_image"] = self.per_image
        return out


# ---------------------------------------------------------------------------------------------------------
# Models


def open_model(key: str, model: Any, config: EvalConfig, device: torch.device) -> EvaluatedModel:
    """An EvaluatedModel from a path (any artifact: its kind picks the backend), a VAE or a Backend."""
    if isinstance(model, Backend):
        return EvaluatedModel(key, type(model).__name__, "<backend>", model)
    if not isinstance(model, (str, Path)):
        backend = open_backend(model, config.backend, job="eval", device=device, precision=config.precision,
                               **config.tile_options())
        return EvaluatedModel(key, type(model).__name__, "<in-memory>", backend)
    artifact = require(model, ALL_KINDS, "eval")
    backend = open_backend(artifact, config.backend, job="eval", device=device, precision=config.precision,
                           **config.tile_options())
    label = artifact.root.resolve().name or str(model)
    return EvaluatedModel(key, label, str(model), backend)


def _to_model_input(pixels: torch.Tensor, factor: int, device: torch.device) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> [-1, 1] float, padded on the right and bottom to a multiple of ``factor``."""
    x = pixels.to(device).float().div_(127.5).sub_(1.0)
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % factor, (-w) % factor
    if pad_h or pad_w:
        # Reflection continues the image's content, so the border the crop removes biases the decoder least.
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x


def reconstruct(model: EvaluatedModel, pixels: torch.Tensor, *, timed: bool = True, first: bool = False):
    """uint8 (B, 3, H, W) -> reconstruction as uint8 on the backend's device (clamped, rounded, cropped back)."""
    backend = model.backend
    h, w = pixels.shape[-2:]
    x = _to_model_input(pixels, backend.downsample_factor, backend.device)
    backend.synchronize()
    t0 = time.perf_counter()
    latents = backend.encode(x)
    backend.synchronize()
    t1 = time.perf_counter()
    if latents.shape[1] != backend.latent_channels:
        raise CheckpointError(
            f"{model.name}: the encoder gives {latents.shape[1]} latent channels but the decoder expects "
            f"{backend.latent_channels}",
            "the encoder and decoder come from different models; export both from the same checkpoint",
        )
    try:
        images = backend.decode(latents)
    except ZTurboError:
        raise
    except Exception as exc:  # onnxruntime and TensorRT raise their own exception types
        if not first or isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
            raise
        # The first decode is where a decoder that does not fit the encoder's latents shows itself.
        raise CheckpointError(
            f"{model.name}: the decoder rejected latents of shape {tuple(latents.shape)}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
            "check that the decoder's latent channels match the encoder's (export both from one checkpoint)",
        ) from exc
    backend.synchronize()
    t2 = time.perf_counter()
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2] < h or images.shape[-1] < w:
        raise CheckpointError(
            f"{model.name}: decoded shape {tuple(images.shape)} does not match the input {tuple(x.shape)}",
            "eval needs a 3-channel image VAE whose decoder upsamples by its encoder's downsampling factor",
        )
    if timed:
        model.encode_s += t1 - t0
        model.decode_s += t2 - t1
        model.images += pixels.shape[0]
    images = images[..., :h, :w].float()
    return ((images.clamp(-1, 1) + 1.0) * 127.5).round_().to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------
# Statistics


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def summarize(values: list[float], names: list[str], metric: str, worst: int) -> dict[str, Any] | None:
    """Mean, median, std, range and the worst images of one metric.

    PSNR of an exact reconstruction is +inf: such images are counted as
    ``identical``, kept in the median (they sort above every finite value) and
    left out of the mean, which would otherwise be inf for the whole set.
    """
    valid = [(v, n) for v, n in zip(values, names) if v is not None and not math.isnan(v)]
    if not valid:
        return None
    finite = _finite([v for v, _ in valid])
    up = higher_is_better(metric)
    ordered = sorted(valid, key=lambda vn: vn[0], reverse=not up)  # worst first
    out = {
        "count": len(valid),
        "mean": statistics.fmean(finite) if finite else math.inf,
        "median": statistics.median(v for v, _ in valid),
        "std": statistics.pstdev(finite) if len(finite) > 1 else 0.0,
        "worst_value": ordered[0][0],
        "best_value": ordered[-1][0],
        "identical": sum(1 for v, _ in valid if math.isinf(v)),
        "worst": [{"name": n, "value": v} for v, n in ordered[:worst]],
    }
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return a / b


def compare_summaries(
    report_summary: dict, models: dict, dataset: dict, per_image: list[dict]
) -> dict[str, Any]:
    """Each metric's mean for both models, model / other, and how often the model wins image by image."""
    metrics: dict[str, Any] = {}
    ours, theirs = report_summary.get("model", {}), report_summary.get("other", {})
    for metric in ours:
        if metric not in theirs:
            continue
        a, b = ours[metric]["mean"], theirs[metric]["mean"]
        up = higher_is_better(metric)
        wins = ties = counted = 0
        for row in per_image:
            va, vb = row["model"].get(metric), row["other"].get(metric)
            if va is None or vb is None or math.isnan(va) or math.isnan(vb):
                continue
            counted += 1
            if va == vb:
                ties += 1
            elif (va > vb) == up:
                wins += 1
        metrics[metric] = {
            "model": a,
            "other": b,
            "ratio": _ratio(a, b),
            "difference": a - b if math.isfinite(a) and math.isfinite(b) else None,
            "higher_is_better": up,
            "model_better_images": wins,
            "tied_images": ties,
            "images": counted,
        }
    for metric in dataset.get("model", {}):
        if metric in dataset.get("other", {}):
            a, b = dataset["model"][metric], dataset["other"][metric]
            metrics[metric] = {
                "model": a,
                "other": b,
                "ratio": _ratio(a, b),
                "difference": a - b,
                "higher_is_better": higher_is_better(metric),
            }
    speed_a, speed_b = models["model"]["images_per_s"], models["other"]["images_per_s"]
    return {
        "metrics": metrics,
        "speed": {
            "model_images_per_s": speed_a,
            "other_images_per_s": speed_b,
            "ratio": _ratio(speed_a, speed_b),
            "what": "encode + decode throughput on the same batches, interleaved, after one warm-up batch each",
        },
    }


# ---------------------------------------------------------------------------------------------------------
# The evaluation


def evaluate(
    checkpoint: Any,
    data_dir: str | Path,
    config: EvalConfig | None = None,
    *,
    compare: Any = None,
    missing_weights: Literal["error", "skip"] = "error",
    allow_download: bool = True,
    lpips_random_backbone: bool = False,
    fid_feature: torch.nn.Module | None = None,
    metric_suite: MetricSuite | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> EvalReport:
    """Evaluate ``checkpoint`` (and ``compare``, if given) on the images under ``data_dir``.

    ``missing_weights='skip'`` drops LPIPS or rFID with a note when their network
    weights are absent, instead of failing. ``lpips_random_backbone`` and
    ``fid_feature`` exist to test the plumbing; their values are named
    ``*_random`` and are no quality figure. ``metric_suite`` reuses loaded metric
    networks across calls (it then replaces ``config.metrics`` and the options above).
    """
    config = config or EvalConfig()
    wall_start = time.perf_counter()
    images = find_images(data_dir, config.max_images)
    device = resolve_device(config.device)
    models = [open_model("model", checkpoint, config, device)]
    if compare is not None:
        models.append(open_model("other", compare, config, device))
    if len(models) == 2 and models[0].name == models[1].name:
        models[0].name, models[1].name = f"{models[0].name} (model)", f"{models[1].name} (other)"
    if metric_suite is not None:
        suite = metric_suite
        suite.reset()
    else:
        suite = MetricSuite(
            config.metrics,
            device,
            lpips_nets=list(dict.fromkeys(config.lpips_nets)),
            lpips_random_backbone=lpips_random_backbone,
            allow_download=allow_download,
            fid_feature=fid_feature,
            inception_weights=config.inception_weights,
            missing_weights=missing_weights,
        )
    names = suite.per_image_names
    if not names and not suite.dataset_names:
        raise ZTurboError(
            "none of the requested metrics can run here: " + "; ".join(suite.unavailable.values()),
            "add psnr or ssim to --metrics, or provide the missing network weights",
        )
    rank_metric = next((m for m in _RANK_PREFERENCE if m in names), None)
    sheet = SheetCollector(config.sheet_images, rank_metric, [m.key for m in models])
    if on_start is not None:
        on_start(len(images.paths))

    rows: list[dict[str, Any]] = []
    load_s = 0.0
    batches = iter_batches(images, config.size, config.batch_size, config.max_pixels)
    index = 0
    while True:
        t0 = time.perf_counter()
        batch: ImageBatch | None = next(batches, None)
        load_s += time.perf_counter() - t0
        if batch is None:
            break
        if index == 0:
            # Warm-up on one image: one-time allocations and kernel selection stay out of the timing.
            for model in models:
                reconstruct(model, batch.pixels[:1], timed=False, first=True)
        order = models if index % 2 == 0 else models[::-1]
        recons = {m.key: reconstruct(m, batch.pixels) for m in order}
        values = {m.key: suite.update(m.key, recons[m.key], batch.pixels) for m in models}
        for i, name in enumerate(batch.names):
            row = {
                "name": name,
                "width": int(batch.pixels.shape[-1]),
                "height": int(batch.pixels.shape[-2]),
                "source_width": batch.original_sizes[i][0],
                "source_height": batch.original_sizes[i][1],
            }
            for m in models:
                row[m.key] = {k: float(v[i]) for k, v in values[m.key].items()}
            rows.append(row)
            if rank_metric is not None:
                sheet.offer(
                    name,
                    values["model"][rank_metric][i].item(),
                    batch.pixels[i],
                    {k: r[i] for k, r in recons.items()},
                )
        index += 1
        if on_batch is not None:
            on_batch(len(rows) + len(images.skipped), len(images.paths))

    if not rows:
        raise _no_readable(images, data_dir)

    summary: dict[str, dict[str, Any]] = {}
    dataset: dict[str, dict[str, float]] = {}
    row_names = [r["name"] for r in rows]
    for m in models:
        summary[m.key] = {}
        for metric in names:
            stats = summarize([r[m.key].get(metric) for r in rows], row_names, metric, config.worst_images)
            if stats is not None:
                summary[m.key][metric] = stats
        dataset[m.key] = suite.dataset_metrics(m.key)

    notes: list[str] = []
    for metric in names:
        if metric not in summary["model"]:
            notes.append(
                f"{metric}: no image large enough (MS-SSIM needs sides of at least {MS_SSIM_MIN_SIDE} px)"
            )
    if suite.lpips_random:
        notes.append("LPIPS used a random backbone (plumbing test): its values are not a quality figure")
    if suite.fid_random:
        notes.append("rFID used a custom feature network: its value is not comparable to published FID")
    elif suite.dataset_names and len(rows) < 2048:
        notes.append(f"rFID on {len(rows)} images is biased upwards; published rFID uses 50k images")

    described = {m.key: m.describe() for m in models}
    wall_s = time.perf_counter() - wall_start
    timing = {
        "wall_s": wall_s,
        "images_per_s": len(rows) / wall_s,
        "load_s": load_s,
        "reconstruct_s": {m.key: m.encode_s + m.decode_s for m in models},
        "metrics_s": dict(suite.seconds),
        "note": "reconstruct_s excludes the warm-up batch; metrics_s sums over all models",
    }
    report = EvalReport(
        config=config.model_dump(mode="json"),
        models=described,
        data={
            "dir": str(data_dir),
            "size": config.size,
            "found": len(images.paths),
            "evaluated": len(rows),
            "skipped": [s.__dict__ for s in images.skipped],
        },
        metrics=names + suite.dataset_names,
        rank_metric=rank_metric,
        per_image=rows,
        summary=summary,
        dataset_metrics=dataset,
        unavailable=dict(suite.unavailable),
        timing=timing,
        notes=notes,
        sheet=sheet,
    )
    if len(models) == 2:
        report.compare = compare_summaries(summary, described, dataset, rows)
    return report


def _no_readable(images, data_dir) -> InputError:
    reasons = ", ".join(sorted({s.reason for s in images.skipped}))
    return InputError(
        f"none of the {len(images.paths)} images in {data_dir} could be read ({reasons})",
        "eval reads PNG, JPEG, WebP, BMP, TIFF and GIF files; check the files are not truncated",
    )
