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

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from zturbo.artifacts import ALL_KINDS, require
from zturbo.backends import Backend, open_backend
from zturbo.config import EvalConfig
from zturbo.errors import CheckpointError, InputError, ZTurboError
from zturbo.eval.data import ImageBatch, ImageSet, find_images, iter_batches
from zturbo.eval.metrics import MS_SSIM_MIN_SIDE, MetricSuite
from zturbo.eval.sheet import SheetCollector
from zturbo.eval.summary import compare_summaries, summarize
from zturbo.utils import resolve_device

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


def reconstruct(model: EvaluatedModel, pixels: torch.Tensor, *, timed: bool = True,
                first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, 3, H, W) -> reconstruction as uint8 on the backend's device (clamped, rounded, cropped back),
    and per image whether the decoder's output was all finite (clamping hides a NaN as a black pixel)."""
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
    finite = torch.isfinite(images).flatten(1).all(1)
    return ((images.clamp(-1, 1) + 1.0) * 127.5).round_().to(torch.uint8), finite


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
    An image whose reconstruction holds NaN or inf is listed in ``report.data["failed"]``
    and left out of every metric, for both models.
    """
    config = config or EvalConfig()
    wall_start = time.perf_counter()
    images = find_images(data_dir, config.max_images, config.image_column)
    device = resolve_device(config.device)
    models = _open_models(checkpoint, compare, config, device)
    if metric_suite is None:
        suite = MetricSuite(config.metrics, device, lpips_nets=list(dict.fromkeys(config.lpips_nets)),
                            lpips_random_backbone=lpips_random_backbone, allow_download=allow_download,
                            fid_feature=fid_feature, inception_weights=config.inception_weights,
                            missing_weights=missing_weights)
    else:
        suite = metric_suite
        suite.reset()
    if not suite.per_image_names and not suite.dataset_names:
        raise ZTurboError(
            "none of the requested metrics can run here: " + "; ".join(suite.unavailable.values()),
            "add psnr or ssim to --metrics, or provide the missing network weights",
        )
    if on_start is not None:
        on_start(len(images.paths))
    done = _run_images(images, models, suite, config, on_batch)
    if not done.rows:
        raise _nothing_evaluated(images, done, data_dir, config)
    return _build_report(config, data_dir, images, models, suite, done, time.perf_counter() - wall_start)


@dataclass
class _Evaluated:
    """What the pass over the images produced."""

    rows: list[dict[str, Any]]  # one per image evaluated: its size and each model's metric values
    failed: list[dict[str, Any]]  # images whose reconstruction was not finite: name, reason, detail
    sheet: SheetCollector
    rank_metric: str | None
    load_s: float = 0.0


def _open_models(checkpoint: Any, compare: Any, config: EvalConfig, device: torch.device) -> list[EvaluatedModel]:
    models = [open_model("model", checkpoint, config, device)]
    if compare is not None:
        models.append(open_model("other", compare, config, device))
    if len(models) == 2 and models[0].name == models[1].name:
        models[0].name, models[1].name = f"{models[0].name} (model)", f"{models[1].name} (other)"
    return models


def _run_images(images: ImageSet, models: list[EvaluatedModel], suite: MetricSuite, config: EvalConfig,
                on_batch: Callable[[int, int], None] | None) -> _Evaluated:
    """Reconstruct every batch with every model (alternating which goes first) and score the finite ones."""
    rank_metric = next((m for m in _RANK_PREFERENCE if m in suite.per_image_names), None)
    done = _Evaluated([], [], SheetCollector(config.sheet_images, rank_metric, [m.key for m in models]), rank_metric)
    batches = iter_batches(images, config.size, config.batch_size, config.max_pixels)
    for index, batch in enumerate(_timed(batches, done)):
        if index == 0:
            # Warm-up on one image: one-time allocations and kernel selection stay out of the timing.
            for model in models:
                reconstruct(model, batch.pixels[:1], timed=False, first=True)
        _score_batch(batch, models if index % 2 == 0 else models[::-1], models, suite, done)
        if on_batch is not None:
            on_batch(len(done.rows) + len(done.failed) + len(images.skipped), len(images.paths))
    return done


def _timed(batches: Iterator[ImageBatch], done: _Evaluated) -> Iterator[ImageBatch]:
    """``batches``, adding the time spent reading them to ``done.load_s``."""
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        done.load_s += time.perf_counter() - t0
        if batch is None:
            return
        yield batch


def _score_batch(batch: ImageBatch, order: list[EvaluatedModel], models: list[EvaluatedModel],
                 suite: MetricSuite, done: _Evaluated) -> None:
    """Reconstruct one batch; images every model reconstructed finitely get rows, the others a failure."""
    outputs = {m.key: reconstruct(m, batch.pixels) for m in order}
    finite = {m.key: outputs[m.key][1].cpu() for m in models}
    keep = torch.stack(list(finite.values())).all(0)
    for i in (~keep).nonzero().flatten().tolist():
        culprits = ", ".join(m.name for m in models if not finite[m.key][i])
        done.failed.append({"name": batch.names[i], "reason": "non-finite",
                            "detail": f"the reconstruction by {culprits} holds NaN or infinite values"})
    if not keep.any():
        return
    rows = keep.nonzero().flatten()
    pixels = batch.pixels[rows]
    recons = {k: r[rows.to(r.device)] for k, (r, _) in outputs.items()}
    values = {m.key: suite.update(m.key, recons[m.key], pixels) for m in models}
    for j, i in enumerate(rows.tolist()):
        name = batch.names[i]
        row = {"name": name, "width": int(pixels.shape[-1]), "height": int(pixels.shape[-2]),
               "source_width": batch.original_sizes[i][0], "source_height": batch.original_sizes[i][1]}
        for m in models:
            row[m.key] = {k: float(v[j]) for k, v in values[m.key].items()}
        done.rows.append(row)
        if done.rank_metric is not None:
            done.sheet.offer(name, values["model"][done.rank_metric][j].item(), pixels[j],
                             {k: r[j] for k, r in recons.items()})


def _summaries(models: list[EvaluatedModel], suite: MetricSuite, rows: list[dict], worst: int):
    """Per model: each per-image metric's statistics, and the dataset-level metrics (rFID)."""
    summary: dict[str, dict[str, Any]] = {}
    dataset: dict[str, dict[str, float]] = {}
    names = [r["name"] for r in rows]
    for m in models:
        summary[m.key] = {}
        for metric in suite.per_image_names:
            stats = summarize([r[m.key].get(metric) for r in rows], names, metric, worst)
            if stats is not None:
                summary[m.key][metric] = stats
        dataset[m.key] = suite.dataset_metrics(m.key)
    return summary, dataset


