"""diffusers' AutoencoderKL folder format, both ways.

Export: the EMA weights as a folder ``diffusers.AutoencoderKL.from_pretrained``
loads (config.json with scaling and shift factors + safetensors). Our state
dict already uses diffusers' key layout, so this is a save with a check.

Import: a diffusers VAE folder (for example FLUX.1's ``vae/``, in fp32, fp16 or
bf16, safetensors or a weights-only .bin, old or new attention key names), or any
model a single file holds (``import_model``), as a zturbo model folder, so a standard
VAE can be evaluated and benchmarked next to a turbo one with the same tools.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from zturbo.errors import UsageError, require
from zturbo.export.layout import prepare_out_dir
from zturbo.export.verify import compare, sample_images
from zturbo.model import load_pretrained
from zturbo.model.diffusers import CONFIG_NAME, diffusers_class

_COMPARE_SIZE = 64


def _nolog(_: str) -> None:
    pass


def export_diffusers(
    vae, out: Path, verify: bool = False, source: Path | None = None, log=None
) -> dict[str, Any]:
    """Write ``vae`` as a diffusers AutoencoderKL (or AutoencoderKLFlux2) folder; with ``verify``, load it
    with diffusers and compare.

    An AutoencoderKL-latent model whose decoder widths differ from its encoder's has no
    diffusers class to load it: refused, with the way pipelines take it instead.
    """
    cls_name = check_diffusers_class(vae.config)
    (log or _nolog)(f"writing diffusers {cls_name} folder {out}")
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


def check_diffusers_class(config) -> str:
    """The diffusers class that loads ``config``; UsageError when none can (see ``export_diffusers``)."""
    cls_name = diffusers_class(config)
    if cls_name == "AutoencoderKL" and config.decoder_channels != config.block_out_channels:
        raise UsageError(
            f"diffusers' AutoencoderKL cannot hold a decoder of widths {config.decoder_channels} with an "
            f"encoder of {config.block_out_channels}",
            "give pipelines the model through zturbo.adapters.DiffusersVAE (pipe.vae = DiffusersVAE.from_pretrained(PATH))",
        )
    return cls_name


def save_model_folder(vae, out: Path) -> None:
    """``save_pretrained`` into ``out`` without ever pairing new weights with an old config.

    Written in a staging folder inside ``out``; the old config.json goes first,
    the new weights move in, the new config.json last.
    """
    staging = Path(tempfile.mkdtemp(prefix=".zturbo-save-", dir=out))
    try:
        vae.save_pretrained(staging)
        with contextlib.suppress(FileNotFoundError):
            (out / CONFIG_NAME).unlink()
        for path in sorted(staging.iterdir(), key=lambda p: p.name == CONFIG_NAME):
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def import_diffusers(
    folder: str | Path, out: str | Path, verify: bool = False, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Convert the AutoencoderKL model folder ``folder`` (diffusers' or ours) into a zturbo model folder at ``out``.

    ``zturbo.artifacts`` finds that folder in a pipeline (its ``vae/``), a run or a checkpoint.
    """
    folder = Path(folder)
    return import_model(load_pretrained(folder), folder, out, verify, log)


def import_model(
    vae, source: Path, out: str | Path, verify: bool = False, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Write ``vae``, read from ``source`` (a model folder or a single file), as a zturbo model folder at ``out``.

    ``verify`` loads ``source`` with diffusers and compares: ``from_pretrained`` for a folder,
    ``from_single_file`` (with the folder written as its config) for a file.
    """
    log = log or _nolog
    source = Path(source)
    vae = vae.float()
    if verify and source.is_file():
        check_single_file_verifiable(vae.config)
    out = prepare_out_dir(out)
    log(f"importing {source} ({vae.num_parameters / 1e6:.1f} M parameters) to {out}")
    save_model_folder(vae, out)
    report: dict[str, Any] = {
        "format": "zturbo",
        "source": str(source),
        "out": str(out),
        "model": vae.config.model_dump(mode="json"),
        "parameters": vae.num_parameters,
    }
    if verify:
        report["verify"] = compare_with_diffusers(vae, out if source.is_file() else source, single_file=source
                                                  if source.is_file() else None)
    return report


def check_single_file_verifiable(config) -> None:
    """diffusers' ``from_single_file`` reads AutoencoderKL files with one width list only."""
    if config.patch_size is not None or config.decoder_channels != config.block_out_channels:
        raise UsageError(
            "--verify loads the file with diffusers' AutoencoderKL.from_single_file, which reads neither FLUX.2 "
            "files nor decoders narrower than their encoder",
            "import without --verify; `zturbo import DIR_WRITTEN --out ... --verify` compares the folder instead",
        )


def compare_with_diffusers(vae, folder: Path, single_file: Path | None = None) -> dict[str, Any]:
    """Load ``folder`` (or ``single_file``, configured by ``folder``) with diffusers and compare its
    encode/decode with ``vae`` on sample photos."""
    diffusers = require("diffusers", "comparing with diffusers' AutoencoderKL")
    cls = getattr(diffusers, diffusers_class(vae.config))
    if single_file is not None:
        theirs = cls.from_single_file(str(single_file), config=str(folder), torch_dtype=torch.float32).eval()
    else:
        theirs = cls.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    f = vae.config.downsample_factor
    images = sample_images(max(f, _COMPARE_SIZE // f * f), 2)
    with torch.inference_mode():
        ours_z = vae.float().eval().encode(images).mean
        their_z = theirs.encode(images).latent_dist.mean
        ours_x = vae.decode(ours_z)
        their_x = theirs.decode(ours_z).sample
    return {"encoder": compare(their_z, ours_z), "decoder": compare(their_x, ours_x, data_range=2.0)}
