"""zturbo: train, evaluate, benchmark, export and serve compact AutoencoderKL-style VAEs."""

from importlib import metadata as _metadata

from zturbo.config import Settings, load_settings
from zturbo.model import VAE, ModelConfig
from zturbo.train.layout import load_vae

try:
    __version__ = _metadata.version("zturbo")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"

__all__ = ["VAE", "ModelConfig", "Settings", "load_settings", "load_vae", "__version__"]
