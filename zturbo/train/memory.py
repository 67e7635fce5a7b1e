"""Expected GPU memory per profile, for the profile menu.

Peak memory of one training step at micro-batch 1 (bf16 autocast, LPIPS-VGG,
AdamW, EMA, the profile's gradient checkpointing). Larger effective batches
accumulate gradients over micro-batches, so the peak does not grow with the
batch; the trainer raises the micro-batch while it fits (see
``TrainEngine.fit_micro_batch``).

The figures are measured: one bf16 step at micro-batch 1 on an H100 with
``python benchmarks/bench_train.py --what gpu-memory`` (torch 2.11, the per-phase
upsample convolution, LPIPS-VGG, discriminator on), rounded up to the next GiB.
highres and ultra were measured with gradient checkpointing per block. It is now per
layer, and recomputes each GroupNorm+SiLU in the backward (under CUDA autocast their
fp32 outputs are the largest saved tensors); on the CPU (fp32, VAE alone, ultra at
512 px) that cut the step's memory growth from 3.13 to 2.35 GiB. Their figures are
upper bounds until remeasured: ultra (2048 px) measured 34.9 GiB, above a 32 GB card.
"""

from __future__ import annotations

PEAK_GIB_AT_MICRO_BATCH_1 = {  # measured peaks: 10.49, 25.59, 19.99 and 34.86 GiB
    "ultrafast": (11.0, "measured on an H100"),
    "fast": (26.0, "measured on an H100"),
    "highres": (20.0, "measured on an H100, per-block checkpointing"),
    "ultra": (35.0, "measured on an H100, per-block checkpointing"),
}


def expected_memory_gib(profile: str) -> str:
    entry = PEAK_GIB_AT_MICRO_BATCH_1.get(profile)
    if entry is None:
        return "-"
    gib, source = entry
    return f"~{gib:.0f} GiB at micro-batch 1 ({source})"
