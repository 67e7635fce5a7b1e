"""Model architecture: the AutoencoderKL-compatible VAE, its blocks, config, layer plan and file layouts.

Imports nothing else of the project: every other layer builds on it.
"""

from zturbo.model.config import ModelConfig
from zturbo.model.kernels import Kernels
from zturbo.model.plan import Layer
from zturbo.model.vae import VAE, DiagonalGaussian, load_pretrained, load_state_dict_strict

__all__ = [
    "VAE",
    "DiagonalGaussian",
    "Kernels",
    "Layer",
    "ModelConfig",
    "load_pretrained",
    "load_state_dict_strict",
]
