"""Model architecture: the AutoencoderKL-compatible VAE and the tiny (AutoencoderTiny) family, their blocks,
configs, layer plan and file layouts.

Imports nothing else of the project: every other layer builds on it.
"""

from zturbo.model.config import AnyModelConfig, ModelConfig, TinyConfig, parse_model_config
from zturbo.model.families import build_model, load_pretrained
from zturbo.model.kernels import Kernels
from zturbo.model.plan import Layer
from zturbo.model.tiny import TinyVAE
from zturbo.model.vae import VAE, Autoencoder, DiagonalGaussian, load_state_dict_strict

__all__ = [
    "VAE",
    "AnyModelConfig",
    "Autoencoder",
    "DiagonalGaussian",
    "Kernels",
    "Layer",
    "ModelConfig",
    "TinyConfig",
    "TinyVAE",
    "build_model",
    "load_pretrained",
    "load_state_dict_strict",
    "parse_model_config",
]
