"""zturbo: train, evaluate, benchmark, export and serve compact AutoencoderKL-style VAEs."""

from zturbo.artifacts import load_vae
from zturbo.config import Settings, load_settings
from zturbo.model import VAE, ModelConfig
from zturbo.tiling import Tiling  # noqa: F401 - importing the package installs the tiled engines on VAE
from zturbo.version import __version__

__all__ = ["VAE", "ModelConfig", "Settings", "load_settings", "load_vae", "__version__"]
