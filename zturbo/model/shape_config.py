"""A VAE's architecture read from its tensor shapes (our key names), as the config fields that build it.

    fields = architecture(path, shapes, theirs)   # widths per level (encoder and decoder apart), ResNets per
                                                  # level, latent channels, attention, quant convs, BatchNorm
    check_shapes(path, ModelConfig(**fields), shapes, theirs)   # every tensor there, with its shape

What shapes cannot tell: the GroupNorm group count (a norm's weight has one value per
channel whatever the groups) and the sample size. Files without zturbo's metadata are
read with 32 groups, which every LDM-family VAE uses. ``theirs(name)`` gives a key's
name in the file, so each refusal names what the user can find in it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from zturbo.model.config import ModelConfig
from zturbo.model.errors import CheckpointError
from zturbo.model.vae import VAE

DECODER_SIDE = ("decoder.", "post_quant_conv.")
Shapes = dict[str, tuple[int, ...]]
Names = Callable[[str], str]


def architecture(path: Path, shapes: Shapes, theirs: Names) -> dict:
    """The ModelConfig fields of the VAE whose tensors have ``shapes`` (norm groups 32)."""
    encoder = encoder_fields(path, shapes, theirs)
    fields = {**encoder, **decoder_fields(path, shapes, theirs, encoder), "norm_num_groups": 32}
    if fields["decoder_block_out_channels"] == fields["block_out_channels"]:
        fields["decoder_block_out_channels"] = None
    return fields


def encoder_fields(path: Path, shapes: Shapes, theirs: Names) -> dict:
    levels = _levels(shapes, r"encoder\.down_blocks\.(\d+)\.")
    if not levels:
        _lacks(path, "encoder.down_blocks.0.resnets.0.conv1.weight", theirs)
    widths = [_need(path, shapes, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", theirs)[0] for i in range(levels)]
    layers = {_resnets(shapes, f"encoder.down_blocks.{i}") for i in range(levels)}
    if len(layers) != 1:
        raise CheckpointError(f"{path}: its encoder levels hold different numbers of ResNets {sorted(layers)}")
    moments = _need(path, shapes, "encoder.conv_out.weight", theirs)[0]
    return {
        "in_channels": _need(path, shapes, "encoder.conv_in.weight", theirs)[1],
        "block_out_channels": widths,
        "layers_per_block": layers.pop(),
        "latent_channels": moments // 2,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in shapes,
        "use_quant_conv": "quant_conv.weight" in shapes,
    }


def decoder_fields(path: Path, shapes: Shapes, theirs: Names, encoder: dict | ModelConfig) -> dict:
    """The decoder's fields, checked against the ``encoder`` side (its fields, or the config of a model
    completing a decoder-only file)."""
    enc = encoder.model_dump() if isinstance(encoder, ModelConfig) else encoder
    levels = len(enc["block_out_channels"])
    found = _levels(shapes, r"decoder\.up_blocks\.(\d+)\.")
    if found != levels:
        raise CheckpointError(f"{path}: its decoder has {found} levels, its encoder {levels} "
                              "(the decoder must upsample as much as the encoder downsamples)")
    widths = [_need(path, shapes, f"decoder.up_blocks.{levels - 1 - i}.resnets.0.conv1.weight", theirs)[0]
              for i in range(levels)]
    layers = {_resnets(shapes, f"decoder.up_blocks.{i}") for i in range(levels)}
    if layers != {enc["layers_per_block"] + 1}:
        raise CheckpointError(
            f"{path}: its decoder levels hold {sorted(layers)} ResNets, its encoder levels "
            f"{enc['layers_per_block']}; an AutoencoderKL decoder holds one more per level than its encoder"
        )
    attention = "decoder.mid_block.attentions.0.to_q.weight" in shapes
    if attention != enc["mid_block_add_attention"]:
        has, lacks = ("decoder", "encoder") if attention else ("encoder", "decoder")
        raise CheckpointError(f"{path}: its {has} has mid-block attention and its {lacks} has none; "
                              "zturbo builds both or neither")
    latent = _need(path, shapes, "decoder.conv_in.weight", theirs)[1]
    if latent != enc["latent_channels"]:
        raise CheckpointError(f"{path}: its decoder takes {latent} latent channels, the encoder gives "
                              f"{enc['latent_channels']}")
    fields = {
        "decoder_block_out_channels": widths,
        "out_channels": _need(path, shapes, "decoder.conv_out.weight", theirs)[0],
        "use_post_quant_conv": "post_quant_conv.weight" in shapes or (
            isinstance(encoder, ModelConfig) and encoder.use_post_quant_conv),
        "patch_size": enc.get("patch_size"),
    }
    if "bn.running_mean" in shapes:
        channels = shapes["bn.running_mean"][0]
        if channels != 4 * latent:
            raise CheckpointError(f"{path}: its {theirs('bn.running_mean')} has {channels} channels; FLUX.2's "
                                  f"normaliser has 4 per latent channel ({4 * latent}) for its 2x2 patches")
        fields["patch_size"] = [2, 2]
    return fields


def check_shapes(path: Path, config: ModelConfig, shapes: Shapes, theirs: Names) -> None:
    """One line naming what in the file does not match the model ``config`` builds (missing, extra, wrong shape)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in VAE(config).state_dict().items()}
    expected.pop("bn.num_batches_tracked", None)  # BatchNorm's step count: 0 when a file leaves it out
    shapes = {k: v for k, v in shapes.items() if k != "bn.num_batches_tracked"}
    missing = [k for k in expected if k not in shapes]
    extra = [k for k in shapes if k not in expected]
    wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    if missing:
        _lacks(path, missing[0], theirs, f" ({len(missing)} tensors missing)" if len(missing) > 1 else "")
    if extra:
        raise CheckpointError(f"{path}: {theirs(extra[0])} has no place in the VAE its other shapes describe")
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{path}: {theirs(k)} has shape {list(shapes[k])} where the architecture its other "
                              f"shapes describe needs {list(expected[k])}")


def _levels(shapes: Shapes, pattern: str) -> int:
    found = {int(m.group(1)) for name in shapes if (m := re.match(pattern, name))}
    return max(found) + 1 if found else 0


def _resnets(shapes: Shapes, stage: str) -> int:
    return _levels(shapes, re.escape(stage) + r"\.resnets\.(\d+)\.conv1\.weight$")


def _need(path: Path, shapes: Shapes, name: str, theirs: Names) -> tuple[int, ...]:
    if name not in shapes:
        _lacks(path, name, theirs)
    return shapes[name]


def _lacks(path: Path, name: str, theirs: Names, more: str = "") -> None:
    raise CheckpointError(f"{path} lacks {theirs(name)}{more}, which a VAE of its layout holds (truncated export?)")
