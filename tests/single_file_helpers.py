"""Small VAEs of each family's shape, and a hand-written LDM key table, for the single-file tests.

``ldm_by_hand`` names a diffusers-layout state dict the LDM way without zturbo's code: the
table below is written out here, and the tests check it against diffusers' own converter
(``convert_ldm_vae_checkpoint``), so a file it writes is a file from an independent writer.
"""

from __future__ import annotations

import torch

from zturbo.model import VAE, ModelConfig

# One shape per family (small widths), with its latent factors. 32 GroupNorm groups, as files
# without zturbo's metadata are read; FLUX.1's and FLUX.2's decoders are slimmer than their encoders.
WIDTHS = [32, 64, 64, 64]
SLIM = [32, 32, 64, 64]
NO_QUANT = {"use_quant_conv": False, "use_post_quant_conv": False}
SHAPES = {
    "flux1": {"block_out_channels": WIDTHS, "decoder_block_out_channels": SLIM, "latent_channels": 16, **NO_QUANT,
              "scaling_factor": 0.3611, "shift_factor": 0.1159},
    "sd3": {"block_out_channels": WIDTHS, "latent_channels": 16, **NO_QUANT, "scaling_factor": 1.5305,
            "shift_factor": 0.0609},
    "sdxl": {"block_out_channels": WIDTHS, "latent_channels": 4, "scaling_factor": 0.13025},
    "flux2": {"block_out_channels": WIDTHS, "decoder_block_out_channels": SLIM, "latent_channels": 32,
              "patch_size": [2, 2]},
}
SYMMETRIC = ("sd3", "sdxl")


def family_model(family: str, seed: int = 0, **overrides) -> VAE:
    """A random VAE of ``family``'s shape; FLUX.2's BatchNorm statistics random too."""
    torch.manual_seed(seed)
    vae = VAE(ModelConfig(**{**SHAPES[family], **overrides})).eval()
    if vae.config.patch_size is not None:
        vae.bn.running_mean.normal_()
        vae.bn.running_var.uniform_(0.5, 2.0)
        vae.bn.num_batches_tracked.fill_(7)
    return vae


def ldm_by_hand(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers names -> the original LDM names, written out independently of zturbo's table."""
    out = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv"):
            out[name] = tensor
            continue
        coder, rest = parts[0], parts[1:]
        if rest[0] in ("conv_in", "conv_out"):
            new = rest
        elif rest[0] == "conv_norm_out":
            new = ["norm_out", *rest[1:]]
        elif rest[0] == "mid_block" and rest[1] == "resnets":
            new = ["mid", f"block_{int(rest[2]) + 1}", *rest[3:]]
        elif rest[0] == "mid_block":  # attentions.0.<proj>.<param>
            proj = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[rest[3]]
            param = rest[-1]
            new = ["mid", "attn_1", proj, param]
            if proj != "norm" and param == "weight":
                tensor = tensor[:, :, None, None]  # LDM keeps these as 1x1 convs
        elif rest[0] == "down_blocks" and rest[2] == "resnets":
            new = ["down", rest[1], "block", rest[3], *rest[4:]]
        elif rest[0] == "down_blocks":
            new = ["down", rest[1], "downsample", "conv", rest[-1]]
        elif rest[2] == "resnets":
            new = ["up", str(levels - 1 - int(rest[1])), "block", rest[3], *rest[4:]]
        else:
            new = ["up", str(levels - 1 - int(rest[1])), "upsample", "conv", rest[-1]]
        out[".".join([coder, *new]).replace("conv_shortcut", "nin_shortcut")] = tensor.contiguous()
    return out
