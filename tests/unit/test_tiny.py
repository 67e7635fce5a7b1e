"""The tiny family: diffusers' AutoencoderTiny exactly (keys, numerics, config.json), the published TAESD
file layout, the latent convention of diffusers' pipelines and ComfyUI, and every tiled engine."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_tiling import LiveTensorBytes, close, image
from tolerances import rounding_atol, vae_depth

from zturbo.artifacts import Kind, resolve
from zturbo.config import load_settings
from zturbo.errors import CheckpointError, UsageError
from zturbo.export.taesd import export_taesd
from zturbo.model import VAE, ModelConfig, TinyConfig, TinyVAE, load_pretrained
from zturbo.model.diffusers import config_from_diffusers, config_to_diffusers
from zturbo.model.single_file import open_single_file
from zturbo.tiling.memory import coder_plan, tiled_peak_bytes
from zturbo.tiling.parallel import decode_parallel

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_compute_thread")

# Narrow but with every kind of level: blocks before and after resampling, a level without blocks.
SMALL = TinyConfig(encoder_block_out_channels=[8] * 4, decoder_block_out_channels=[12] * 4,
                   num_encoder_blocks=[1, 2, 0, 1], num_decoder_blocks=[1, 0, 2, 1], latent_channels=4)


def small(seed: int = 0, config: TinyConfig = SMALL) -> TinyVAE:
    torch.manual_seed(seed)
    return TinyVAE(config).eval()


def latent(shape=(2, 4, 9, 13), seed: int = 1) -> torch.Tensor:
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    z[1:] = z[1:] * 2 + 0.5
    return z


def tolerance(reference: torch.Tensor, vae) -> float:
    return rounding_atol(reference, *vae_depth(vae))


# -- diffusers' AutoencoderTiny ------------------------------------------------------------------------------


def reference(config: TinyConfig):
    return diffusers.AutoencoderTiny(
        in_channels=config.in_channels, out_channels=config.out_channels,
        encoder_block_out_channels=tuple(config.encoder_block_out_channels),
        decoder_block_out_channels=tuple(config.decoder_block_out_channels),
        num_encoder_blocks=tuple(config.num_encoder_blocks), num_decoder_blocks=tuple(config.num_decoder_blocks),
        latent_channels=config.latent_channels,
    ).eval()


@pytest.mark.parametrize("config", [SMALL, TinyConfig(latent_channels=16)], ids=["small", "taef1"])
def test_keys_and_shapes_are_autoencoder_tinys(config):
    with torch.device("meta"):
        ours, theirs = TinyVAE(config), reference(config)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_encode_and_decode_equal_autoencoder_tiny_with_the_same_weights():
    ours = small()
    theirs = reference(SMALL)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = image(2, 32, 48)
    z = latent((2, 4, 4, 6))
    with torch.no_grad():
        ref_z, ref_x = theirs.encode(x).latents, theirs.decode(z).sample
        assert (ours.encode(x).mean - ref_z).abs().max() <= tolerance(ref_z, ours)
        assert (ours.decode(z) - ref_x).abs().max() <= tolerance(ref_x, ours)
        # The latent is the posterior's mean, mode and sample alike (a tiny encoder has no spread).
        post = ours.encode(x)
        assert torch.equal(post.mode(), post.mean) and torch.equal(post.sample(), post.mean)
        assert not post.std.any()


def test_a_folder_round_trips_through_diffusers_both_ways(tmp_path):
    ours = small()
    ours.save_pretrained(tmp_path / "ours")
    theirs = diffusers.AutoencoderTiny.from_pretrained(tmp_path / "ours").eval()
    z = latent((1, 4, 4, 4))
    with torch.no_grad():
        ref = theirs.decode(z).sample
        assert (ours.decode(z) - ref).abs().max() <= tolerance(ref, ours)
    # diffusers' own folder (no zturbo keys) loads as the same model, with the teacher factors left at 1 and 0.
    fresh = reference(SMALL)
    fresh.load_state_dict(ours.state_dict())
    fresh.save_pretrained(tmp_path / "theirs")
    back = load_pretrained(tmp_path / "theirs")
    assert isinstance(back, TinyVAE) and back.config == SMALL
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))
    assert resolve(tmp_path / "theirs").kind == Kind.DIFFUSERS and resolve(tmp_path / "ours").kind == Kind.MODEL


def test_config_json_round_trips_and_keeps_the_teachers_factors():
    config = SMALL.model_copy(update={"vae_scale": 0.3611, "vae_shift": 0.1159, "sample_size": 512})
    data = config_to_diffusers(config)
    assert data["_class_name"] == "AutoencoderTiny" and data["scaling_factor"] == 1.0 and data["shift_factor"] == 0.0
    # What AutoencoderTiny does not take goes under keys diffusers skips without a warning.
    assert {k for k in data if k.startswith("_")} >= {"_vae_scale", "_vae_shift", "_sample_size"}
    assert "vae_scale" not in data
    assert config_from_diffusers(json.loads(json.dumps(data))) == config


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="one width per coder"):
        TinyConfig(encoder_block_out_channels=[64, 32, 32, 32])
    with pytest.raises(ValueError, match="decoder_block_out_channels has 3 levels, num_decoder_blocks 4"):
        TinyConfig(decoder_block_out_channels=[64] * 3)
    with pytest.raises(CheckpointError, match="unsupported act_fn 'silu'"):
        config_from_diffusers({"_class_name": "AutoencoderTiny", "act_fn": "silu"})


def test_each_family_loads_only_its_own_folders(tmp_path):
    small().save_pretrained(tmp_path / "tiny")
    with pytest.raises(CheckpointError, match="holds a AutoencoderTiny, not a model VAE loads"):
        VAE.from_pretrained(tmp_path / "tiny")
    with pytest.raises(UsageError, match="VAE takes an AutoencoderKL config"):
        VAE(SMALL)


# -- the latent convention -------------------------------------------------------------------------------------


def test_the_latent_is_the_teachers_as_the_diffusion_model_sees_it(tmp_path):
    """diffusers' pipelines decode ``latents / scaling_factor + shift_factor`` with the VAE they hold; a TAESD-family
    config says 1 and 0, so AutoencoderTiny decodes the diffusion model's latent itself. ComfyUI's VAE decodes
    ``decoder((z - vae_shift) * vae_scale)`` of a raw latent z with the combined file's factors. Both must be this
    model's decode of the teacher's normalised latent."""
    teacher = ModelConfig(block_out_channels=[8] * 4, norm_num_groups=4, layers_per_block=1, latent_channels=4,
                          scaling_factor=0.3611, shift_factor=0.1159, mid_block_add_attention=False)
    vae = small(config=SMALL.model_copy(update={"vae_scale": teacher.scaling_factor,
                                                 "vae_shift": teacher.shift_factor}))
    torch.manual_seed(2)
    kl = VAE(teacher).eval()
    raw = kl.encode(image(1, 32, 32)).mean.detach()  # what ComfyUI's samplers hand its VAE
    seen = kl.normalize_latents(raw)  # what the diffusion model sees, and diffusers' pipelines hold
    assert torch.equal(vae.from_teacher_latents(raw), (raw - 0.1159) * 0.3611)
    torch.testing.assert_close(vae.from_teacher_latents(raw), seen, rtol=0, atol=0)
    vae.save_pretrained(tmp_path / "folder")
    theirs = diffusers.AutoencoderTiny.from_pretrained(tmp_path / "folder").eval()
    files = export_taesd(vae, tmp_path / "taesd", force=True)["files"]
    from safetensors.torch import load_file

    combined = load_file(files["combined"])
    with torch.no_grad():
        ours = vae.decode(seen)
        pipeline = theirs.decode(seen / theirs.config.scaling_factor + theirs.config.shift_factor).sample
        comfy_input = (raw - combined["vae_shift"]) * combined["vae_scale"]
    assert (pipeline - ours).abs().max() <= tolerance(ours, vae)
    # The combined file's factors are 0-d float32 tensors: the input they make is the normalised latent to fp32 rounding.
    torch.testing.assert_close(comfy_input, seen, rtol=2 * 2**-24, atol=4 * 2**-24 * float(seen.abs().max()))


# -- the published TAESD layout --------------------------------------------------------------------------------


def published_layout(latent_channels: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of madebyollin's taesd.py coders, written out from that file's architecture: each coder is
    one nn.Sequential of conv(n_in, n_out) (3x3, padding 1; stride-2 ones without bias), Block(64, 64) (three
    convs under ``conv.0/2/4``, an identity skip), ReLU / Upsample / Clamp (no weights). The decoder's Sequential
    starts with Clamp(), conv(latent, 64), ReLU()."""
    table: dict[str, tuple[int, ...]] = {}

    def conv(prefix: str, index: int, cin: int, cout: int, bias: bool = True) -> None:
        table[f"{prefix}{index}.weight"] = (cout, cin, 3, 3)
        if bias:
            table[f"{prefix}{index}.bias"] = (cout,)

    def block(prefix: str, index: int) -> None:
        for k in (0, 2, 4):
            conv(f"{prefix}{index}.conv.", k, 64, 64)

    enc = "taesd_encoder."
    conv(enc, 0, 3, 64)
    block(enc, 1)
    index = 2
    for _ in range(3):  # conv(64, 64, stride=2, bias=False), Block x3
        conv(enc, index, 64, 64, bias=False)
        for i in range(3):
            block(enc, index + 1 + i)
        index += 4
    conv(enc, index, 64, latent_channels)  # index 14
    dec = "taesd_decoder."
    conv(dec, 1, latent_channels, 64)  # 0: Clamp, 2: ReLU
    index = 3
    for _ in range(3):  # Block x3, Upsample, conv(64, 64, bias=False)
        for i in range(3):
            block(dec, index + i)
        conv(dec, index + 4, 64, 64, bias=False)
        index += 5
    block(dec, index)  # 18
    conv(dec, index + 1, 64, 3)  # 19
    table["vae_scale"] = ()
    table["vae_shift"] = ()
    return table


