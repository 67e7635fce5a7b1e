"""zturbo: train, evaluate, benchmark, export and serve compact AutoencoderKL-style VAEs."""

from zturbo.artifacts import load_vae
from zturbo.config import Settings, load_settings
from zturbo.model import VAE, ModelConfig
from zturbo.version import __version__

__all__ = ["VAE", "ModelConfig", "Settings", "load_settings", "load_vae", "__version__"]
