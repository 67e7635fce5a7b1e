"""Tolerances for comparing two computations of the same function, derived from rounding.

Two implementations of one network (ours and diffusers', channels-last and NCHW,
an exported graph and torch) differ only in the order of their floating-point sums.
Rounding-error analysis bounds the gap:

- one dot product of length K (a conv with K = C_in * k * k inputs per output) has a
  relative error of at most about K * u, and about sqrt(K) * u when roundings behave
  like independent random signs (Higham & Mary, "A new approach to probabilistic
  rounding error analysis", 2019), with u the unit roundoff (2**-24 in fp32, 2**-53
  in fp64);
- GroupNorm renormalises after every conv, so the layers' errors add rather than
  multiply: over L layers the output's error is about L * sqrt(K) * u * max|y|.

``SAFETY`` covers the probabilistic bound's tail and the constant factors (each
layer's bias add, normalisation and activation each round once more).

Weights stored in fp16 and read back into fp32 are exact (every fp16 value is an
fp32 value), so fp16 storage adds nothing to the gap between two loaders of the same file.
"""

from __future__ import annotations

import math

import torch

SAFETY = 8.0


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def rounding_atol(reference: torch.Tensor, layers: int, fan_in: int, dtype: torch.dtype | None = None) -> float:
    """Largest |a - b| expected between two orderings of the same ``layers``-deep computation."""
    dtype = dtype or reference.dtype
    scale = float(reference.detach().abs().max()) or 1.0
    return SAFETY * layers * math.sqrt(fan_in) * unit_roundoff(dtype) * scale


def vae_depth(vae) -> tuple[int, int]:
    """(convs on the longest path, largest fan-in) of a VAE, for ``rounding_atol``."""
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
    fan_in = max(m.in_channels * m.kernel_size[0] * m.kernel_size[1] for m in convs)
    return len(convs), fan_in
