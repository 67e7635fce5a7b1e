"""madebyollin's TAESD file layout and ComfyUI's combined TAESD file, both ways.

madebyollin's ``taesd.py`` builds each coder as one ``nn.Sequential`` and its files
(``taesd_encoder.safetensors``, ``taef1_decoder.safetensors``, ...) hold that module's state
dict. The encoder's indices are diffusers' ``EncoderTiny.layers``' (``encoder.layers.N`` <-> ``N``);
the decoder's start with its ``Clamp`` (index 0), one ahead of ``DecoderTiny.layers``
(``decoder.layers.N`` <-> ``N + 1``). ComfyUI reads one file holding both, under ``taesd_encoder.``
and ``taesd_decoder.``, with the teacher's latent factors as 0-d tensors ``vae_scale`` and
``vae_shift`` (its ``VAE`` decodes ``taesd_decoder((z - vae_shift) * vae_scale)`` of a raw latent).

Those loaders build the published architecture only (64 channels, 1-3-3-3 encoder and 3-3-3-1
decoder blocks, 3-channel images); ``published_architecture`` says how a config differs from it.
"""

from __future__ import annotations

import re
from itertools import pairwise
from typing import Any

import torch

from zturbo.model.config import TinyConfig

ENCODER_PREFIX = "taesd_encoder."
DECODER_PREFIX = "taesd_decoder."
SCALE_KEY, SHIFT_KEY = "vae_scale", "vae_shift"
# The decoder's Clamp is module 0 of taesd.py's Sequential and no layer of diffusers' DecoderTiny.
_OFFSET = {"encoder": 0, "decoder": 1}
_NAME = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.(.+)")
_FILE_NAME = re.compile(r"(\d+)\.(.+)")
PUBLISHED = TinyConfig()  # the architecture of madebyollin's files (any latent channel count)


def to_taesd(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Our (diffusers') state dict as taesd.py's two state dicts: {"encoder": {...}, "decoder": {...}}."""
    out: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "decoder": {}}
    for name, tensor in state.items():
        match = _NAME.fullmatch(name)
        if match is None:
            raise KeyError(f"{name} is no AutoencoderTiny weight")
        side, index, rest = match.groups()
        out[side][f"{int(index) + _OFFSET[side]}.{rest}"] = tensor
    return out


def from_taesd(side: str, name: str) -> str | None:
    """Our name of taesd.py's ``name`` in its ``side`` ("encoder" / "decoder") file; None for no layer of ours."""
    match = _FILE_NAME.fullmatch(name)
    if match is None or int(match.group(1)) < _OFFSET[side]:
        return None
    return f"{side}.layers.{int(match.group(1)) - _OFFSET[side]}.{match.group(2)}"


def combined(state: dict[str, torch.Tensor], vae_scale: float, vae_shift: float) -> dict[str, torch.Tensor]:
    """ComfyUI's combined file: both coders under their prefixes, and the teacher's factors."""
    parts = to_taesd(state)
    out = {ENCODER_PREFIX + k: v for k, v in parts["encoder"].items()}
    out.update({DECODER_PREFIX + k: v for k, v in parts["decoder"].items()})
    out[SCALE_KEY] = torch.tensor(float(vae_scale))
    out[SHIFT_KEY] = torch.tensor(float(vae_shift))
    return out


def is_combined(names: list[str]) -> bool:
    return any(n.startswith(DECODER_PREFIX) for n in names) and any(n.startswith(ENCODER_PREFIX) for n in names)


def our_names(names: list[str]) -> tuple[dict[str, str], list[str]]:
    """({our name: the combined file's}, the file's names that are none of ours)."""
    keys, unknown = {}, []
    for name in names:
        if name in (SCALE_KEY, SHIFT_KEY):
            continue
        side = "encoder" if name.startswith(ENCODER_PREFIX) else "decoder" if name.startswith(DECODER_PREFIX) else None
        ours = from_taesd(side, name.split(".", 1)[1]) if side else None
        if ours is None:
            unknown.append(name)
        else:
            keys[ours] = name
    return keys, unknown


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """TinyConfig fields from our names' shapes. Either coder is convolutions with blocks between them;
    level i holds the blocks between its i-th and (i+1)-th convolution (parameter-free layers hold no key)."""
    fields: dict[str, Any] = {}
    for side in ("encoder", "decoder"):
        params: dict[int, set[str]] = {}
        for name in shapes:
            match = _NAME.fullmatch(name)
            if match and match.group(1) == side:
                params.setdefault(int(match.group(2)), set()).add(match.group(3))
        blocks = [i for i in sorted(params) if "conv.0.weight" in params[i]]
        convs = [i for i in sorted(params) if "weight" in params[i]]
        if len(convs) < 2:
            raise KeyError(f"the {side} has {len(convs)} convolution(s) outside its blocks; a TAESD coder has at least 2")
        counts = [sum(lo < b < hi for b in blocks) for lo, hi in pairwise(convs)]
        first, last = shapes[f"{side}.layers.{convs[0]}.weight"], shapes[f"{side}.layers.{convs[-1]}.weight"]
        fields[f"{side}_block_out_channels"] = [first[0]] * len(counts)
        fields[f"num_{side}_blocks"] = counts
        if side == "encoder":
            fields.update(in_channels=first[1], latent_channels=last[0])
        else:
            fields["out_channels"] = last[0]
    return fields


def published_architecture(config: TinyConfig) -> list[str]:
    """How ``config`` differs from the architecture madebyollin's and ComfyUI's loaders build (none: [])."""
    differences = []
    for name in ("in_channels", "out_channels", "encoder_block_out_channels", "decoder_block_out_channels",
                 "num_encoder_blocks", "num_decoder_blocks"):
        if getattr(config, name) != getattr(PUBLISHED, name):
            differences.append(f"{name} {getattr(config, name)} (the published {getattr(PUBLISHED, name)})")
    return differences