@pytest.mark.parametrize("latent_channels", [4, 16])
def test_the_combined_file_has_exactly_the_published_keys_and_shapes(latent_channels, tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    vae = TinyVAE(TinyConfig(latent_channels=latent_channels, vae_scale=1.5305, vae_shift=0.0609))
    report = export_taesd(vae, tmp_path / "out")
    with safe_open(report["files"]["combined"], framework="pt") as fh:
        found = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 - safe_open is no dict
        assert float(fh.get_tensor("vae_scale")) == pytest.approx(1.5305) and fh.get_tensor("vae_scale").dim() == 0
    assert found == published_layout(latent_channels)
    # The two files madebyollin ships: each coder's Sequential state dict, without the prefix.
    for side in ("encoder", "decoder"):
        with safe_open(report["files"][side], framework="pt") as fh:
            keys = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 - safe_open is no dict
        assert keys == {k.split(".", 1)[1]: v for k, v in found.items() if k.startswith(f"taesd_{side}.")}
    # SD3's factors with SD3's 16 channels: madebyollin's TAESD3 names; 4 channels are no SD3 latent.
    assert report["files"]["combined"].endswith("taesd3.safetensors" if latent_channels == 16 else "/taesd.safetensors")


def test_the_combined_file_reads_back_as_the_same_model(tmp_path):
    vae = small(config=SMALL.model_copy(update={"vae_scale": 0.3611, "vae_shift": 0.1159, "sample_size": 256}))
    with pytest.raises(UsageError, match="published TAESD architecture only"):
        export_taesd(vae, tmp_path / "out")
    report = export_taesd(vae, tmp_path / "out", force=True, verify=True)
    assert "bit-identical" in report["verify"]["read_back"]
    path = report["files"]["combined"]
    assert resolve(path).kind == Kind.SINGLE_FILE
    single = open_single_file(path)
    assert single.config == vae.config and "ComfyUI TAESD layout" in single.note
    back = single.load()
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), vae.state_dict().values()))
    with pytest.raises(UsageError, match="--format taesd writes tiny models"):
        export_taesd(VAE(ModelConfig(block_out_channels=[8], norm_num_groups=4)), tmp_path / "kl")


