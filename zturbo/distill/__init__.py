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
teacher's most important channels (``prune``), refit to the teacher on
``calibration_images`` training images (``prune_fit``).

Training reaches it through two calls: ``student_settings`` (the complete settings the
run trains with, from the teacher's config) and ``load_student`` (the student, its
forward and its data on a device). The modules:

- ``student``: the teacher, the student's config and settings, its weights;
- ``prune``, ``prune_fit``: channel pruning and the calibration refit;
- ``forward``: the training forward and the losses distillation adds;
- ``latents``: stored latents checked against the teacher and paired with their images.
"""

from zturbo.distill.forward import DistillForward
from zturbo.distill.student import (
    Student,
    build_student,
    load_student,
    load_teacher,
    student_config,
    student_settings,
)

__all__ = [
    "DistillForward",
    "Student",
    "build_student",
    "load_student",
    "load_teacher",
    "student_config",
    "student_settings",
]
