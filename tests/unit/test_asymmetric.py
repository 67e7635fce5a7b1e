"""Asymmetric models and FLUX.2's layout: save/load, diffusers both ways, the pipeline adapter."""

from __future__ import annotations

import json

import pytest
import torch

from zturbo.model import VAE, ModelConfig
from zturbo.model.diffusers import config_from_diffusers, config_to_diffusers
from zturbo.bench.flops import parameter_count, vae_flops
from zturbo.model.vae import patchify_latents
from zturbo.artifacts import TORCH_KINDS, require

diffusers = pytest.importorskip("diffusers")

SMALL = ModelConfig(
    block_out_channels=[16, 32], decoder_block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=1,
    latent_channels=4, sample_size=32,
)
FLUX2 = SMALL.model_copy(update={"patch_size": [2, 2], "batch_norm_eps": 1e-4})
# fp32 on both sides: the same convolutions, summed in another order only where our decoder
# folds nearest-x2 + 3x3 into 2x2 phase kernels (sums of up to 4 weights first) and where
# GroupNorm reduces in another order. Each such reordering moves a result by a few fp32 ulps
# (2^-24 relative) of the partial sums, over ~10 layers of values of order 1-10: well under
# 1e-5; the bound for parity is 1e-4.
ATOL = 1e-4


def _diffusers_flux2(cfg: ModelConfig):
    n = len(cfg.block_out_channels)
    return diffusers.AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels), decoder_block_out_channels=tuple(cfg.decoder_channels),
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
        layers_per_block=cfg.layers_per_block, sample_size=cfg.sample_size,
    ).eval()


def test_decoder_widths_are_validated():
    with pytest.raises(ValueError, match="not divisible by norm_num_groups"):
        ModelConfig(block_out_channels=[16, 32], decoder_block_out_channels=[6, 16], norm_num_groups=4)
    with pytest.raises(ValueError, match="levels"):
        ModelConfig(block_out_channels=[16, 32], decoder_block_out_channels=[8, 16, 16], norm_num_groups=4)


def test_asymmetric_save_load_counts_and_config(tmp_path):
    torch.manual_seed(0)
    vae = VAE(SMALL)
    assert vae.decoder.conv_in.out_channels == 16 and vae.encoder.conv_out.in_channels == 32
    folder = vae.save_pretrained(tmp_path / "m")
    data = json.loads((folder / "config.json").read_text())
    assert data["_class_name"] == "AutoencoderKL" and data["decoder_block_out_channels"] == [8, 16]
    back = VAE.from_pretrained(folder)
    assert back.config == SMALL
    for key, value in vae.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    assert parameter_count(SMALL) == vae.num_parameters
    symmetric = SMALL.model_copy(update={"decoder_block_out_channels": None})
    assert vae_flops(SMALL, 32)["decode"] < vae_flops(symmetric, 32)["decode"]
    assert vae_flops(SMALL, 32)["encode"] == vae_flops(symmetric, 32)["encode"]


def test_asymmetric_autoencoderkl_folder_is_refused_by_diffusers_not_misloaded(tmp_path):
    folder = VAE(SMALL).save_pretrained(tmp_path / "m")
    with pytest.raises(Exception, match="(?i)size|shape"):
        diffusers.AutoencoderKL.from_pretrained(str(folder))


