"""Ways for other libraries to use a zturbo model (above the model layer, beside export)."""

from zturbo.adapters.diffusers_vae import DiffusersVAE

__all__ = ["DiffusersVAE"]