# -- tiled engines -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile", [8, 24, 40])  # 8: one latent pixel per tile, far below a block's 3-pixel halo
def test_exact_and_recompute_tiling_equal_the_untiled_passes(tile):
    vae = small()
    z = latent()
    x = image(2, 40, 56)
    x[1] = x[1] * 0.3 + 0.5
    with torch.no_grad():
        ref = vae.decode(z)
        close(vae.decode(z, tile=tile), ref)
        close(vae.decode(z, tile=tile, recompute=True), ref)
        close(vae.decode(z, tile=tile, offload=True), ref)
        close(vae.encode(x, tile=tile).mean, vae.encode(x).mean)


def test_the_plan_describes_every_layer_with_its_window():
    plan = small().decoder.plan()
    assert [layer.name for layer in plan][:3] == ["clamp", "layers.0", "layers.1"] and plan[-1].name == "from_unit"
    assert {layer.kind for layer in plan} == {"local"}
    ups = [layer for layer in plan if layer.scale == 2]
    assert [(int(u.resolution), u.halo) for u in ups] == [(1, 0), (2, 0), (4, 0)]
    enc = small().encoder.plan()
    assert [(layer.name, layer.halo) for layer in enc if layer.scale < 1] == [
        ("layers.2", 1), ("layers.5", 1), ("layers.6", 1)]
    assert enc[-1].output_resolution == pytest.approx(1 / 8)


