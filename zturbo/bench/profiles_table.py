"""Facts per profile for `zturbo config profiles`: sizes, parameters, counted FLOPs."""

from __future__ import annotations

from typing import Any

from zturbo.config import available_profiles, load_settings
from zturbo.bench.flops import parameter_count, vae_flops


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
                "resolution": res,
                "batch_size": s.train.batch_size,
                "block_out_channels": s.model.block_out_channels,
                "decoder_block_out_channels": s.model.decoder_channels,
                "latent_channels": s.model.latent_channels,
                "mid_block_attention": s.model.mid_block_add_attention,
                "learning_rate": s.train.learning_rate,
                "parameters": parameter_count(s.model),
                "encode_gflops": flops["encode"] / 1e9,
                "decode_gflops": flops["decode"] / 1e9,
            }
        )
    return rows
