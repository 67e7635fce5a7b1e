"""Distillation's training forward and its losses: what the engine runs per micro-batch instead of the VAE's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zturbo.data.batch import ForwardResult, TrainBatch
from zturbo.model import VAE


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
            with torch.no_grad():
                reference = self.teacher.decode(z)
            match = F.l1_loss(recon.float(), reference.float())
            terms["teacher"] = match.detach()
            extra = extra + self.teacher_weight * match
        return ForwardResult(recon, z, torch.zeros_like(z), extra, terms)
