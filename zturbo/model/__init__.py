"""Model architecture: the AutoencoderKL-compatible VAE and its blocks."""

from zturbo.model.io import load_vae, resolve_model_dir
from zturbo.model.kernels import kernels, set_kernels
from zturbo.model.vae import VAE, DiagonalGaussian

__all__ = ["VAE", "DiagonalGaussian", "kernels", "load_vae", "resolve_model_dir", "set_kernels"]
