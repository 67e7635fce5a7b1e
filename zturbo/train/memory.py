"""Expected GPU memory per profile, for the profile menu.

Peak memory of one training step at micro-batch 1 (bf16 autocast, LPIPS-VGG,
AdamW, EMA, the profile's gradient checkpointing). Larger effective batches
accumulate gradients over micro-batches, so the peak does not grow with the
batch; the trainer raises the micro-batch while it fits (see
``TrainEngine.fit_micro_batch``).

The figures are measured: one bf16 step at micro-batch 1 with
``python benchmarks/bench_train.py --what gpu-memory`` (torch 2.11, the per-phase
upsample convolution, LPIPS-VGG, discriminator on), rounded up to the next GiB.
ultrafast and fast on an H100; highres and ultra on an H200 after gradient
checkpointing went from per block to per layer with each GroupNorm+SiLU recomputed
in the backward (under CUDA autocast their fp32 outputs are the largest saved
tensors): highres 19.99 -> 15.88 GiB, ultra 34.86 -> 27.46 GiB, so ultra now fits
a 32 GB card. (Peak allocated memory does not depend on which of the two cards.)
"""

from __future__ import annotations

from zturbo.errors import ZTurboError


class DoesNotFitError(ZTurboError):
    """A training step needs more device memory than there is, even at micro-batch 1."""

PEAK_GIB_AT_MICRO_BATCH_1 = {  # measured peaks: 10.49, 25.59, 15.88 and 27.46 GiB
    "ultrafast": (11.0, "measured on an H100"),
    "fast": (26.0, "measured on an H100"),
    "highres": (16.0, "measured on an H200"),
    "ultra": (28.0, "measured on an H200"),
}


def expected_memory_gib(profile: str) -> str:
    entry = PEAK_GIB_AT_MICRO_BATCH_1.get(profile)
    if entry is None:
        return "-"
    gib, source = entry
    return f"~{gib:.0f} GiB at micro-batch 1 ({source})"


def does_not_fit(profile: str | None, image_size: int, peak_gib: float, limit_gib: float,
                 checkpointing: bool) -> DoesNotFitError:
    """The one-line error for a training step that exceeds the memory even at micro-batch 1."""
    change = ("lower data.image_size or use a smaller profile" if checkpointing else
              "turn on train.gradient_checkpointing, lower data.image_size, "
              "or use a smaller profile")
    return DoesNotFitError(
        f"profile {profile or '(none)'} at {image_size} px does not fit even at micro-batch 1: one image's step "
        f"peaks at {peak_gib:.1f} GiB, over the {limit_gib:.1f} GiB available",
        change,
    )