def _notes(suite: MetricSuite, summary: dict, evaluated: int) -> list[str]:
    notes = [f"{metric}: no image large enough (MS-SSIM needs sides of at least {MS_SSIM_MIN_SIDE} px)"
             for metric in suite.per_image_names if metric not in summary["model"]]
    if suite.lpips_random:
        notes.append("LPIPS used a random backbone (plumbing test): its values are not a quality figure")
    if suite.fid_random:
        notes.append("rFID used a custom feature network: its value is not comparable to published FID")
    elif suite.dataset_names and evaluated < 2048:
        notes.append(f"rFID on {evaluated} images is biased upwards; published rFID uses 50k images")
    return notes


def _build_report(config: EvalConfig, data_dir: str | Path, images: ImageSet, models: list[EvaluatedModel],
                  suite: MetricSuite, done: _Evaluated, wall_s: float) -> EvalReport:
    summary, dataset = _summaries(models, suite, done.rows, config.worst_images)
    described = {m.key: m.describe() for m in models}
    timing = {
        "wall_s": wall_s,
        "images_per_s": len(done.rows) / wall_s,
        "load_s": done.load_s,
        "reconstruct_s": {m.key: m.encode_s + m.decode_s for m in models},
        "metrics_s": dict(suite.seconds),
        "note": "reconstruct_s excludes the warm-up batch; metrics_s sums over all models",
    }
    data = {
        "dir": str(data_dir),
        "size": config.size,
        "found": len(images.paths),
        "evaluated": len(done.rows),
        "skipped": [s.__dict__ for s in images.skipped],
        "failed": done.failed,
    }
    report = EvalReport(
        config=config.model_dump(mode="json"), models=described, data=data,
        metrics=suite.per_image_names + suite.dataset_names, rank_metric=done.rank_metric, per_image=done.rows,
        summary=summary, dataset_metrics=dataset, unavailable=dict(suite.unavailable), timing=timing,
        notes=_notes(suite, summary, len(done.rows)), sheet=done.sheet,
    )
    if len(models) == 2:
        report.compare = compare_summaries(summary, described, dataset, done.rows)
    return report


def _nothing_evaluated(images: ImageSet, done: _Evaluated, data_dir, config: EvalConfig) -> ZTurboError:
    if done.failed:
        hint = "fp16 overflows in this model: use --precision bf16 or fp32" if config.precision == "fp16" else (
            "the model's weights may be damaged; check it with fp32 on a few images")
        return ZTurboError(f"every reconstruction of the {len(done.failed)} readable images in {data_dir} holds "
                           f"NaN or infinite values ({done.failed[0]['detail']})", hint)
    return _no_readable(images, data_dir)


def _no_readable(images, data_dir) -> InputError:
    reasons = ", ".join(sorted({s.reason for s in images.skipped}))
    return InputError(
        f"none of the {len(images.paths)} images in {data_dir} could be read ({reasons})",
        "eval reads PNG, JPEG, WebP, BMP, TIFF and GIF files; check the files are not truncated",
    )
