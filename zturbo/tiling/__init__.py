"""Tiled encode and decode over any coder's layer plan: exact, fast, recompute and patch-parallel,
the memory estimate, and one dispatcher (``dispatch.py``).

Importing the package makes ``VAE.encode(x, tile=...)`` and ``VAE.decode(z, tile=...)`` use it
(``zturbo/__init__.py`` imports it, so any use of zturbo has it): the model package defines the
interface and knows nothing of the engines above it.
"""

from zturbo.model.vae import VAE
from zturbo.tiling.dispatch import Tiling, decode_tiled, default_halo, encode_moments
from zturbo.tiling.memory import TilePlan, coder_plan, plan_tiling, tiled_peak_bytes, untiled_peak_bytes
from zturbo.tiling.parallel import decode_parallel

VAE.tiler = Tiling()

__all__ = [
    "TilePlan",
    "Tiling",
    "coder_plan",
    "decode_parallel",
    "decode_tiled",
    "default_halo",
    "encode_moments",
    "plan_tiling",
    "tiled_peak_bytes",
    "untiled_peak_bytes",
]
