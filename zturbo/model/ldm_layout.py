"""The original LDM / BFL key layout of a VAE, both ways, against ours (diffusers' names).

    ours                                           LDM / BFL
    {c}.down_blocks.{i}.resnets.{j}.conv_shortcut  {c}.down.{i}.block.{j}.nin_shortcut
    {c}.down_blocks.{i}.downsamplers.0.conv        {c}.down.{i}.downsample.conv
    decoder.up_blocks.{k}.resnets.{j}.*            decoder.up.{n-1-k}.block.{j}.*   (LDM counts from full size)
    decoder.up_blocks.{k}.upsamplers.0.conv        decoder.up.{n-1-k}.upsample.conv
    {c}.mid_block.resnets.{0,1}                    {c}.mid.block_{1,2}
    {c}.mid_block.attentions.0.group_norm          {c}.mid.attn_1.norm
    {c}.mid_block.attentions.0.to_{q,k,v}          {c}.mid.attn_1.{q,k,v}       (1x1 convs there, linears here)
    {c}.mid_block.attentions.0.to_out.0            {c}.mid.attn_1.proj_out
    {c}.conv_norm_out                              {c}.norm_out
    quant_conv / post_quant_conv                   the same; BFL's FLUX.2 file: encoder.quant_conv / decoder.post_quant_conv
    bn.*                                           bn.* (FLUX.2's latent normaliser)

The SD / SDXL / SD3 checkpoints, FLUX.1's and Z-Image's ``ae.safetensors``, BFL's FLUX.2
files and ComfyUI's, Forge's and stable-diffusion.cpp's VAE loaders all use this layout.
Names only move; the attention weights change shape, (C, C, 1, 1) there and (C, C) here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_ATTENTION_FROM_LDM = {v: k for k, v in _ATTENTION_TO_LDM.items()}
_OURS = re.compile(
    r"(?P<coder>encoder|decoder)\.(?:"
    r"(?P<blocks>down_blocks|up_blocks)\.(?P<level>\d+)\.(?:resnets\.(?P<resnet>\d+)\.(?P<part>[^.]+)"
    r"|(?:down|up)samplers\.0\.conv)"
    r"|mid_block\.(?:resnets\.(?P<mid>\d+)\.(?P<midpart>[^.]+)|attentions\.0\.(?P<attn>group_norm|to_[qkv]|to_out\.0))"
    r"|(?P<plain>conv_in|conv_out|conv_norm_out))\.(?P<param>[^.]+)"
)
_LDM = re.compile(
    r"(?P<coder>encoder|decoder)\.(?:"
    r"(?P<blocks>down|up)\.(?P<level>\d+)\.(?:block\.(?P<resnet>\d+)\.(?P<part>[^.]+)|(?:down|up)sample\.conv)"
    r"|mid\.(?:block_(?P<mid>[12])\.(?P<midpart>[^.]+)|attn_1\.(?P<attn>norm|q|k|v|proj_out))"
    r"|(?P<plain>conv_in|conv_out|norm_out))\.(?P<param>[^.]+)"
)
_RESNET_PARTS = {"norm1", "conv1", "norm2", "conv2", "conv_shortcut", "nin_shortcut"}
# Where each layout keeps the FLUX.2 quant convs; the BatchNorm keys are the same in both.
_TOP_LEVEL = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
_BFL_FLUX2 = {"quant_conv": "encoder.quant_conv", "post_quant_conv": "decoder.post_quant_conv"}
BATCH_NORM_KEYS = ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")


def decoder_levels(names: Iterable[str], ldm: bool) -> int:
    """How many resolution levels the decoder has (the LDM index is reversed against ours)."""
    pattern = re.compile(r"decoder\.up\.(\d+)\." if ldm else r"decoder\.up_blocks\.(\d+)\.")
    levels = {int(m.group(1)) for n in names if (m := pattern.match(n))}
    return max(levels) + 1 if levels else 0


def to_ldm_name(name: str, levels: int, bfl_flux2: bool = False) -> str:
    """The LDM / BFL name of one of our keys (``bfl_flux2``: quant convs inside encoder / decoder)."""
    top, param = name.rsplit(".", 1) if "." in name else (name, "")
    if top in _TOP_LEVEL:
        return f"{(_BFL_FLUX2 if bfl_flux2 else _TOP_LEVEL)[top]}.{param}"
    if name in BATCH_NORM_KEYS:
        return name
    m = _OURS.fullmatch(name)
    if m is None:
        raise KeyError(name)
    coder, param = m["coder"], m["param"]
    if m["plain"]:
        return f"{coder}.{'norm_out' if m['plain'] == 'conv_norm_out' else m['plain']}.{param}"
    if m["attn"]:
        return f"{coder}.mid.attn_1.{_ATTENTION_TO_LDM[m['attn']]}.{param}"
    if m["mid"] is not None:
        return f"{coder}.mid.block_{int(m['mid']) + 1}.{_ldm_part(m['midpart'])}.{param}"
    down = m["blocks"] == "down_blocks"
    level = int(m["level"]) if down else levels - 1 - int(m["level"])
    stage = f"{coder}.{'down' if down else 'up'}.{level}"
    if m["resnet"] is None:
        return f"{stage}.{'downsample' if down else 'upsample'}.conv.{param}"
    return f"{stage}.block.{m['resnet']}.{_ldm_part(m['part'])}.{param}"


def from_ldm_name(name: str, levels: int) -> str | None:
    """Our name for an LDM / BFL key; None for a key no VAE of this layout has."""
    for ours, theirs in (*_TOP_LEVEL.items(), *_BFL_FLUX2.items()):
        if name.startswith(theirs + ".") and name.count(".") == theirs.count(".") + 1:
            return ours + name[len(theirs):]
    if name in BATCH_NORM_KEYS:
        return name
    m = _LDM.fullmatch(name)
    if m is None or (m["part"] or m["midpart"] or "norm1") not in _RESNET_PARTS:
        return None
    coder, param = m["coder"], m["param"]
    if m["plain"]:
        return f"{coder}.{'conv_norm_out' if m['plain'] == 'norm_out' else m['plain']}.{param}"
    if m["attn"]:
        return f"{coder}.mid_block.attentions.0.{_ATTENTION_FROM_LDM[m['attn']]}.{param}"
    if m["mid"] is not None:
        return f"{coder}.mid_block.resnets.{int(m['mid']) - 1}.{_our_part(m['midpart'])}.{param}"
    down = m["blocks"] == "down"
    if down != (coder == "encoder"):
        return None
    level = int(m["level"]) if down else levels - 1 - int(m["level"])
    if level < 0:
        return None
    stage = f"{coder}.{m['blocks']}_blocks.{level}"
    if m["resnet"] is None:
        return f"{stage}.{'downsamplers' if down else 'upsamplers'}.0.conv.{param}"
    return f"{stage}.resnets.{m['resnet']}.{_our_part(m['part'])}.{param}"


def is_attention_weight(name: str) -> bool:
    """One of the mid-block attention's projection weights (a linear here, a 1x1 conv in LDM files)."""
    return ".mid_block.attentions.0.to_" in name and name.endswith(".weight")


def as_linear(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Our shape for a tensor read under our name ``name``: 1x1-conv attention weights flattened."""
    if is_attention_weight(name) and tensor.dim() == 4:
        return tensor.reshape(tensor.shape[0], tensor.shape[1])
    return tensor


def as_conv1x1(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The LDM shape of our tensor ``name``: attention weights as (C, C, 1, 1) convs."""
    if is_attention_weight(name) and tensor.dim() == 2:
        return tensor.reshape(*tensor.shape, 1, 1)
    return tensor


def _ldm_part(part: str) -> str:
    return "nin_shortcut" if part == "conv_shortcut" else part


def _our_part(part: str) -> str:
    return "conv_shortcut" if part == "nin_shortcut" else part
