"""Stored latents for decoder distillation: refuse those the teacher did not write, pair the rest with images.

The reader of the on-disk format is ``zturbo.data.latent_shards`` (the format is the encoder's,
``zturbo.serve.store``); what belongs to distillation is the check that a latent folder is the
teacher's, by its encoder fingerprint (``zturbo.distill.fingerprint``) or, for an index written
before fingerprints were recorded, by re-encoding one of its images.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from zturbo.data.latent_shards import LatentIndex, LatentPairDataset, bucket_image
from zturbo.errors import InputError, UsageError
from zturbo.model import VAE
from zturbo.distill.fingerprint import encoder_fingerprint

ENCODE_HINT = "encode the images with the teacher: zturbo serve-batch encode TEACHER --input DATA --output DIR"


def check_latents(index: LatentIndex, teacher: VAE, teacher_name: str, image_root: Path, device: torch.device) -> None:
    """Refuse latents the teacher did not write: their layout, then the encoding model's identity.

    The index records the encoding model's ``encoder_fingerprint`` (the hash of everything
    ``encode(x).mean`` depends on), which must equal the teacher's. Indexes written before the
    fingerprint was recorded (or by a backend that could not compute it) are checked by
    ``_check_by_reencoding`` instead.
    """
    cfg = teacher.config
    if index.latent_channels != cfg.latent_channels or index.downsample_factor != cfg.downsample_factor:
        raise UsageError(
            f"latents in {index.folder} have {index.latent_channels} channels at 1/{index.downsample_factor} scale; "
            f"the teacher's have {cfg.latent_channels} at 1/{cfg.downsample_factor}",
            ENCODE_HINT,
        )
    if index.latent_mode != "mean":
        raise UsageError(f"latents in {index.folder} are posterior samples; decoder distillation uses the mean",
                         "encode them with --mean (the default)")
    if not index.entries:
        raise InputError(f"no latents in {index.folder}")
    if index.fingerprint is None:
        _check_by_reencoding(index, teacher, image_root, device)
        return
    mine = encoder_fingerprint(teacher)
    if index.fingerprint != mine:
        raise UsageError(
            f"latents in {index.folder} come from model {index.model} (encoder {_short(index.fingerprint)}), "
            f"not from the teacher {teacher_name} (encoder {_short(mine)})",
            ENCODE_HINT,
        )


def _short(fingerprint: str) -> str:
    return fingerprint.removeprefix("sha256:")[:12]


def _check_by_reencoding(index: LatentIndex, teacher: VAE, image_root: Path, device: torch.device) -> None:
    """For an index without a fingerprint: the teacher re-encodes the first entry's image and must
    reproduce the stored latent to within the rounding of the precision it was stored in (fp32:
    1e-3 relative, which leaves room for a different batch size's convolution order; 16-bit:
    2e-2, a few of bf16's 2^-8 steps). Another model's latents differ by their whole magnitude.
    """
    entry = index.entries[0]
    path = image_root / entry.source
    if not path.is_file():
        raise InputError(f"{path} (encoded into {index.folder}) not found", "pass the encoded image folder as --data")
    with torch.no_grad():
        ref = teacher.encode(bucket_image(path, entry.bucket).unsqueeze(0).to(device)).mean[0].float().cpu()
    stored = LatentPairDataset(index, image_root, [entry], min(entry.bucket)).latent(entry)
    tolerance = 1e-3 if index.precision in ("fp32", "auto") else 2e-2
    error = float((stored - ref).norm() / ref.norm().clamp_min(1e-12)) if stored.shape == ref.shape else math.inf
    if error > tolerance:
        raise UsageError(
            f"latents in {index.folder} were not made by the teacher (re-encoding {entry.source} differs by "
            f"{error:.2g} relative, more than {tolerance:g}; index names model {index.model!r})",
            ENCODE_HINT,
        )


def latent_pairs(index: LatentIndex, paths: list[Path], data_dir: Path, image_size: int) -> LatentPairDataset:
    """The (image, latent) pairs of ``index`` whose images are among ``paths`` (the training images)."""
    wanted = {p.resolve() for p in paths}
    entries = [e for e in index.entries if (data_dir / e.source).resolve() in wanted]
    return LatentPairDataset(index, data_dir, entries, image_size)
