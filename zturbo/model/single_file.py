"""A VAE held as one .safetensors file, in any of the layouts people hold it, read as a zturbo VAE.

    single = open_single_file("ae.safetensors", latent_family="flux1")   # the header only
    single.note      # 'ae.safetensors: LDM/BFL layout, ...; latent factors of FLUX.1 / Z-Image (...), from --latent-family'
    vae = single.load()

Layouts read (``zturbo.model.ldm_layout`` has the key table):

- the original LDM / BFL keys: FLUX.1's and Z-Image's ``ae.safetensors``, SD / SDXL VAE files;
- BFL's FLUX.2 files (``bn.*``, ``encoder.quant_conv``, ``decoder.post_quant_conv``);
- diffusers' key names in one file (older attention names too);
- the VAE inside a full checkpoint, under ``first_stage_model.`` or ``vae.`` (the rest is left unread).

The architecture comes from the tensor shapes (``zturbo.model.shape_config``). The latent
factors are not in these files; they come from, in this order: ``latent_family`` (the
``--latent-family`` flag), the metadata zturbo writes into its own files, the other weights
of a full checkpoint (an SDXL UNet beside the VAE says SDXL), or the shapes when exactly one
known family fits them (``zturbo.model.latent_families``). A shape several families share
(FLUX.1 and SD3; SDXL and SD1) with nothing else to decide is refused, naming the choices.
``note`` says in one line which was used. Keys under ``loss.`` (an LDM training run's
discriminator and LPIPS, kept in some released files) are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open

from zturbo.model.config import ModelConfig, format_validation_error
from zturbo.model.errors import CheckpointError, UsageError
from zturbo.model.latent_families import LatentFamily, family_names, find_family, fitting_families
from zturbo.model.ldm_layout import as_linear, decoder_levels, from_ldm_name, to_ldm_name
from zturbo.model.safetensors_header import read_header
from zturbo.model.shape_config import DECODER_SIDE, architecture, check_shapes, decoder_fields
from zturbo.model.vae import VAE, load_state_dict_strict

PREFIXES = ("first_stage_model.", "vae.")
IGNORED_PREFIXES = ("loss.",)
META_CONFIG = "zturbo_config"  # safetensors metadata keys zturbo writes (zturbo.export.single_file)
META_VERSION = "zturbo_version"
META_FINGERPRINT = "zturbo_encoder_fingerprint"
META_LAYOUT = "zturbo_layout"
# Weights beside a full checkpoint's VAE that name the model it belongs to.
_CONTEXT = (
    ("conditioner.embedders.", "sdxl"),
    ("cond_stage_model.", "sd1"),
    ("model.diffusion_model.joint_blocks.", "sd3"),
    ("model.diffusion_model.double_blocks.", "flux1"),
)
_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
_DIFFUSERS_MARKERS = (".down_blocks.", ".up_blocks.", ".mid_block.")
_LDM_MARKERS = (".down.", ".up.", ".mid.")
LAYOUTS = {"ldm": "LDM/BFL", "bfl-flux2": "BFL FLUX.2", "diffusers": "diffusers"}


@dataclass(frozen=True)
class SingleFile:
    """A resolved single file: what to read from it (``keys``: our name -> the file's) and the model it makes."""

    path: Path
    layout: str
    prefix: str
    keys: dict[str, str] = field(repr=False)
    config: ModelConfig = field(repr=False)
    note: str = ""
    # Tensors from another model (--encoder-from) completing a decoder-only file.
    base: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def load(self, map_location: str | torch.device = "cpu") -> VAE:
        try:
            with safe_open(str(self.path), framework="pt", device=str(map_location)) as fh:
                state = {ours: as_linear(ours, fh.get_tensor(theirs)) for ours, theirs in self.keys.items()}
        except Exception as exc:  # safetensors raises its own error type on a damaged file
            raise CheckpointError(f"cannot read {self.path}: {str(exc).splitlines()[0]}") from exc
        if self.base is not None:
            state = {**{k: v.to(map_location) for k, v in self.base.items()}, **state}
        if "bn.running_mean" in state and "bn.num_batches_tracked" not in state:
            state["bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long, device=map_location)
        with torch.device("meta"):
            vae = VAE(self.config)
        vae = vae.to_empty(device=map_location)
        load_state_dict_strict(vae, state, str(self.path))
        return vae.eval()


def read_single_file(path: str | Path, latent_family: str | None = None,
                     map_location: str | torch.device = "cpu") -> VAE:
    return open_single_file(path, latent_family).load(map_location)


def open_single_file(path: str | Path, latent_family: str | None = None, encoder: VAE | None = None) -> SingleFile:
    """The model a single file holds, from its header; CheckpointError / UsageError (one line) when it cannot be read.

    ``encoder``: the model whose encoder (and latent factors) complete a decoder-only file.
    """
    path = Path(path)
    header = read_header(path)
    names = list(header.tensors)
    prefix = _vae_prefix(names)
    layout, keys = _our_names(path, prefix, names)
    shapes = {ours: _our_shape(ours, header.tensors[theirs].shape) for ours, theirs in keys.items()}
    theirs = lambda ours: _file_name(ours, layout, prefix, keys, names)
    has_encoder = any(k.startswith(("encoder.", "quant_conv.")) for k in keys)
    if not has_encoder:
        return _join_decoder(path, layout, prefix, keys, shapes, encoder, theirs)
    if encoder is not None:
        raise UsageError(f"{path} holds an encoder of its own; --encoder-from completes decoder-only files")
    fields = architecture(path, shapes, theirs)
    meta = _metadata_config(path, header.metadata)
    config, how = _choose_factors(path, fields, meta, latent_family, _context(names, prefix))
    check_shapes(path, config, shapes, theirs)
    where = f" ({prefix.rstrip('.')} part of a checkpoint)" if prefix else ""
    dec = "" if config.decoder_block_out_channels is None else f", decoder {config.decoder_channels}"
    note = (f"{path.name}: {LAYOUTS[layout]} layout{where}, encoder {config.block_out_channels}{dec}, "
            f"{config.latent_channels} latent channels; {how}")
    return SingleFile(path, layout, prefix, keys, config, note)


def _vae_prefix(names: list[str]) -> str:
    """The prefix the VAE sits under in a full checkpoint ('' for a VAE file)."""
    for prefix in PREFIXES:
        if any(n.startswith((prefix + "encoder.", prefix + "decoder.")) for n in names):
            return prefix
    return ""


def _our_names(path: Path, prefix: str, names: list[str]) -> tuple[str, dict[str, str]]:
    """The layout and {our name: the file's name} of every VAE tensor; refuses the first key of neither layout."""
    vae_names = sorted(n[len(prefix):] for n in names if n.startswith(prefix) and not n[len(prefix):].startswith(
        IGNORED_PREFIXES))
    if not vae_names:
        raise CheckpointError(f"{path} holds no tensors", "give a VAE .safetensors file")
    if any(m in n for n in vae_names for m in _DIFFUSERS_MARKERS):
        layout, mapped = "diffusers", {n: _diffusers_name(n) for n in vae_names}
    elif any(m in n for n in vae_names for m in _LDM_MARKERS):
        levels = decoder_levels(vae_names, ldm=True)
        mapped = {n: from_ldm_name(n, levels) for n in vae_names}
        flux2 = any(n.startswith(("encoder.quant_conv.", "decoder.post_quant_conv.")) for n in vae_names)
        layout = "bfl-flux2" if flux2 else "ldm"
    else:
        raise CheckpointError(
            f"{path} is no VAE layout zturbo reads (LDM/BFL or diffusers key names): "
            f"first unexpected key '{prefix}{vae_names[0]}'",
            "give a VAE file (FLUX.1/Z-Image ae.safetensors, an SD/SDXL VAE, a FLUX.2 VAE) or a checkpoint holding one",
        )
    unexpected = [n for n, ours in mapped.items() if ours is None]
    if unexpected:
        raise CheckpointError(
            f"{path} is no {LAYOUTS[layout]} VAE zturbo reads: first unexpected key '{prefix}{unexpected[0]}'",
            "zturbo reads AutoencoderKL-family VAEs (the FLUX.1, SD, SDXL, SD3 and FLUX.2 architecture)",
        )
    return layout, {ours: prefix + n for n, ours in mapped.items()}


def _diffusers_name(name: str) -> str | None:
    for old, new in _LEGACY_ATTENTION.items():
        name = name.replace(old, new)
    try:
        to_ldm_name(name, levels=1 << 30)  # our names are exactly the keys this table knows
    except KeyError:
        return None
    return name


def _our_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(as_linear(name, torch.empty(shape, device="meta")).shape)


def _file_name(ours: str, layout: str, prefix: str, keys: dict[str, str], names: list[str]) -> str:
    """The name ``ours`` has (or would have) in this file, for refusals."""
    if ours in keys:
        return keys[ours]
    if layout == "diffusers":
        return prefix + ours
    return prefix + to_ldm_name(ours, decoder_levels(names, ldm=True), bfl_flux2=layout == "bfl-flux2")


def _context(names: list[str], prefix: str) -> str | None:
    """The family a full checkpoint's other weights name, if any."""
    if not prefix:
        return None
    for marker, family in _CONTEXT:
        if any(n.startswith(marker) for n in names):
            return family
    return None


def _metadata_config(path: Path, metadata: dict[str, str]) -> ModelConfig | None:
    text = metadata.get(META_CONFIG)
    if text is None:
        return None
    try:
        return ModelConfig(**json.loads(text))
    except (ValueError, TypeError) as exc:  # JSONDecodeError and ValidationError are ValueErrors
        detail = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise CheckpointError(f"{path} has corrupt zturbo metadata ({META_CONFIG}): {detail}") from exc


def _choose_factors(path: Path, fields: dict, meta: ModelConfig | None, family_name: str | None,
                    context: str | None) -> tuple[ModelConfig, str]:
    """The config with its latent factors, and one line saying where the factors came from."""
    latent, quant, bn = fields["latent_channels"], fields["use_quant_conv"], fields["patch_size"] is not None
    shape = f"{latent} latent channels, {'with' if quant else 'no'} quant convs{', BatchNorm' if bn else ''}"
    if family_name is not None:
        family = find_family(family_name)
        if family is None:
            raise UsageError(f"--latent-family {family_name} is no family zturbo knows",
                             f"choose one of: {family_names()}")
        if not family.fits(latent, quant, bn):
            raise UsageError(f"--latent-family {family_name} does not fit {path}: the file has {shape}, "
                             f"{family.label} latents have {family.latent_channels} channels")
        how = f"latent factors of {family.label} ({family.factors}), from --latent-family"
        return _with_family(path, meta or fields, family), how
    if meta is not None:
        return meta, (f"config and latent factors from zturbo's metadata in the file "
                      f"(scaling {meta.scaling_factor:g}, shift {meta.shift_factor:g})")
    fits = fitting_families(latent, quant, bn)
    by_context = [f for f in fits if f.name == context]
    if by_context:
        family = by_context[0]
        return _with_family(path, fields, family), (f"latent factors of {family.label} ({family.factors}), "
                                                    "as the checkpoint's other weights are that model's")
    if len(fits) == 1:
        family = fits[0]
        return _with_family(path, fields, family), (f"latent factors of {family.label} ({family.factors}), "
                                                    f"the only family with {shape}")
    if not fits:
        return _with_family(path, fields, None), (f"no known family has {shape}: latent factors left at "
                                                  "scaling 1, shift 0")
    choices = "; ".join(f"{f.name} ({f.label}: {f.factors})" for f in fits)
    raise UsageError(
        f"{path} does not hold its latent factors, and its latent shape ({shape}) fits several families: {choices}",
        f"name the one it is: --latent-family {' or --latent-family '.join(f.name for f in fits)}",
    )


def _with_family(path: Path, base: dict | ModelConfig, family: LatentFamily | None) -> ModelConfig:
    fields = dict(base.model_dump() if isinstance(base, ModelConfig) else base)
    if family is not None and family.batch_norm:
        fields.update(scaling_factor=1.0, shift_factor=0.0, latents_mean=None, latents_std=None)
    elif family is not None:
        fields.update(scaling_factor=family.scaling_factor, shift_factor=family.shift_factor,
                      latents_mean=None, latents_std=None)
    if not isinstance(base, ModelConfig) and family is not None:
        fields["sample_size"] = family.sample_size
    return _config(path, fields)


def _config(path: Path, fields: dict) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except ValidationError as exc:
        raise CheckpointError(f"{path} holds a VAE zturbo cannot build: {format_validation_error(exc)}",
                              "files without zturbo's metadata are read with 32 GroupNorm groups, as every "
                              "LDM-family VAE has") from exc


def _join_decoder(path: Path, layout: str, prefix: str, keys: dict[str, str], shapes: dict, encoder: VAE | None,
                  theirs) -> SingleFile:
    """A decoder-only file completed by ``encoder``'s encoder, quant conv and latent factors."""
    if not any(k.startswith("decoder.") for k in keys):
        raise CheckpointError(f"{path} holds neither an encoder nor a decoder")
    if encoder is None:
        raise CheckpointError(
            f"{path} holds a decoder only (no encoder.* weights); zturbo needs the encoder whose latents it decodes",
            f"join it with that VAE first: zturbo import {path} --encoder-from TEACHER --out MODEL_DIR",
        )
    teacher = encoder.config
    fields = {**teacher.model_dump(), **decoder_fields(path, shapes, theirs, teacher)}
    if fields["decoder_block_out_channels"] == fields["block_out_channels"]:
        fields["decoder_block_out_channels"] = None
    config = _config(path, fields)
    base = {k: v.detach() for k, v in encoder.state_dict().items()
            if not k.startswith(DECODER_SIDE) or (k.startswith("post_quant_conv.") and "post_quant_conv.weight"
                                                   not in keys)}
    check_shapes(path, config, {**{k: tuple(v.shape) for k, v in base.items()}, **shapes}, theirs)
    note = (f"{path.name}: {LAYOUTS[layout]} decoder {config.decoder_channels}, joined with the --encoder-from "
            f"model's encoder {config.block_out_channels} and its latent factors (scaling "
            f"{config.scaling_factor:g}, shift {config.shift_factor:g})")
    return SingleFile(path, layout, prefix, keys, config, note, base=base)
