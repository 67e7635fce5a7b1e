"""Facts per profile for `zturbo config profiles`: sizes, parameters, counted FLOPs."""

from __future__ import annotations

from typing import Any

from zturbo.bench.flops import parameter_count, vae_flops
from zturbo.config import available_profiles, load_settings
from zturbo.model import TinyConfig


def profile_rows() -> list[dict[str, Any]]:
    rows = []
    for name in available_profiles():
        s = load_settings(name)
        res = s.data.image_size
        flops = vae_flops(s.model, res)
        rows.append(
            {
                "profile": name,
                "description": s.description,
                "architecture": s.model.architecture,
                "resolution": res,
                "batch_size": s.train.batch_size,
                **_widths(s.model),
                "latent_channels": s.model.latent_channels,
                "learning_rate": s.train.learning_rate,
                "parameters": parameter_count(s.model),
                "encode_gflops": flops["encode"] / 1e9,
                "decode_gflops": flops["decode"] / 1e9,
            }
        )
    return rows


def _widths(model) -> dict[str, Any]:
    """The coders' widths (and a tiny model's blocks per level); whether the decoder has attention."""
    if isinstance(model, TinyConfig):
        return {"block_out_channels": model.encoder_block_out_channels,
                "decoder_block_out_channels": model.decoder_block_out_channels,
                "num_encoder_blocks": model.num_encoder_blocks, "num_decoder_blocks": model.num_decoder_blocks,
                "mid_block_attention": False}
    return {"block_out_channels": model.block_out_channels, "decoder_block_out_channels": model.decoder_channels,
            "mid_block_attention": model.mid_block_add_attention}

