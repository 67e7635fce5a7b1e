"""The one place a model's family decides what is built: ``ModelConfig`` -> ``VAE``, ``TinyConfig`` -> ``TinyVAE``.

    vae = build_model(config)            # either family, from its config
    vae = load_pretrained("runs/x/final")  # either family, from a model folder (config.json's _class_name)
"""

from __future__ import annotations

import os

import torch

from zturbo.model.config import ModelConfig, TinyConfig
from zturbo.model.diffusers import config_from_diffusers, read_config
from zturbo.model.errors import CheckpointError
from zturbo.model.tiny import TinyVAE
from zturbo.model.vae import VAE, Autoencoder

MODEL_CLASSES: dict[type, type[Autoencoder]] = {ModelConfig: VAE, TinyConfig: TinyVAE}


def model_class(config: ModelConfig | TinyConfig) -> type[Autoencoder]:
    return MODEL_CLASSES[type(config)]


def build_model(config: ModelConfig | TinyConfig) -> Autoencoder:
    """A new model of ``config``'s family (random weights, on the current default device)."""
    return model_class(config)(config)


def load_pretrained(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> Autoencoder:
    """A model folder (ours or diffusers', any family) as a model in eval mode."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"model folder not found: {directory}")
    return model_class(config_from_diffusers(read_config(directory))).from_pretrained(directory, map_location)
