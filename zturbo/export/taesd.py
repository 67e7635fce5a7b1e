"""A tiny model as madebyollin ships TAESD, and as ComfyUI loads it.

    zturbo export runs/tiny-flux --format taesd --out out/taef1
    # out/taef1/taef1_encoder.safetensors, taef1_decoder.safetensors   (taesd.py's state dicts)
    # out/taef1/taef1.safetensors                                      (ComfyUI's combined VAE file)

The encoder and decoder files hold taesd.py's ``nn.Sequential`` state dicts
(``zturbo.model.taesd_layout``): ComfyUI's ``models/vae_approx`` takes them for live previews and,
named ``taesd_``, ``taesdxl_``, ``taesd3_`` or ``taef1_``, offers the pair as a VAE with that family's
factors. Their prefix is the family whose scaling and shift factors the model's teacher has
(``taesd`` when none matches). The combined file (``models/vae``) carries the teacher's factors itself
(``vae_scale``, ``vae_shift``) and zturbo's config in its metadata, so zturbo reads it back too.
Files are written to temporary names and renamed into place, the combined file last.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from zturbo.errors import UsageError
from zturbo.export.layout import prepare_out_dir
from zturbo.model import TinyVAE
from zturbo.model.files import atomic_path
from zturbo.model.latent_families import FAMILIES
from zturbo.model.single_file import META_CONFIG, META_VERSION, open_single_file
from zturbo.model.taesd_layout import combined, published_architecture, to_taesd
from zturbo.version import __version__

# madebyollin's file prefix per latent family (ComfyUI's VAE loader names the same four).
PREFIXES = {"sd1": "taesd", "sdxl": "taesdxl", "sd3": "taesd3", "flux1": "taef1"}


def file_prefix(vae: TinyVAE) -> str:
    """The prefix of the family whose factors the teacher has; ``taesd`` when none matches."""
    c = vae.config
    for name, prefix in PREFIXES.items():
        family = FAMILIES[name]
        if (family.latent_channels, family.scaling_factor, family.shift_factor) == (
                c.latent_channels, c.vae_scale, c.vae_shift):
            return prefix
    return "taesd"


def export_taesd(vae, out: Path, force: bool = False, verify: bool = False, source: Path | None = None,
                 log=None) -> dict[str, Any]:
    """Write ``vae`` (a TinyVAE) as ``PREFIX_encoder`` / ``PREFIX_decoder.safetensors`` and ``PREFIX.safetensors``
    in the folder ``out``. ``force`` writes an architecture other than the published one (which the other
    tools' loaders do not build); ``verify`` reads the combined file back and compares its decode."""
    if not isinstance(vae, TinyVAE):
        raise UsageError("--format taesd writes tiny models (AutoencoderTiny); this is an AutoencoderKL",
                         "distil a tiny one: zturbo train --teacher MODEL --architecture tiny")
    differences = published_architecture(vae.config)
    if differences and not force:
        raise UsageError(f"taesd.py and ComfyUI build the published TAESD architecture only; this model has "
                         f"{'; '.join(differences)}", "export --format diffusers, or --force to write it anyway")
    out = prepare_out_dir(out)
    prefix = file_prefix(vae)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in vae.state_dict().items()}
    parts = to_taesd(state)
    metadata = {"format": "pt", META_VERSION: __version__}
    files = {}
    for side in ("encoder", "decoder"):
        files[side] = _write(out / f"{prefix}_{side}.safetensors", parts[side], metadata)
    c = vae.config
    config_json = json.dumps(c.model_dump(mode="json"))
    files["combined"] = _write(out / f"{prefix}.safetensors", combined(state, c.vae_scale, c.vae_shift),
                               {**metadata, META_CONFIG: config_json})
    (log or (lambda _: None))(f"wrote {', '.join(p.name for p in files.values())} to {out}")
    report: dict[str, Any] = {
        "format": "taesd",
        "out": str(out),
        "source": str(source) if source else None,
        "files": {k: str(v) for k, v in files.items()},
        "vae_scale": c.vae_scale,
        "vae_shift": c.vae_shift,
        "published_architecture": not differences,
        "parameters": vae.num_parameters,
    }
    if verify:
        report["verify"] = _read_back(vae, files["combined"])
    return report


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _read_back(vae: TinyVAE, path: Path) -> dict[str, Any]:
    """The combined file read back by zturbo: its config must equal the model's, and its decode be the same."""
    back = open_single_file(path).load()
    if back.config != vae.config:
        raise UsageError(f"{path} reads back as another model ({back.config} against {vae.config})")
    f = vae.config.downsample_factor
    z = torch.randn(1, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        difference = (back.decode(z) - vae.float().decode(z)).abs().max().item()
    if difference != 0:
        raise UsageError(f"{path} read back decodes other images than the model (max abs difference {difference:.3g})")
    return {"read_back": f"same config, bit-identical decode at {8 * f} px"}
