"""diffusers' AutoencoderKL folder format, both ways.

Export: the EMA weights as a folder ``diffusers.AutoencoderKL.from_pretrained``
loads (config.json with scaling and shift factors + safetensors). Our state
dict already uses diffusers' key layout, so this is a save with a check.

Import: a diffusers VAE folder (for example FLUX.1's ``vae/``, in fp32, fp16 or
bf16, safetensors or a weights-only .bin, old or new attention key names) as a
zturbo model folder, so a standard VAE can be evaluated and benchmarked next to
a turbo one with the same tools.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zturbo.errors import CheckpointError, require

# Attention parameter names of diffusers checkpoints written before the Attention refactor.
_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
_COMPARE_SIZE = 64


def _nolog(_: str) -> None:
    pass


def export_diffusers(
    vae, out: Path, verify: bool = False, source: Path | None = None, log=None
) -> dict[str, Any]:
    """Write ``vae`` as a diffusers AutoencoderKL folder; with ``verify``, load it with diffusers and compare."""
    (log or _nolog)(f"writing diffusers AutoencoderKL folder {out}")
    save_model_folder(vae, out)
    report: dict[str, Any] = {
        "format": "diffusers",
        "out": str(out),
        "source": str(source) if source else None,
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": vae.config.shift_factor,
        "parameters": vae.num_parameters,
    }
    if verify:
        report["verify"] = compare_with_diffusers(vae, out)
    return report


def save_model_folder(vae, out: Path) -> None:
    """``save_pretrained`` into ``out`` without ever pairing new weights with an old config.

    Written in a staging folder inside ``out``; the old config.json goes first,
    the new weights move in, the new config.json last.
    """
    import contextlib
    import os
    import shutil
    import tempfile

    from zturbo.model.io import CONFIG_NAME

    staging = Path(tempfile.mkdtemp(prefix=".zturbo-save-", dir=out))
    try:
        vae.save_pretrained(staging)
        with contextlib.suppress(FileNotFoundError):
            (out / CONFIG_NAME).unlink()
        for path in sorted(staging.iterdir(), key=lambda p: p.name == CONFIG_NAME):
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def find_vae_folder(path: str | Path) -> Path:
    """The folder holding the VAE's config.json: ``path`` itself or a pipeline's ``vae/`` sub-folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"diffusers folder not found: {path}")
    for candidate in (path, path / "vae"):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(
        f"{path} holds no diffusers VAE (no config.json here or in vae/)",
        "give the folder of an AutoencoderKL (e.g. FLUX.1-dev/vae) or the pipeline folder above it",
    )


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{index} is corrupt: {exc}") from exc
        return [folder / s for s in shards]
    for pattern in (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.*.safetensors",
        "*.safetensors",
    ):
        found = sorted(folder.glob(pattern))
        if found:
            return found[:1]
    found = sorted(folder.glob("diffusion_pytorch_model*.bin"))
    if found:
        return found[:1]
    raise CheckpointError(f"no weights in {folder} (looked for diffusion_pytorch_model*.safetensors / .bin)")


def read_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a diffusers VAE folder, as fp32, with legacy attention names renamed."""
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                part = load_file(str(path))
            else:
                part = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated / corrupt files raise various errors
            raise CheckpointError(f"cannot read weights {path}: {str(exc).splitlines()[0]}") from exc
        state.update(part)
    out = {}
    for key, value in state.items():
        for old, new in _LEGACY_ATTENTION.items():
            key = key.replace(old, new)
        out[key] = value.float() if value.is_floating_point() else value
    return out


def import_diffusers(
    src: str | Path, out: str | Path, verify: bool = False, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Convert a diffusers AutoencoderKL folder into a zturbo model folder at ``out``."""
    from zturbo.export.pipeline import prepare_out_dir
    from zturbo.model.io import load_state_dict_strict, model_config_from_dict, read_config
    from zturbo.model.vae import VAE

    log = log or _nolog
    folder = find_vae_folder(src)
    config = model_config_from_dict(read_config(folder))
    state = read_diffusers_weights(folder)
    vae = VAE(config)
    load_state_dict_strict(vae, state, str(folder))
    vae.eval()
    out = prepare_out_dir(out)
    log(f"importing {folder} ({vae.num_parameters / 1e6:.1f} M parameters) to {out}")
    save_model_folder(vae, out)
    report: dict[str, Any] = {
        "format": "zturbo",
        "source": str(folder),
        "out": str(out),
        "model": config.model_dump(mode="json"),
        "parameters": vae.num_parameters,
    }
    if verify:
        report["verify"] = compare_with_diffusers(vae, folder)
    return report


def compare_with_diffusers(vae, folder: Path) -> dict[str, Any]:
    """Load ``folder`` with diffusers and compare its encode/decode with ``vae`` on sample photos."""
    diffusers = require("diffusers", "comparing with diffusers' AutoencoderKL")
    from zturbo.export.verify import compare, sample_images

    theirs = diffusers.AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    f = vae.config.downsample_factor
    images = sample_images(max(f, _COMPARE_SIZE // f * f), 2)
    with torch.inference_mode():
        ours_z = vae.float().eval().encode(images).mean
        their_z = theirs.encode(images).latent_dist.mean
        ours_x = vae.decode(ours_z)
        their_x = theirs.decode(ours_z).sample
    return {"encoder": compare(their_z, ours_z), "decoder": compare(their_x, ours_x, data_range=2.0)}