def test_fast_tiling_with_a_halo_covering_the_image_is_exact():
    vae = small()
    z = latent((1, 4, 6, 8))
    x = image(1, 48, 64)
    with torch.no_grad():
        close(vae.decode(z, tile=16, tile_mode="fast", halo=64), vae.decode(z))
        close(vae.encode(x, tile=16, tile_mode="fast", halo=64).mean, vae.encode(x).mean)


def test_tiled_encode_refuses_sides_its_tiles_cannot_hold():
    with pytest.raises(UsageError, match="multiples of 8"):
        small().encode(image(1, 36, 40), tile=16)


def test_the_memory_estimate_bounds_what_the_tiles_hold():
    vae = small()
    z = latent((1, 4, 16, 16))
    with torch.no_grad(), LiveTensorBytes() as stored:
        vae.decode(z, tile=32)
    assert 0 < stored.peak <= tiled_peak_bytes(coder_plan(vae, "decode"), 1, 16, 16, 32)
    assert coder_plan(SMALL, "decode")[-1].cout == 3  # a config's plan, built on the meta device


def _rank(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        torch.save(decode_parallel(small(), latent()), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # starts two processes
def test_parallel_decode_over_two_ranks_equals_the_untiled_decode(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    with torch.no_grad():
        ref = small().decode(latent())
    for r in range(2):
        close(torch.load(tmp_path / f"{r}.pt", weights_only=True), ref)


# -- settings --------------------------------------------------------------------------------------------------


def test_the_model_section_takes_either_family():
    s = load_settings("tiny-flux")
    assert isinstance(s.model, TinyConfig) and s.model.latent_channels == 16 and s.distill.mode == "both"
    # --architecture tiny over a profile of the other family replaces its model section, not merges it.
    s = load_settings("demo", overrides={"model": {"architecture": "tiny"}})
    assert s.model == TinyConfig() and s.data.image_size == 128
    with pytest.raises(Exception, match="model.latent_channels"):
        load_settings("tiny-flux", overrides={"model": {"latent_channels": 0}})
