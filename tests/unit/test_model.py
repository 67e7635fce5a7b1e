"""The VAE matches diffusers' AutoencoderKL exactly: keys, shapes, numerics, folders."""

import json

import pytest
import torch
from tolerances import rounding_atol, vae_depth

from zturbo import VAE, ModelConfig, load_vae
from zturbo.config import available_profiles, load_settings
from zturbo.errors import CheckpointError
from zturbo.model import TinyConfig, build_model

diffusers = pytest.importorskip("diffusers")

VARIANTS = {
    "fast": dict(block_out_channels=[96, 192, 384, 384], latent_channels=8),
    "standard": dict(block_out_channels=[128, 256, 512, 512], latent_channels=16,
                     use_quant_conv=False, use_post_quant_conv=False),
    "no-attention": dict(block_out_channels=[64, 128, 256, 256], latent_channels=8, mid_block_add_attention=False),
    "quant-only-post": dict(block_out_channels=[32, 64], latent_channels=4, use_quant_conv=False, layers_per_block=1),
}
TINY = dict(block_out_channels=[32, 64], latent_channels=4, layers_per_block=1, sample_size=64)


def reference(cfg: ModelConfig | TinyConfig):
    """diffusers' model for ``cfg``: AutoencoderKL, or AutoencoderKLFlux2 (whose BatchNorm has buffers
    only, no parameters) where the decoder's widths differ from the encoder's; AutoencoderTiny for a tiny one."""
    if isinstance(cfg, TinyConfig):
        return diffusers.AutoencoderTiny(
            encoder_block_out_channels=tuple(cfg.encoder_block_out_channels),
            decoder_block_out_channels=tuple(cfg.decoder_block_out_channels),
            num_encoder_blocks=tuple(cfg.num_encoder_blocks), num_decoder_blocks=tuple(cfg.num_decoder_blocks),
            latent_channels=cfg.latent_channels,
        )
    n = len(cfg.block_out_channels)
    if cfg.decoder_channels != cfg.block_out_channels:
        return diffusers.AutoencoderKLFlux2(
            in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
            block_out_channels=cfg.block_out_channels, decoder_block_out_channels=cfg.decoder_channels,
            layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.norm_num_groups, mid_block_add_attention=cfg.mid_block_add_attention,
            use_quant_conv=cfg.use_quant_conv, use_post_quant_conv=cfg.use_post_quant_conv,
        )
    return diffusers.AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
        mid_block_add_attention=cfg.mid_block_add_attention, use_quant_conv=cfg.use_quant_conv,
        use_post_quant_conv=cfg.use_post_quant_conv,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", available_profiles())
def test_profile_parameter_count_matches_diffusers_and_round_trips(name):
    cfg = load_settings(name).model
    with torch.device("meta"):
        ours = sum(p.numel() for p in build_model(cfg).parameters())
        theirs = sum(p.numel() for p in reference(cfg).parameters())
    assert ours == theirs
    if name == "standard":
        assert ours == 83_819_683  # the published FLUX.1 VAE parameter count
    # A tiny input through the real model gives the right shapes.
    torch.manual_seed(0)
    vae = build_model(cfg).eval()
    f = cfg.downsample_factor
    x = torch.rand(1, 3, 2 * f, 3 * f) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x)
        assert post.mean.shape == (1, cfg.latent_channels, 2, 3)
        assert vae.decode(post.mode()).shape == x.shape


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_keys_and_shapes_equal_diffusers(variant):
    cfg = ModelConfig(**VARIANTS[variant])
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in VAE(cfg).state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in reference(cfg).state_dict().items()}
    assert ours == theirs


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fast", "no-attention", "quant-only-post"])
def test_outputs_agree_with_diffusers_both_directions(variant):
    # In float64 the two implementations' rounding is ~1e-13 of the outputs (tolerances.py), so a
    # tolerance of rounding_atol in fp64 still sits orders of magnitude below any functional difference.
    cfg = ModelConfig(**VARIANTS[variant])
    torch.manual_seed(0)
    ours, theirs = VAE(cfg).eval().double(), reference(cfg).eval().double()
    layers, fan_in = vae_depth(ours)
    x = torch.rand(2, 3, 32, 48, dtype=torch.float64) * 2 - 1
    for src, dst in ((ours, theirs), (theirs, ours)):
        with torch.no_grad():
            for p in src.parameters():
                p.normal_(0, 0.05)
        dst.load_state_dict(src.state_dict())
        with torch.no_grad():
            mean_o = ours.encode(x).mean
            mean_t = theirs.encode(x).latent_dist.mean
            torch.testing.assert_close(mean_o, mean_t, atol=rounding_atol(mean_t, layers, fan_in), rtol=0)
            out_t = theirs.decode(mean_o).sample
            torch.testing.assert_close(ours.decode(mean_o), out_t, atol=rounding_atol(out_t, layers, fan_in), rtol=0)


