"""Single files against diffusers: its own loader reads what zturbo writes, and zturbo reads what others write.

- ``AutoencoderKL.from_single_file(file, config=folder)`` (offline: the config is a local
  folder) decodes what zturbo decodes, within the rounding tolerance of tests/tolerances.py,
  for every shape diffusers' AutoencoderKL can hold (the symmetric FLUX.1, SD3 and SDXL ones);
- FLUX.2: ``AutoencoderKLFlux2.from_single_file`` where this diffusers has it; and, without
  it, diffusers' own LDM converter (``convert_ldm_vae_checkpoint``) plus the four FLUX.2 keys
  it leaves out, renamed here by hand, into an ``AutoencoderKLFlux2``;
- an LDM file written without zturbo's writer (the key table in tests/single_file_helpers.py,
  itself checked against diffusers' converter) reads back equal.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from single_file_helpers import SHAPES, family_model, ldm_by_hand
from tolerances import rounding_atol, vae_depth

from zturbo.errors import UsageError
from zturbo.export.single_file import export_single_file
from zturbo.model.single_file import open_single_file

diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
single_file_model = pytest.importorskip("diffusers.loaders.single_file_model")


def _latent(vae, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, vae.config.latent_channels, 8, 8, generator=generator)


def _image(seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _close(ours: torch.Tensor, theirs: torch.Tensor, vae) -> None:
    layers, fan_in = vae_depth(vae)
    atol = rounding_atol(ours, layers, fan_in)
    assert float((ours - theirs).abs().max()) <= atol


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
@pytest.mark.parametrize("family", ["flux1", "sd3", "sdxl"])
def test_diffusers_from_single_file_decodes_what_zturbo_decodes(tmp_path, family, layout):
    vae = family_model(family, decoder_block_out_channels=None)
    path = tmp_path / "vae.safetensors"
    export_single_file(vae, path, layout=layout, force=True)
    vae.save_pretrained(tmp_path / "config")  # diffusers reads the config.json there, nothing else
    theirs = diffusers.AutoencoderKL.from_single_file(str(path), config=str(tmp_path / "config"),
                                                      local_files_only=True).eval()
    ours = open_single_file(path).load()
    z, x = _latent(vae), _image()
    with torch.inference_mode():
        _close(ours.decode(z), theirs.decode(z).sample, ours)
        _close(ours.encode(x).mean, theirs.encode(x).latent_dist.mean, ours)


def test_diffusers_flux2_single_file_loader_decodes_what_zturbo_decodes(tmp_path):
    if single_file_model._get_single_file_loadable_mapping_class(diffusers.AutoencoderKLFlux2) is None:
        pytest.skip(f"diffusers {diffusers.__version__} has no single-file loader for AutoencoderKLFlux2 "
                    "(test_diffusers_converter_reads_a_flux2_file covers the file)")
    vae = family_model("flux2")
    path = tmp_path / "vae.safetensors"
    export_single_file(vae, path, force=True)
    vae.save_pretrained(tmp_path / "config")
    theirs = diffusers.AutoencoderKLFlux2.from_single_file(str(path), config=str(tmp_path / "config"),
                                                           local_files_only=True).eval()
    with torch.inference_mode():
        _close(vae.decode(_latent(vae)), theirs.decode(_latent(vae)).sample, vae)


def test_diffusers_converter_reads_a_flux2_file(tmp_path):
    """BFL's FLUX.2 layout through diffusers' LDM converter; the FLUX.2 keys it has no rule for, by hand."""
    vae = family_model("flux2")
    path = tmp_path / "full_encoder_small_decoder.safetensors"
    export_single_file(vae, path, force=True)
    from safetensors.torch import load_file

    bfl = load_file(str(path))
    moved = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
    for old, new in moved.items():
        for param in ("weight", "bias"):
            bfl[new + param] = bfl.pop(old + param)
    config = {**vae.diffusers_config(), "down_block_types": ["DownEncoderBlock2D"] * 4,
              "up_block_types": ["UpDecoderBlock2D"] * 4}
    state = single_file_utils.convert_ldm_vae_checkpoint(bfl, config)
    state.update({k: bfl[k] for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")})
    theirs = diffusers.AutoencoderKLFlux2.from_config(
        {k: v for k, v in config.items() if not k.startswith("_")}).eval()
    theirs.load_state_dict(state, strict=True)
    z = _latent(vae)
    with torch.inference_mode():
        _close(vae.decode(z), theirs.decode(z).sample, vae)
    assert torch.equal(theirs.bn.running_var, vae.bn.running_var)


def test_an_ldm_file_written_without_zturbo_reads_equal(tmp_path):
    torch.manual_seed(3)
    reference = diffusers.AutoencoderKL(
        block_out_channels=tuple(SHAPES["sdxl"]["block_out_channels"]), latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    ).eval()
    state = reference.state_dict()
    ldm = ldm_by_hand(state, levels=4)
    # The hand-written table is diffusers' converter run backwards: diffusers maps it back exactly.
    back = single_file_utils.convert_ldm_vae_checkpoint(dict(ldm), dict(reference.config))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    path = tmp_path / "sdxl_vae.safetensors"
    save_file(ldm, str(path))
    with pytest.raises(UsageError, match="sdxl"):  # SD1 and SDXL share the shape: no family, no factors
        open_single_file(path)
    single = open_single_file(path, latent_family="sdxl")
    assert single.layout == "ldm" and single.config.scaling_factor == 0.13025
    loaded = single.load().state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
