"""Model architecture: the AutoencoderKL-compatible VAE and its blocks."""

from zturbo.model.io import load_vae, resolve_model_dir
from zturbo.model.vae import VAE, DiagonalGaussian

__all__ = ["VAE", "DiagonalGaussian", "load_vae", "resolve_model_dir"]
