"""A student from a teacher: its settings (from the teacher's config alone), then its weights.

``student_settings`` is what a distillation trains with, settled before training is set up:
the teacher's model config with the student's widths, the KL weight 0, and in encoder mode
no image losses. ``load_student`` then builds the student on a device: the teacher's
weights, pruned (and refit on calibration images) or random, the forward the training
engine runs, and the stored-latent pairs when training from ``--latents``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from zturbo.config import Settings, with_widths
from zturbo.data.datasets import load_batch
from zturbo.data.latent_shards import LatentIndex, LatentPairDataset, read_latent_index
from zturbo.distill.forward import DistillForward
from zturbo.distill.latents import check_latents, latent_pairs
from zturbo.distill.prune import copy_except, prune_vae
from zturbo.errors import CheckpointError, ConfigError, UsageError
from zturbo.model import VAE, ModelConfig, load_pretrained
from zturbo.model.diffusers import config_from_diffusers, read_config
from zturbo.model.single_file import open_single_file, read_single_file

TRAINED = {"decoder": ("decoder", "post_quant_conv"), "encoder": ("encoder", "quant_conv")}
CALIBRATION_SIZE = 256  # the largest calibration crop: convolutions are local, and the refit's memory grows with it


def load_teacher(path: str | os.PathLike, device: torch.device | str = "cpu", latent_family: str | None = None) -> VAE:
    """The teacher from its model folder (ours or diffusers', AutoencoderKL or AutoencoderKLFlux2) or single
    .safetensors file (``latent_family``: its factors where its shapes fit several families).

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


def teacher_config(path: str | os.PathLike, latent_family: str | None = None) -> ModelConfig:
    """The teacher's model config, from its config.json or its single file's header alone (no weights read)."""
    path = Path(path)
    try:
        if path.is_file():
            return open_single_file(path, latent_family).config
        if not path.is_dir():
            raise CheckpointError(f"model folder not found: {path}")
        return config_from_diffusers(read_config(path))
    except CheckpointError as exc:
        raise CheckpointError(f"teacher {path}: {exc.message}", exc.hint) from exc


def student_config(teacher: ModelConfig, settings: Settings) -> ModelConfig:
    """The teacher's config with the student's widths (and everything else, statistics included, kept)."""
    d = settings.distill
    if d.latent_channels is not None and d.latent_channels != teacher.latent_channels:
        raise UsageError(
            f"--distill {d.mode}: latent channels {d.latent_channels} differ from the teacher's {teacher.latent_channels}",
            "a distilled model keeps the teacher's latent space; drop --z-channels",
        )
    return with_widths(teacher, *d.student_widths(teacher), sample_size=settings.data.image_size)


def student_settings(settings: Settings) -> Settings:
    """The complete settings a distillation from ``settings.distill.teacher`` trains with.

    The model is the student's (``student_config``); the KL weight is 0 (the latent space is
    the teacher's); in encoder mode the decoder is frozen, so the image losses are logged only.
    Reads the teacher's config.json, not its weights. Settings this made come back equal.
    """
    d = settings.distill
    if d.teacher is None:
        raise UsageError("no teacher to distil from", "pass --teacher MODEL_DIR")
    if d.latents_dir is not None and d.mode != "decoder":
        raise UsageError("--latents trains a decoder alone", "use --distill decoder with --latents")
    if d.latents_dir is not None and settings.data.data_dir is None:
        raise UsageError("--latents needs the images they were encoded from", "pass --data DIR")
    config = student_config(teacher_config(d.teacher, d.latent_family), settings)
    factor = config.downsample_factor
    if settings.data.image_size % factor:
        raise ConfigError(f"data.image_size={settings.data.image_size} must be divisible by the teacher's {factor}")
    loss = settings.loss.model_copy(update={"kl_weight": 0.0})
    if d.mode == "encoder":
        loss = loss.model_copy(update={"perceptual_weight": 0.0, "disc_weight": 0.0})
    return settings.model_copy(update={"model": config, "loss": loss})


def calibration_batch(settings: Settings, train_paths: list[Path], device: torch.device) -> torch.Tensor | None:
    """``distill.calibration_images`` of ``train_paths``, evenly spaced, centre crops of the training size
    (at most ``CALIBRATION_SIZE``); None when the init does not refit."""
    count = settings.distill.calibration_images
    if count == 0 or not train_paths or settings.distill.init != "prune":
        return None
    picked = [train_paths[i * len(train_paths) // min(count, len(train_paths))]
              for i in range(min(count, len(train_paths)))]
    return load_batch(picked, min(settings.data.image_size, CALIBRATION_SIZE)).to(device)


def build_student(teacher: VAE, config: ModelConfig, mode: str, init: str, seed: int = 0,
                  calibration: torch.Tensor | None = None) -> VAE:
    """The student VAE: trained parts pruned from the teacher (or random), the rest the teacher's, frozen.

    ``calibration`` (training images) refits the pruned layers to the teacher (``zturbo.distill.prune_fit``).
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


@dataclass
class Student:
    """What training needs of a distillation: the student's settings, the student, its forward, its data."""

    settings: Settings
    model: VAE
    forward: DistillForward
    index: LatentIndex | None  # the stored latents (--latents), checked against the teacher

    def dataset(self, paths: list[Path], data_dir: Path, image_size: int) -> LatentPairDataset | None:
        """With ``--latents``, the (image, latent) pairs of the training images ``paths``; else None (images only)."""
        return None if self.index is None else latent_pairs(self.index, paths, data_dir, image_size)


def load_student(settings: Settings, device: torch.device, train_paths: list[Path],
                 log: Callable[[str], None] | None = None) -> Student:
    """The student of ``settings`` (made by ``student_settings``) on ``device``; ``train_paths`` are the
    training images, the calibration images among them."""
    d, config = settings.distill, settings.model
    teacher = load_teacher(d.teacher, device, d.latent_family)
    expected = student_config(teacher.config, settings)
    if config != expected:
        raise UsageError(f"settings.model is not the student of {d.teacher}",
                         "complete the settings with zturbo.distill.student_settings first")
    calibration = calibration_batch(settings, train_paths, device)
    student = build_student(teacher, config, d.mode, d.init, settings.train.seed, calibration)
    index = None
    if d.latents_dir is not None:
        index = read_latent_index(d.latents_dir)
        check_latents(index, teacher, str(d.teacher), Path(settings.data.data_dir), device)
    needs_teacher = d.mode != "decoder" or d.teacher_weight > 0
    forward = DistillForward(student, teacher if needs_teacher else None, d.mode, d.teacher_weight)
    if log is not None:
        trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
        log(f"distilling the {d.mode} of {d.teacher} ({d.init} init): encoder {config.block_out_channels}, "
            f"decoder {config.decoder_channels}, {trained / 1e6:.2f} M trained parameters")
    return Student(settings, student, forward, index)