def test_flux2_from_diffusers_matches(tmp_path):
    torch.manual_seed(0)
    theirs = _diffusers_flux2(FLUX2)
    theirs.bn.running_mean.normal_()
    theirs.bn.running_var.uniform_(0.5, 2.0)
    theirs.save_pretrained(tmp_path / "d")
    ours = VAE.from_pretrained(tmp_path / "d")
    assert ours.config == FLUX2
    assert set(ours.state_dict()) == set(theirs.state_dict())  # same keys: bn.* included
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = ours.encode(x).mean
        torch.testing.assert_close(z, theirs.encode(x).latent_dist.mean, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=ATOL, rtol=0)
        # The pipelines' normalisation: patchify, then (z - running_mean) / sqrt(running_var + eps).
        p = patchify_latents(z, [2, 2])
        want = (p - theirs.bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(theirs.bn.running_var.view(1, -1, 1, 1) + 1e-4)
        torch.testing.assert_close(ours.normalize_latents(z), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.denormalize_latents(ours.normalize_latents(z)), z, atol=1e-5, rtol=0)


def test_flux2_to_diffusers_loads_and_matches(tmp_path):
    torch.manual_seed(0)
    ours = VAE(FLUX2).eval()
    ours.bn.running_mean.normal_()
    folder = ours.save_pretrained(tmp_path / "o")
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "AutoencoderKLFlux2"
    theirs = diffusers.AutoencoderKLFlux2.from_pretrained(str(folder)).eval()
    assert tuple(theirs.config.decoder_block_out_channels) == (8, 16)
    assert torch.equal(theirs.bn.running_mean, ours.bn.running_mean)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = theirs.encode(x).latent_dist.mean
        torch.testing.assert_close(ours.encode(x).mean, z, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=ATOL, rtol=0)
    assert config_from_diffusers(config_to_diffusers(FLUX2)) == FLUX2


def test_adapter_in_a_real_pipeline_decodes_as_diffusers():
    """DiTPipeline (no text encoder needed) with the adapter as its vae gives diffusers' own images."""
    from zturbo.adapters import DiffusersVAE

    torch.manual_seed(0)
    cfg = SMALL.model_copy(update={"decoder_block_out_channels": None, "scaling_factor": 0.5})
    ours = VAE(cfg).eval()
    theirs = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), latent_channels=4, norm_num_groups=4, layers_per_block=1, scaling_factor=0.5,
    ).eval()
    theirs.load_state_dict(ours.state_dict())
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10,
    ).eval()
    images = []
    for vae in (theirs, DiffusersVAE(ours)):
        pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler())
        pipe.set_progress_bar_config(disable=True)
        out = pipe(class_labels=[1], guidance_scale=1.0, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
        images.append(torch.from_numpy(out.images))
    torch.testing.assert_close(images[1], images[0], atol=ATOL, rtol=0)


def test_adapter_offers_what_flux_sd3_and_z_image_pipelines_use():
    from zturbo.adapters import DiffusersVAE

    torch.manual_seed(0)
    cfg = SMALL.model_copy(update={"scaling_factor": 0.3611, "shift_factor": 0.1159})
    vae = DiffusersVAE(VAE(cfg).eval())
    # The attributes and calls FluxPipeline / StableDiffusion3Pipeline / ZImagePipeline make:
    assert 2 ** (len(vae.config.block_out_channels) - 1) == cfg.downsample_factor
    assert vae.config.latent_channels == 4 and vae.dtype == torch.float32 and vae.device.type == "cpu"
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        latents = (dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        sampled = dist.sample(torch.Generator().manual_seed(0))
        assert sampled.shape == latents.shape and not torch.equal(sampled, dist.mode())
        unscaled = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(unscaled, return_dict=False)[0]
        assert torch.equal(image, vae.vae.decode(unscaled))
        assert torch.equal(vae.decode(unscaled).sample, image)
    assert vae.config.latents_mean is None and hasattr(vae.config, "force_upcast")
    with pytest.raises(AttributeError):
        vae.bn  # noqa: B018 - AutoencoderKL latents have no FLUX.2 normaliser


@pytest.mark.slow
def test_flux2_import_and_export_through_the_cli(tmp_path, capsys):
    from zturbo.cli import run

    torch.manual_seed(0)
    _diffusers_flux2(FLUX2).save_pretrained(tmp_path / "flux2")
    assert run(["import-diffusers", str(tmp_path / "flux2"), "--out", str(tmp_path / "ours"), "--verify", "--json"]) == 0
    capsys.readouterr()
    assert VAE.from_pretrained(tmp_path / "ours").config == FLUX2
    assert run(["export", str(tmp_path / "ours"), "--format", "diffusers", "--out", str(tmp_path / "hf"),
                "--verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verify"]["decoder"]["max_abs"] <= ATOL and report["verify"]["encoder"]["max_abs"] <= ATOL
    assert isinstance(diffusers.AutoencoderKLFlux2.from_pretrained(str(tmp_path / "hf")), diffusers.AutoencoderKLFlux2)


def test_asymmetric_autoencoderkl_export_is_refused_before_writing(tmp_path, capsys):
    from zturbo.cli import run

    VAE(SMALL).save_pretrained(tmp_path / "m")
    assert run(["export", str(tmp_path / "m"), "--format", "diffusers", "--out", str(tmp_path / "hf")]) == 2
    assert "DiffusersVAE" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_bench_builds_diffusers_twins_of_asymmetric_models():
    from zturbo.bench.cases import Subject, diffusers_subject

    torch.manual_seed(0)
    ours = VAE(SMALL).eval()
    twin = diffusers_subject(Subject(name="s", role="ours", kind="zturbo", config=SMALL, model=ours)).model
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(twin.decode(z).sample, ours.decode(z), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "shape",
    [
        dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),  # FLUX.1 / Z-Image
        dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609),  # SD3
        dict(latent_channels=4, scaling_factor=0.13025, shift_factor=None, force_upcast=False),  # SDXL
    ],
)
def test_diffusers_autoencoderkl_teachers_keep_their_factors_in_the_student(shape, tmp_path):
    from zturbo.distill import load_teacher
    from zturbo.distill.prune import prune_vae

    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), norm_num_groups=4, layers_per_block=1, **shape,
    ).eval()
    theirs.save_pretrained(tmp_path / "pipe" / "vae")
    # A pipeline folder: the resolver finds its vae/, as `zturbo train --teacher` does.
    teacher = load_teacher(require(tmp_path / "pipe", TORCH_KINDS, "train --teacher").model_dir)
    assert teacher.config.scaling_factor == shape["scaling_factor"]
    assert teacher.config.shift_factor == (shape["shift_factor"] or 0.0)
    student = prune_vae(teacher, VAE(teacher.config.model_copy(update={"decoder_block_out_channels": [8, 16]})))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(student.encode(x).mean, theirs.encode(x).latent_dist.mean, atol=ATOL, rtol=0)
    back = VAE.from_pretrained(student.save_pretrained(tmp_path / "student"))
    assert back.config.scaling_factor == shape["scaling_factor"] and back.config.decoder_channels == [8, 16]
