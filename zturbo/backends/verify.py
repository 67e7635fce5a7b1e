"""The export job: resolve a model path, write the export, verify it on a backend before publishing.

``zturbo.export`` writes files; running them takes a backend, so verification sits
here, above both, and reaches ``export_model`` as a callback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from zturbo.artifacts import TORCH_KINDS, Artifact, require
from zturbo.backends import create_backend
from zturbo.config import ExportConfig
from zturbo.errors import ZTurboError
from zturbo.export.pipeline import Log, export_model
from zturbo.export.verify import sample_images, verify_backend
from zturbo.model import VAE


def _nolog(_: str) -> None:
    pass


def export_checkpoint(
    model: str | os.PathLike | Artifact,
    out_dir: str | os.PathLike,
    cfg: ExportConfig | None = None,
    log: Log | None = None,
    job: str = "export",
) -> dict[str, Any]:
    """Export a model, run, step-N, diffusers or pipeline folder or a single file to ``out_dir``
    (verified with cfg.verify)."""
    cfg = cfg or ExportConfig()
    log = log or _nolog
    artifact = require(model, TORCH_KINDS, job)
    return export_model(
        artifact.source, out_dir, cfg, log, lambda vae, folder: verify_export(vae, folder, cfg, log),
        vae=artifact.load_vae() if artifact.model_dir is None else None,
    )


def verify_export(vae: VAE, folder: Path, cfg: ExportConfig, log: Log) -> dict[str, Any]:
    """Run the export in ``folder`` against torch on photos; raise (nothing published) when a part fails."""
    f = vae.config.downsample_factor
    side = min(max(256, cfg.size[0]), cfg.size[2]) // f * f
    batch = min(max(2, cfg.batch[0]), cfg.batch[2])
    images = sample_images(side, batch)
    backend_name = "trt" if cfg.format == "trt" else "onnx"
    device = "cuda" if cfg.format == "trt" else "cpu"
    log(f"verifying the {backend_name} export against torch on {batch} photos at {side} px")
    backend = create_backend(backend_name, folder, device=device)
    result = verify_backend(vae, backend, list(cfg.parts), images, cfg.precision)
    result["backend"] = backend.describe()
    failed = [p for p in cfg.parts if not result[p]["passed"]]
    if failed:
        figures = "; ".join(
            f"{p}: max abs {result[p]['max_abs']:.3g}, PSNR {result[p]['psnr_db']:.1f} dB" for p in failed
        )
        raise ZTurboError(
            f"verification failed, nothing was written: {figures}",
            "for fp16 try a larger --fp16-headroom or more calibration photos; otherwise export fp32",
        )
    return result
