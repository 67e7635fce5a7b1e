"""Model architecture: the AutoencoderKL-compatible VAE and its blocks."""

from zturbo.model.io import load_vae, resolve_model_dir
from zturbo.model.kernels import kernel_choices, set_kernels
from zturbo.model.vae import VAE, DiagonalGaussian

__all__ = ["VAE", "DiagonalGaussian", "kernel_choices", "load_vae", "resolve_model_dir", "set_kernels"]
