"""Expected GPU memory per profile, for the profile menu.

Peak memory of one training step at micro-batch 1 (bf16 autocast, LPIPS-VGG,
AdamW, EMA, the profile's gradient checkpointing). Larger effective batches
accumulate gradients over micro-batches, so the peak does not grow with the
batch; the trainer raises the micro-batch while it fits (see
``TrainEngine.fit_micro_batch``).

``fast`` comes from a measurement on an H100 (benchmarks/bench_train.py --what gpu:
51.2 GiB peak at micro-batch 2 for 1024 px, i.e. about 25 GiB per image in flight
plus 1.5 GiB of weights, gradients, optimizer state, EMA and LPIPS). The others are
estimates: the VAE's saved activations counted on the meta device, plus LPIPS,
scaled by the ratio between that count and the ``fast`` measurement.
"""

from __future__ import annotations

PEAK_GIB_AT_MICRO_BATCH_1 = {
    "ultrafast": (10.0, "estimated"),
    "fast": (26.0, "from H100 measurement"),
    "highres": (9.0, "estimated"),
    "ultra": (15.0, "estimated"),
}


def expected_memory_gib(profile: str) -> str:
    entry = PEAK_GIB_AT_MICRO_BATCH_1.get(profile)
    if entry is None:
        return "-"
    gib, source = entry
    return f"~{gib:.0f} GiB at micro-batch 1 ({source})"
