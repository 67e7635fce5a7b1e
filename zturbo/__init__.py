"""zturbo: train, evaluate, benchmark, export and serve compact AutoencoderKL-style VAEs."""

__version__ = "0.1.0"

from zturbo.config import ModelConfig, Settings, load_settings  # noqa: E402
from zturbo.model import VAE, load_vae  # noqa: E402

__all__ = ["VAE", "ModelConfig", "Settings", "load_settings", "load_vae", "__version__"]
