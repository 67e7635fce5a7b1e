"""A stable hash of what a model's latents depend on: the encoder side of its weights and config.

    >>> encoder_fingerprint(vae)                       # doctest: +SKIP
    'sha256:3f1c...'

``encode(x).mean`` is a function of the encoder's and the quant conv's weights and of the
config fields that shape them, nothing else: the latent normalisation (scaling and shift
factors, ``latents_mean`` / ``latents_std``, FLUX.2's ``bn`` statistics) is applied by the
diffusion model's pipeline, not by ``encode``, and stored latents are the unnormalised mean.
So the fingerprint covers exactly the former. Two models with the same fingerprint write the
same latents, and rewriting a model's latent statistics (``eval --latent-stats --write``)
leaves the latents it wrote valid.

The hash is of the values, not the storage: every tensor is hashed as float32, which holds
every fp16 and bf16 value exactly. A checkpoint stored in fp16 hashes the same whether it is
kept in fp16 or read back into fp32; rounding an fp32 model to fp16 changes its values, its
latents and so its fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np
import torch

from zturbo.model.config import ModelConfig

# The state-dict prefixes and config fields that determine encode(x).mean.
ENCODER_PREFIXES = ("encoder.", "quant_conv.")
ENCODER_FIELDS = ("in_channels", "block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                  "mid_block_add_attention", "use_quant_conv")


def encoder_fingerprint(state: Mapping[str, torch.Tensor] | torch.nn.Module, config: ModelConfig | None = None) -> str:
    """``sha256:<hex>`` of the encoder-side tensors (as float32 values) and config fields.

    ``state``: a module with our (diffusers') key layout, or its state dict with ``config``.
    """
    if isinstance(state, torch.nn.Module):
        config = config or state.config
        state = state.state_dict()
    if config is None:
        raise ValueError("encoder_fingerprint needs the model's config with a state dict")
    digest = hashlib.sha256()
    fields = {name: getattr(config, name) for name in ENCODER_FIELDS}
    digest.update(json.dumps(fields, sort_keys=True).encode())
    for name in sorted(k for k in state if k.startswith(ENCODER_PREFIXES)):
        values = state[name].detach().to("cpu", torch.float32)
        digest.update(f"{name}:{tuple(values.shape)};".encode())
        digest.update(np.ascontiguousarray(values.numpy(), dtype="<f4"))
    return f"sha256:{digest.hexdigest()}"
