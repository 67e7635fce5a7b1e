"""One .safetensors file that ComfyUI, Forge, InvokeAI, stable-diffusion.cpp and diffusers load.

    report = export_single_file(vae, Path("vae.safetensors"))                  # LDM/BFL keys, fp32
    report = export_single_file(vae, out, layout="diffusers", precision="bf16")

The full encoder and the (slim) decoder, in the LDM / BFL key layout these tools read
(``layout="diffusers"``: diffusers' names), FLUX.2 models as BFL's
``full_encoder_small_decoder.safetensors`` is laid out (quant convs inside encoder and
decoder, the ``bn`` statistics beside them). The safetensors metadata carries the zturbo
version, the config (factors included), the factors alone and the encoder fingerprint,
so ``zturbo.model.single_file`` reads the file back as it was written.

Loaders that build the architecture from a fixed table refuse what it cannot express, and
so does this writer unless ``force``: see ``loader_limits`` and docs/other-tools.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from zturbo.errors import UsageError, ZTurboError
from zturbo.model import VAE
from zturbo.model.config import ModelConfig
from zturbo.model.files import atomic_path
from zturbo.distill.fingerprint import encoder_fingerprint
from zturbo.model.latent_families import fitting_families
from zturbo.model.ldm_layout import as_conv1x1, to_ldm_name
from zturbo.model.safetensors_header import SAFETENSORS_SUFFIXES
from zturbo.model.single_file import (
    META_CONFIG,
    META_FINGERPRINT,
    META_LAYOUT,
    META_VERSION,
    open_single_file,
)
from zturbo.version import __version__

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = ("ldm", "diffusers")
# ComfyUI and stable-diffusion.cpp build the encoder at this width and every decoder at decoder_ch x this.
CH_MULT = (1, 2, 4, 4)
ENCODER_CH = 128


def loader_limits(config: ModelConfig, layout: str = "ldm") -> list[str]:
    """What the tools reading ``layout`` cannot express about ``config``, one phrase each (none: they load it).

    LDM/BFL layout: ComfyUI and stable-diffusion.cpp build an encoder of 128 x [1, 2, 4, 4],
    a decoder of decoder_ch x [1, 2, 4, 4] with decoder_ch = decoder.conv_in's width / 4, two
    ResNets per encoder level, mid-block attention and 32 GroupNorm groups, RGB in and out;
    ComfyUI builds both quant convs or neither, and stable-diffusion.cpp picks the latent
    interface from the diffusion model (SD/SDXL, FLUX.1/SD3/Z-Image or FLUX.2). diffusers
    layout: diffusers' AutoencoderKL holds one width list for encoder and decoder.
    """
    if layout == "diffusers":
        if config.patch_size is None and config.decoder_channels != config.block_out_channels:
            return [(f"diffusers' AutoencoderKL has one width list, and this decoder's {config.decoder_channels} "
                     f"differ from the encoder's {config.block_out_channels}")]
        return []
    limits = []
    tools = "ComfyUI and stable-diffusion.cpp"
    enc, dec = list(config.block_out_channels), config.decoder_channels
    if enc != [ENCODER_CH * m for m in CH_MULT]:
        limits.append(f"encoder widths {enc}: {tools} build the encoder at {ENCODER_CH} x {list(CH_MULT)}")
    if len(dec) != len(CH_MULT) or dec != [dec[0] * m for m in CH_MULT]:
        limits.append(f"decoder widths {dec} are not one base width x {list(CH_MULT)} ({tools} take the base as "
                      "decoder.conv_in's width / 4)")
    if config.layers_per_block != 2:
        limits.append(f"{config.layers_per_block} ResNets per encoder level: {tools} build 2 (3 per decoder level)")
    if not config.mid_block_add_attention:
        limits.append(f"no mid-block attention: {tools} always build it")
    if config.norm_num_groups != 32:
        limits.append(f"{config.norm_num_groups} GroupNorm groups: {tools} use 32")
    if (config.in_channels, config.out_channels) != (3, 3):
        limits.append(f"{config.in_channels} channels in, {config.out_channels} out: {tools} read and write RGB")
    if config.use_quant_conv != config.use_post_quant_conv:
        limits.append("one quant conv without the other: ComfyUI builds both or neither")
    elif not fitting_families(config.latent_channels, config.use_quant_conv, config.patch_size is not None):
        limits.append(f"{config.latent_channels} latent channels {'with' if config.use_quant_conv else 'without'} "
                      "quant convs: no diffusion model these tools run reads such latents")
    return limits


def single_file_tensors(vae: VAE, layout: str = "ldm", precision: str = "fp32") -> dict[str, torch.Tensor]:
    """The file's tensors, named for ``layout`` (FLUX.2 models in BFL's FLUX.2 layout), floats in ``precision``."""
    config = vae.config
    levels = len(config.block_out_channels)
    dtype = DTYPES[precision]
    out = {}
    for name, tensor in vae.state_dict().items():
        tensor = tensor.detach().to("cpu")
        tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
        if layout == "diffusers":
            out[name] = tensor.contiguous()
        else:
            out[to_ldm_name(name, levels, bfl_flux2=config.patch_size is not None)] = as_conv1x1(name, tensor).contiguous()
    return out


def export_single_file(
    vae: VAE, out: Path, layout: str = "ldm", precision: str = "fp32", force: bool = False, verify: bool = False,
    source: Path | None = None, log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write ``vae`` to ``out`` (atomically); with ``verify``, read it back and check every tensor and the config."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"{out} is a folder; --format single-file writes one file", "give --out NAME.safetensors")
    if out.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise UsageError(f"--out {out}: a single-file export is a .safetensors file", "give --out NAME.safetensors")
    limits = loader_limits(vae.config, layout)
    if limits and not force:
        raise UsageError(
            f"the tools that read {'an LDM/BFL' if layout == 'ldm' else 'a diffusers'}-layout single file cannot "
            f"load this model: {'; '.join(limits)}",
            "--force writes it anyway (zturbo reads it back whatever its shape)",
        )
    tensors = single_file_tensors(vae, layout, precision)
    written = _as_ours(vae, tensors, layout)
    config = vae.config
    metadata = {
        "format": "pt",
        META_VERSION: __version__,
        META_CONFIG: json.dumps(config.model_dump(mode="json")),
        META_LAYOUT: layout if layout == "diffusers" or config.patch_size is None else "bfl-flux2",
        META_FINGERPRINT: encoder_fingerprint(written, config),
        "zturbo_scaling_factor": repr(config.scaling_factor),
        "zturbo_shift_factor": repr(config.shift_factor),
        "zturbo_precision": precision,
    }
    (log or (lambda _: None))(f"writing {out} ({len(tensors)} tensors, {precision})")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        if verify:
            _read_back(tmp, written, config)
    report: dict[str, Any] = {
        "format": "single-file",
        "out": str(out),
        "source": str(source) if source else None,
        "layout": metadata[META_LAYOUT],
        "precision": precision,
        "bytes": out.stat().st_size,
        "parameters": vae.num_parameters,
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor,
        "encoder_fingerprint": metadata[META_FINGERPRINT],
        "loader_limits": limits,
    }
    if verify:
        report["verify"] = {"read_back": "bit-identical tensors, same config"}
    return report


def _as_ours(vae: VAE, tensors: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """The written tensors under our names and shapes (what reading the file gives back)."""
    if layout == "diffusers":
        return tensors
    levels = len(vae.config.block_out_channels)
    bfl = vae.config.patch_size is not None
    by_ldm = {to_ldm_name(name, levels, bfl_flux2=bfl): name for name in vae.state_dict()}
    return {by_ldm[k]: (t.reshape(t.shape[:2]) if t.dim() == 4 and ".attentions.0.to_" in by_ldm[k] else t)
            for k, t in tensors.items()}


def _read_back(path: Path, written: dict[str, torch.Tensor], config: ModelConfig) -> None:
    single = open_single_file(path)
    back = single.load().state_dict()
    differ = [k for k, v in written.items() if not torch.equal(back[k].to(v.dtype), v)]
    if differ or single.config != config:
        what = f"tensor {differ[0]}" if differ else "the config"
        raise ZTurboError(f"verification failed, nothing was written: {what} reads back differently")
