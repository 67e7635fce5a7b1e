"""Distillation: a slimmer decoder (and/or encoder) in an existing VAE's latent space.

    settings.distill.teacher = "path/to/FLUX.1-dev/vae"
    settings.distill.decoder_channels = [96, 192, 384, 384]
    Trainer(settings).fit()          # RUN_DIR/final/ decodes the teacher's latents

The student has the teacher's architecture, latent space and latent statistics
(scaling and shift factors, latents_mean/std, FLUX.2's BatchNorm normaliser) with
other widths. Modes:

- ``decoder``: the student's encoder, quant conv and latent normaliser are the
  teacher's, copied and frozen, so the student encodes exactly as the teacher does.
  Its decoder learns to decode the teacher's posterior mean with the profile's
  reconstruction, LPIPS and GAN losses against the real image, plus, with
  ``teacher_weight``, an L1 term to the teacher's own reconstruction.
- ``encoder``: the student's encoder (and quant conv) regress the teacher's
  normalised posterior mean (MSE, in the units the diffusion model sees); the decoder
  is the teacher's, frozen; image losses are logged but carry no gradient.
- ``both``: the two at once: the decoder learns from the teacher's latents and the
  encoder regresses them, so neither depends on the other's progress.

The decoder learns from the posterior mean (what `serve-batch encode` stores by
default and what pipelines' ``argmax`` latents are); the KL term has weight 0 (the
latent space is the teacher's). ``init="prune"`` starts every trained layer from the
teacher's most important channels (``zturbo.model.prune``), refit to the teacher on
``calibration_images`` training images (``zturbo.model.prune_fit``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from zturbo.config import Settings
from zturbo.data.datasets import load_batch, split_data
from zturbo.data.latent_shards import LatentIndex, LatentPairDataset, bucket_image, read_latent_index
from zturbo.errors import CheckpointError, ConfigError, InputError, UsageError
from zturbo.model import VAE, load_pretrained
from zturbo.model.config import ModelConfig, format_validation_error
from zturbo.model.fingerprint import encoder_fingerprint
from zturbo.model.prune import copy_except, prune_vae
from zturbo.model.single_file import read_single_file

TRAINED = {"decoder": ("decoder", "post_quant_conv"), "encoder": ("encoder", "quant_conv")}
ENCODE_HINT = "encode the images with the teacher: zturbo serve-batch encode TEACHER --input DATA --output DIR"


def load_teacher(path: str | os.PathLike, device: torch.device | str = "cpu", latent_family: str | None = None) -> VAE:
    """The teacher from its model folder (ours or diffusers', AutoencoderKL or AutoencoderKLFlux2) or
    single .safetensors file (``latent_family``: its factors where its shapes fit several families).

    ``zturbo train --teacher`` also takes run, step-N and pipeline folders: ``zturbo.artifacts``
    finds the model folder in them before settings reach the library.
    """
    path = Path(path)
    try:
        if path.is_file():
            teacher = read_single_file(path, latent_family, map_location=device)
        else:
            teacher = load_pretrained(path, map_location=device)
    except CheckpointError as exc:
        raise CheckpointError(f"teacher {path}: {exc.message}", exc.hint) from exc
    return teacher.eval().requires_grad_(False)


def student_config(teacher: ModelConfig, settings: Settings) -> ModelConfig:
    """The teacher's config with the student's widths (and everything else, statistics included, kept)."""
    d = settings.distill
    if d.latent_channels is not None and d.latent_channels != teacher.latent_channels:
        raise UsageError(
            f"--distill {d.mode}: latent channels {d.latent_channels} differ from the teacher's {teacher.latent_channels}",
            "a distilled model keeps the teacher's latent space; drop --z-channels",
        )
    encoder = d.encoder_channels if d.mode != "decoder" and d.encoder_channels else teacher.block_out_channels
    decoder = d.decoder_channels if d.mode != "encoder" and d.decoder_channels else teacher.decoder_channels
    fields = teacher.model_dump()
    fields.update(
        block_out_channels=list(encoder),
        decoder_block_out_channels=None if list(decoder) == list(encoder) else list(decoder),
        sample_size=settings.data.image_size,
    )
    try:
        return ModelConfig(**fields)
    except ValidationError as exc:
        raise ConfigError(f"student widths: {format_validation_error(exc)}") from exc


CALIBRATION_SIZE = 256  # the largest calibration crop: convolutions are local, and the refit's memory grows with it


def calibration_batch(settings: Settings, device: torch.device) -> torch.Tensor | None:
    """``distill.calibration_images`` training images, evenly spaced, centre crops of the training size
    (at most ``CALIBRATION_SIZE``)."""
    count, data_dir = settings.distill.calibration_images, settings.data.data_dir
    if count == 0 or data_dir is None or settings.distill.init != "prune":
        return None
    paths = split_data(data_dir, settings.data.val_images).train
    if not paths:
        return None
    picked = [paths[i * len(paths) // min(count, len(paths))] for i in range(min(count, len(paths)))]
    return load_batch(picked, min(settings.data.image_size, CALIBRATION_SIZE)).to(device)


def build_student(teacher: VAE, config: ModelConfig, mode: str, init: str, seed: int = 0,
                  calibration: torch.Tensor | None = None) -> VAE:
    """The student VAE: trained parts pruned from the teacher (or random), the rest the teacher's, frozen.

    ``calibration`` (training images) refits the pruned layers to the teacher (``zturbo.model.prune_fit``).
    """
    torch.manual_seed(seed)
    student = VAE(config).to(next(teacher.parameters()).device)
    trained = TRAINED["decoder"] + TRAINED["encoder"] if mode == "both" else TRAINED[mode]
    coders = tuple(p for p in trained if p in ("encoder", "decoder"))
    if init == "prune":
        prune_vae(teacher, student, coders, calibration)
    else:
        copy_except(teacher, student, coders)
    for name, module in student.named_children():
        module.requires_grad_(name in trained)
    return student


class DistillForward(nn.Module):
    """What the training engine runs per micro-batch: ``(recon, mean, logvar, extra_loss, extra_terms)``.

    ``mean`` / ``logvar`` are the latent the decoder decoded and a zero log-variance
    (the KL term has weight 0 in distillation). ``extra_loss`` is added to the profile's
    loss: the encoder's latent regression and the teacher-reconstruction term.
    """

    def __init__(self, student: VAE, teacher: VAE | None, mode: str, teacher_weight: float):
        super().__init__()
        self.vae = student
        self.teacher = teacher  # frozen; only where a mode needs it
        self.mode = mode
        self.teacher_weight = teacher_weight

    def _target(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's posterior mean (in decoder mode the student's frozen encoder is the teacher's)."""
        with torch.no_grad():
            source = self.vae if self.mode == "decoder" else self.teacher
            return source.encode(x).mean

    def forward(self, x: torch.Tensor, noise: torch.Tensor, latents: torch.Tensor | None = None):
        z = self._target(x) if latents is None else latents.to(x.dtype)
        terms: dict[str, torch.Tensor] = {}
        extra = torch.zeros((), device=x.device)
        if self.mode == "encoder":
            mean = self.vae.encode(x).mean
            with torch.no_grad():
                recon = self.vae.decode(mean)
        else:
            recon = self.vae.decode(z)
        if self.mode != "decoder":
            student = self.vae.encode(x).mean if self.mode == "both" else mean
            norm = self.teacher.normalize_latents
            latent = F.mse_loss(norm(student.float()), norm(z.float()))
            terms["latent"] = latent.detach()
            extra = extra + latent
        if self.teacher_weight > 0 and self.mode != "encoder":
            with torch.no_grad():
                reference = self.teacher.decode(z)
            match = F.l1_loss(recon.float(), reference.float())
            terms["teacher"] = match.detach()
            extra = extra + self.teacher_weight * match
        return recon, z, torch.zeros_like(z), extra, terms


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


class Distillation:
    """The student, its forward and its data for one run, built from ``settings.distill``."""

    def __init__(self, settings: Settings, device: torch.device, log: Callable[[str], None] | None = None):
        d = settings.distill
        log = log or (lambda message: None)
        if d.latents_dir is not None and d.mode != "decoder":
            raise UsageError("--latents trains a decoder alone", "use --distill decoder with --latents")
        self.teacher = load_teacher(d.teacher, device, d.latent_family)
        config = student_config(self.teacher.config, settings)
        factor = config.downsample_factor
        if settings.data.image_size % factor:
            raise ConfigError(f"data.image_size={settings.data.image_size} must be divisible by the teacher's {factor}")
        calibration = calibration_batch(settings, device)
        self.student = build_student(self.teacher, config, d.mode, d.init, settings.train.seed, calibration)
        loss = settings.loss.model_copy(update={"kl_weight": 0.0})
        if d.mode == "encoder":  # the decoder is frozen: image losses are logged only
            loss = loss.model_copy(update={"perceptual_weight": 0.0, "disc_weight": 0.0})
        self.settings = settings.model_copy(update={"model": config, "loss": loss})
        needs_teacher = d.mode != "decoder" or d.teacher_weight > 0
        self.forward = DistillForward(self.student, self.teacher if needs_teacher else None, d.mode, d.teacher_weight)
        self.index = None
        if d.latents_dir is not None:
            if settings.data.data_dir is None:
                raise UsageError("--latents needs the images they were encoded from", "pass --data DIR")
            self.index = read_latent_index(d.latents_dir)
            check_latents(self.index, self.teacher, str(d.teacher), Path(settings.data.data_dir), device)
        if not needs_teacher:
            self.teacher = None
        trained = sum(p.numel() for p in self.student.parameters() if p.requires_grad)
        log(
            f"distilling the {d.mode} of {d.teacher} ({d.init} init): encoder {config.block_out_channels}, "
            f"decoder {config.decoder_channels}, {trained / 1e6:.2f} M trained parameters"
        )

    def dataset(self, paths: list[Path], data_dir: Path, image_size: int) -> LatentPairDataset | None:
        """With ``--latents``, the (image, latent) pairs of the training images; else None (images only)."""
        if self.index is None:
            return None
        wanted = {p.resolve() for p in paths}
        entries = [e for e in self.index.entries if (data_dir / e.source).resolve() in wanted]
        return LatentPairDataset(self.index, data_dir, entries, image_size)
