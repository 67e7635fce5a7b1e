"""Model architecture: the AutoencoderKL-compatible VAE, its blocks, config and diffusers format.

Imports nothing else of the project: every other layer builds on it.
"""

from zturbo.model.config import ModelConfig
from zturbo.model.kernels import kernel_choices, set_kernels
from zturbo.model.vae import VAE, DiagonalGaussian, load_pretrained, load_state_dict_strict

__all__ = [
    "VAE",
    "DiagonalGaussian",
    "ModelConfig",
    "kernel_choices",
    "load_pretrained",
    "load_state_dict_strict",
    "set_kernels",
]
