"""Distillation's training forward and its losses (a student of the teacher's family, or a tiny one): what the
engine runs per micro-batch instead of the VAE's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zturbo.data.batch import ForwardResult, TrainBatch
from zturbo.model import VAE, TinyVAE


def teacher_match(teacher: VAE, raw_latent: torch.Tensor, recon: torch.Tensor, terms: dict) -> torch.Tensor:
    """L1 between a student's reconstruction and the frozen teacher's decode of the same raw latent
    (logged as the ``teacher`` term)."""
    with torch.no_grad():
        reference = teacher.decode(raw_latent)
    match = F.l1_loss(recon.float(), reference.float())
    terms["teacher"] = match.detach()
    return match


class DistillForward(nn.Module):
    """The student's reconstruction of a micro-batch, and the losses distillation adds to the profile's.

    The decoder decodes the teacher's posterior mean (stored in ``batch.latents``, or encoded
    here); the result's ``mean`` is that latent and ``logvar`` zero (the KL term has weight 0
    in distillation). ``extra_loss``: the encoder's latent regression (modes ``encoder`` and
    ``both``) and, with ``teacher_weight``, an L1 term to the teacher's own reconstruction.
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

    def forward(self, batch: TrainBatch, noise: torch.Tensor | None = None) -> ForwardResult:
        x = batch.images
        z = self._target(x) if batch.latents is None else batch.latents.to(x.dtype)
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
            extra = extra + self.teacher_weight * teacher_match(self.teacher, z, recon, terms)
        return ForwardResult(recon, z, torch.zeros_like(z), extra, terms)


class TinyDistillForward(nn.Module):
    """A tiny student's (``TinyVAE``) reconstruction of a micro-batch and the losses distillation adds.

    The target is the teacher's posterior mean (stored in ``batch.latents``, or encoded here) as the
    diffusion model sees it, ``(z - vae_shift) * vae_scale``: the latent the tiny model decodes and
    encodes to. ``decoder`` and ``both``: the decoder decodes the target; ``encoder`` and ``both``: the
    encoder regresses it (MSE, the ``latent`` term). In ``encoder`` mode the reconstruction, logged
    only, is the teacher's decode of the student's latent. ``teacher_weight`` adds an L1 term to the
    teacher's own reconstruction.
    """

    def __init__(self, student: TinyVAE, teacher: VAE | None, mode: str, teacher_weight: float):
        super().__init__()
        self.vae = student
        self.teacher = teacher  # frozen; None only when decoding stored latents with no teacher term
        self.mode = mode
        self.teacher_weight = teacher_weight

    def forward(self, batch: TrainBatch, noise: torch.Tensor | None = None) -> ForwardResult:
        x = batch.images
        if batch.latents is None:
            with torch.no_grad():
                raw = self.teacher.encode(x).mean
        else:
            raw = batch.latents.to(x.dtype)
        target = self.vae.from_teacher_latents(raw)
        terms: dict[str, torch.Tensor] = {}
        extra = torch.zeros((), device=x.device)
        if self.mode != "decoder":
            latent = self.vae.encode(x).mean
            loss = F.mse_loss(latent.float(), target.float())
            terms["latent"] = loss.detach()
            extra = extra + loss
        if self.mode == "encoder":
            with torch.no_grad():
                recon = self.teacher.decode(self.vae.to_teacher_latents(latent))
        else:
            recon = self.vae.decode(target)
        if self.teacher_weight > 0 and self.mode != "encoder":
            extra = extra + self.teacher_weight * teacher_match(self.teacher, raw, recon, terms)
        return ForwardResult(recon, target, torch.zeros_like(target), extra, terms)