def test_posterior_matches_diffusers_and_is_clamped():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from zturbo.model import DiagonalGaussian

    moments = torch.randn(2, 8, 4, 4) * 20
    ours, theirs = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert ours.logvar.max() <= 20 and ours.logvar.min() >= -30
    torch.testing.assert_close(ours.kl(), theirs.kl())
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(ours.sample(generator=g1), theirs.sample(generator=g2))


def test_save_pretrained_loads_in_diffusers_and_back(tmp_path):
    torch.manual_seed(0)
    ours = VAE(ModelConfig(**TINY, scaling_factor=0.5, shift_factor=0.1)).eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours").eval()
    assert theirs.config.scaling_factor == 0.5 and theirs.config.shift_factor == 0.1
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = theirs(x).sample
        torch.testing.assert_close(ours(x), ref, atol=rounding_atol(ref, *vae_depth(ours)), rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    back = VAE.from_pretrained(tmp_path / "theirs")
    assert back.config.scaling_factor == 0.5
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(1)
    vae = VAE(ModelConfig(**TINY, mid_block_add_attention=False))
    vae.save_pretrained(tmp_path)
    loaded = load_vae(tmp_path)
    assert loaded.config == vae.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in vae.state_dict().items())
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files


def test_corrupt_config_and_truncated_weights_fail_cleanly(tmp_path):
    VAE(ModelConfig(**TINY)).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_vae(tmp_path)
    assert "truncated or corrupt" in info.value.message and "\n" not in info.value.message
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError) as info:
        load_vae(tmp_path)
    assert "config.json is corrupt" in info.value.message and "\n" not in info.value.message


def test_weights_not_matching_config_are_named(tmp_path):
    VAE(ModelConfig(**TINY)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["latent_channels"] = 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_vae(tmp_path)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    vae = VAE(ModelConfig(**TINY)).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def grads():
        vae.zero_grad()
        vae(x).square().mean().backward()
        return [p.grad.clone() for p in vae.parameters()]

    plain = grads()
    vae.enable_gradient_checkpointing()
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    vae = VAE(ModelConfig(**TINY)).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = vae(x)
        vae = vae.to(memory_format=torch.channels_last)
        out = vae(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=rounding_atol(ref, *vae_depth(vae)), rtol=0)


def test_inference_mode_and_grad_mode_agree():
    """The in-place fast path (no autograd) must compute the same function."""
    torch.manual_seed(0)
    vae = VAE(ModelConfig(**TINY))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        fast = vae(x)
    slow = vae(x).detach()
    torch.testing.assert_close(fast, slow)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_activations_keep_the_input_memory_layout(grad, layout):
    """The mid-block attention must not flip the rest of the network to another layout.

    Its output is a transposed (channels-last) view; a sum that takes that layout made every
    later layer run channels-last, and on CPU GroupNorm's backward is several times slower so.
    """
    torch.manual_seed(0)
    vae = VAE(ModelConfig(block_out_channels=[32, 64], latent_channels=4, layers_per_block=1))
    seen = []
    for module in vae.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=layout)))
    z = torch.randn(2, 4, 12, 12).contiguous(memory_format=layout)
    with torch.set_grad_enabled(grad):
        out = vae.decode(z)
    assert seen and all(seen), f"{seen.count(False)} of {len(seen)} GroupNorm outputs changed layout"
    assert out.is_contiguous(memory_format=layout)
