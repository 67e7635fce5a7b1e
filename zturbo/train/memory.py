"""Expected GPU memory per profile, for the profile menu.

Peak memory of one training step at micro-batch 1 (bf16 autocast, LPIPS-VGG,
AdamW, EMA, the profile's gradient checkpointing). Bigger effective batches
accumulate gradients over micro-batches, so the peak does not grow with the
batch; the trainer raises the micro-batch while it fits (see
``TrainEngine.fit_micro_batch``).
"""

from __future__ import annotations

# Counted on the meta device: saved activations of the VAE (torch autograd hooks)
# plus LPIPS-VGG activations and weights, gradients, AdamW moments and EMA.
PEAK_GIB_AT_MICRO_BATCH_1 = {"ultrafast": 7.4, "fast": 19.6, "highres": 8.0, "ultra": 12.0}
SOURCE = "estimated"


def expected_memory_gib(profile: str) -> str:
    gib = PEAK_GIB_AT_MICRO_BATCH_1.get(profile)
    if gib is None:
        return "-"
    return f"~{gib:.0f} GiB ({SOURCE}, micro-batch 1)"
