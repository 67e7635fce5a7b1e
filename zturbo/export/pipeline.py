"""Writing an export folder from a model folder, crash-safe.

Everything is written into a staging folder inside OUT first; only when every
graph (and engine) is written, checked and, with ``verify``, verified, are the
files moved into place, the metadata last. An interrupted or failed export
leaves OUT as it was, or (interrupted while moving) without metadata, which
backends refuse as incomplete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zturbo.config import ExportConfig
from zturbo.errors import ConfigError, UsageError
from zturbo.export import layout
from zturbo.export.diffusers_format import check_diffusers_class, export_diffusers
from zturbo.export.fp16 import activation_ranges, convert_to_fp16, plan_fp16
from zturbo.export.layout import INPUT_NAMES, META_NAME, OUTPUT_NAMES, prepare_out_dir
from zturbo.export.onnx import check_onnx, export_part, io_shapes
from zturbo.export.single_file import export_single_file
from zturbo.export.tensorrt import build_engine, environment, require_tensorrt
from zturbo.export.verify import sample_images
from zturbo.model import VAE, load_pretrained
from zturbo.distill.fingerprint import encoder_fingerprint
from zturbo.utils import atomic_write_json
from zturbo.version import __version__

Log = Callable[[str], None]
STAGING_PREFIX = ".zturbo-export-"


def _nolog(_: str) -> None:
    pass


def _check_sizes(cfg: ExportConfig, factor: int) -> None:
    bad = [s for s in cfg.size if s % factor]
    if bad:
        raise ConfigError(
            f"export.size: {':'.join(map(str, cfg.size))} has sides {bad} not divisible by {factor}",
            f"this model downsamples by {factor}; use multiples of {factor}",
        )


def _profile_shapes(vae, part: str, cfg: ExportConfig) -> tuple[tuple[int, ...], ...]:
    c = vae.config
    f = c.downsample_factor
    shapes = []
    for batch, side in zip(cfg.batch, cfg.size):
        if part == "encoder":
            shapes.append((batch, c.in_channels, side, side))
        else:
            shapes.append((batch, c.latent_channels, side // f, side // f))
    return tuple(shapes)


def _calibration_feeds(vae, part: str, cfg: ExportConfig) -> list:
    f = vae.config.downsample_factor
    side = max(f, cfg.calibration_size // f * f)
    images = sample_images(side, cfg.calibration_images)
    if part == "encoder":
        return [img[None].numpy() for img in images]
    with torch.inference_mode():
        latents = vae.float().eval().encode(images).mean
        if cfg.apply_scaling:
            latents = vae.scale_latents(latents)
    return [z[None].contiguous().numpy() for z in latents]


Verifier = Callable[[VAE, Path], dict[str, Any]]


def export_model(
    model_dir: str | Path,
    out_dir: str | Path,
    cfg: ExportConfig | None = None,
    log: Log | None = None,
    verifier: Verifier | None = None,
    vae: VAE | None = None,
) -> dict[str, Any]:
    """Export the model folder ``model_dir`` (or ``vae``, loaded from there already) to ``out_dir``.

    ``verifier(vae, staging_dir)`` checks ONNX / TensorRT files before they are
    published and raises when they fail; ``cfg.verify`` needs one, because running
    the files takes a backend, which sits above this package
    (``zturbo.backends.verify.export_checkpoint`` passes it). The diffusers format
    verifies itself against diffusers, the single-file format by reading itself back. Returns the
    metadata written to ``out_dir/zturbo_export.json`` (or, for the diffusers and single-file formats,
    a summary of what was written; ``out_dir`` is then the file).
    """
    cfg = cfg or ExportConfig()
    log = log or _nolog
    if not cfg.parts:
        raise UsageError("nothing to export: --part is empty", "use --part encoder,decoder")
    if cfg.verify and cfg.format in ("onnx", "trt") and verifier is None:
        raise UsageError(
            "export.verify needs a verifier that runs the exported files",
            "call zturbo.backends.verify.export_checkpoint, which passes one",
        )
    if cfg.format == "trt":  # fail before minutes of export work if the engine cannot be built here
        require_tensorrt()
    source = Path(model_dir)
    vae = (vae if vae is not None else load_pretrained(source)).float().eval()
    if cfg.format == "single-file":
        return export_single_file(vae, Path(out_dir), cfg.layout, cfg.precision, cfg.force, cfg.verify, source, log)
    if cfg.format == "diffusers":  # refuse a model diffusers cannot hold before any folder is made
        check_diffusers_class(vae.config)
    out = prepare_out_dir(out_dir)
    log(f"model {source} ({vae.num_parameters / 1e6:.1f} M parameters)")

    if cfg.format == "diffusers":
        return export_diffusers(vae, out, verify=cfg.verify, source=source, log=log)

    _check_sizes(cfg, vae.config.downsample_factor)
    _remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        meta = build_files(vae, source, staging, out, cfg, log)
        atomic_write_json(staging / META_NAME, meta)
        if cfg.verify:
            meta["verify"] = verifier(vae, staging)
        _publish(staging, out, meta)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def build_files(vae, source: Path, staging: Path, out: Path, cfg: ExportConfig, log: Log) -> dict[str, Any]:
    """Write the graphs (and engines) of ``cfg.parts`` into ``staging``; return their metadata."""
    parts: dict[str, dict[str, Any]] = {}
    trt_env = None
    for part in cfg.parts:
        started = time.perf_counter()
        final = staging / layout.onnx_name(part)
        log(f"exporting {part} to ONNX (opset {cfg.opset})")
        if cfg.precision == "fp16":
            fp32_path = staging / f"{part}.fp32.onnx"
            export_part(vae, part, fp32_path, opset=cfg.opset, apply_scaling=cfg.apply_scaling)
            info = {"fp16": _to_fp16(vae, part, fp32_path, final, cfg, log)}
            fp32_path.unlink()
        else:
            export_part(vae, part, final, opset=cfg.opset, apply_scaling=cfg.apply_scaling)
            info = {}
        info.update(
            onnx=final.name,
            input=INPUT_NAMES[part],
            output=OUTPUT_NAMES[part],
            shapes=io_shapes(final),
            bytes=final.stat().st_size,
        )
        if cfg.format == "trt":
            trt = require_tensorrt()
            trt_env = environment(trt)
            info.update(
                build_engine(
                    final,
                    staging / layout.plan_name(part),
                    INPUT_NAMES[part],
                    _profile_shapes(vae, part, cfg),
                    timing_cache=cfg.timing_cache or out / "timing.cache",
                    workspace_gb=cfg.workspace_gb,
                    precision=cfg.precision,
                    log=log,
                )
            )
        info["seconds"] = round(time.perf_counter() - started, 2)
        parts[part] = info

    c = vae.config
    meta: dict[str, Any] = {
        "format_version": layout.FORMAT_VERSION,
        "format": cfg.format,
        "zturbo_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": str(source),
        "model": c.model_dump(mode="json"),
        "encoder_fingerprint": encoder_fingerprint(vae),
        "scaling_factor": c.scaling_factor,
        "shift_factor": c.shift_factor,
        "apply_scaling": cfg.apply_scaling,
        "downsample_factor": c.downsample_factor,
        "latent_channels": c.latent_channels,
        "precision": cfg.precision,
        "io_dtype": "float32",
        "opset": cfg.opset,
        "batch": {"min": cfg.batch[0], "opt": cfg.batch[1], "max": cfg.batch[2]},
        "size": {"min": cfg.size[0], "opt": cfg.size[1], "max": cfg.size[2]},
        "torch_version": torch.__version__,
        "parts": parts,
    }
    if trt_env is not None:
        meta["tensorrt"] = trt_env
    return meta


def _to_fp16(vae, part: str, fp32_path: Path, dst: Path, cfg: ExportConfig, log: Log) -> dict[str, Any]:
    feeds = _calibration_feeds(vae, part, cfg)
    log(f"calibrating {part} fp16 ranges on {len(feeds)} photos at {feeds[0].shape[-1]} px")
    ranges = activation_ranges(fp32_path, feeds)
    plan = plan_fp16(fp32_path, ranges, headroom=cfg.fp16_headroom, inputs=len(feeds))
    if plan.kept_layers:
        log(
            f"{part}: keeping {len(plan.kept_layers)} layer(s) in fp32 (activations up to {plan.max_activation:.4g})"
        )
    convert_to_fp16(fp32_path, dst, plan)
    check_onnx(dst)
    return plan.summary()


def _remove_stale_staging(out: Path, older_than_s: float = 6 * 3600) -> None:
    """Staging folders of exports killed outright (SIGKILL, OOM killer) that no finally block removed."""
    now = time.time()
    for path in out.glob(f"{STAGING_PREFIX}*"):
        with contextlib.suppress(OSError):
            if path.is_dir() and now - path.stat().st_mtime > older_than_s:
                shutil.rmtree(path, ignore_errors=True)


def _publish(staging: Path, out: Path, meta: dict[str, Any]) -> None:
    """Move the staged files into ``out``: drop the old metadata first, write the new one last."""
    with contextlib.suppress(FileNotFoundError):
        (out / META_NAME).unlink()
    for path in sorted(staging.iterdir()):
        if path.name != META_NAME:
            os.replace(path, out / path.name)
    atomic_write_json(out / META_NAME, meta)
