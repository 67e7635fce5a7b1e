"""Compare an exported backend with the torch model it came from, on real photos."""

from __future__ import annotations

import math

import torch

from zturbo.data import load_demo_images
from zturbo.data.images import pil_to_tensor
from zturbo.errors import ZTurboError

# fp32 graphs must match torch to this on [-1, 1] images; fp16 ones must stay finite and above this PSNR.
FP32_MAX_ABS = 1e-4
FP16_MIN_PSNR_DB = 30.0


def sample_images(size: int, count: int = 4) -> torch.Tensor:
    """The bundled photos, centre-cropped to ``size`` x ``size``, as (N, 3, size, size) in [-1, 1]."""
    photos = load_demo_images(size)[:count]
    return torch.stack([pil_to_tensor(im) for im in photos])


def compare(reference: torch.Tensor, candidate: torch.Tensor, data_range: float | None = None) -> dict:
    """Max / mean absolute error and PSNR of ``candidate`` against ``reference``."""
    ref = reference.detach().float().cpu()
    out = candidate.detach().float().cpu()
    if ref.shape != out.shape:
        raise ZTurboError(f"exported graph returned shape {tuple(out.shape)}, torch {tuple(ref.shape)}")
    finite = bool(torch.isfinite(out).all())
    diff = (out - ref).abs()
    mse = float(diff.double().pow(2).mean()) if finite else float("inf")
    peak = data_range if data_range is not None else float(ref.max() - ref.min()) or 1.0
    psnr = (
        float("inf")
        if mse == 0
        else (10 * math.log10(peak**2 / mse) if math.isfinite(mse) else float("-inf"))
    )
    return {
        "finite": finite,
        "max_abs": float(diff.max()) if finite else float("inf"),
        "mean_abs": float(diff.mean()) if finite else float("inf"),
        "psnr_db": psnr,
    }


def verify_backend(vae, backend, parts: list[str], images: torch.Tensor, precision: str) -> dict:
    """Run ``backend`` and the fp32 torch ``vae`` on ``images``; figures and a pass flag per part.

    Latents are compared with scaling undone by the backend (the Backend contract),
    images on their [-1, 1] range (data range 2 for PSNR).
    """
    vae = vae.float().eval()
    results: dict[str, dict] = {}
    with torch.inference_mode():
        ref_latent = vae.encode(images).mean
        if "encoder" in parts:
            got = backend.encode(images.to(backend.device))
            backend.synchronize()
            stats = compare(ref_latent, got)
            tol = FP32_MAX_ABS * max(1.0, float(ref_latent.abs().max()))
            stats["passed"] = _passed(stats, precision, tol)
            results["encoder"] = stats
        if "decoder" in parts:
            ref_image = vae.decode(ref_latent)
            got = backend.decode(ref_latent.to(backend.device))
            backend.synchronize()
            stats = compare(ref_image, got, data_range=2.0)
            stats["passed"] = _passed(stats, precision, FP32_MAX_ABS)
            results["decoder"] = stats
    results["images"] = list(images.shape)
    return results


def _passed(stats: dict, precision: str, tol: float) -> bool:
    if not stats["finite"]:
        return False
    if precision == "fp32":
        return stats["max_abs"] <= tol
    return stats["psnr_db"] >= FP16_MIN_PSNR_DB
