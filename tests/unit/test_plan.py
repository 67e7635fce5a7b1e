"""The layer walk: one description of each coder that the forward and every tiled engine follow.

A model variant changed only in its module tree (extra ResNets, one of them widening the
full-resolution maps, a second mid-block attention, and a layer of a kind no engine has code for)
must be computed by the exact, recompute, fast and patch-parallel engines and estimated by the
memory model with no change to any of them.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_tiling import REL_TOL, LiveTensorBytes, close, image
from tolerances import rounding_atol, vae_depth
from torch import nn

from zturbo import VAE, ModelConfig
from zturbo.distill.prune import prune_into, site_graph
from zturbo.errors import UsageError
from zturbo.model.blocks import Attention, ResnetBlock2D
from zturbo.model.plan import PlanBuilder
from zturbo.tiling.memory import coder_plan, tiled_peak_bytes, untiled_peak_bytes
from zturbo.tiling.parallel import decode_parallel

pytestmark = pytest.mark.usefixtures("one_compute_thread")

TINY = {"block_out_channels": [8, 16, 16], "norm_num_groups": 4, "latent_channels": 4, "layers_per_block": 1}


class TwoConvs(nn.Module):
    """A layer of a kind the engines have no code for: two 3x3 convolutions with a ReLU between them
    and a residual, no global statistics. Its output at a pixel reads its input within 2 pixels."""

    def __init__(self, channels: int):
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 3, padding=1)
        self.b = nn.Conv2d(channels, channels, 3, padding=1)

    def add_to_plan(self, plan: PlanBuilder) -> None:
        plan.add("local", self, self.a.in_channels, self.b.out_channels, halo=2, inner=self.a.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.relu(self.a(x)))


def base() -> VAE:
    torch.manual_seed(0)
    return VAE(ModelConfig(**TINY)).eval()


def variant(local: bool = True) -> VAE:
    """The TINY model with layers added in its module tree only (the config does not describe them);
    with ``local``, a layer of the ``local`` kind in each coder too."""
    vae = base()
    g = TINY["norm_num_groups"]
    torch.manual_seed(1)
    dec, enc = vae.decoder, vae.encoder
    last = dec.up_blocks[-1].resnets  # full resolution, 8 channels: widen to 32 and back
    last.append(ResnetBlock2D(8, 32, g, vae.kernels))
    last.append(ResnetBlock2D(32, 8, g, vae.kernels))
    dec.mid_block.attentions.append(Attention(16, g, vae.kernels))
    enc.down_blocks[0].resnets.append(ResnetBlock2D(8, 8, g, vae.kernels))
    if local:
        dec.up_blocks[1].resnets.insert(1, TwoConvs(16))
        enc.down_blocks[0].resnets.append(TwoConvs(8))
    for module in vae.modules():  # scale the new weights like the rest, so the variant's outputs stay O(1)
        if isinstance(module, nn.Conv2d) and module.weight.abs().max() > 1:
            module.weight.data.mul_(0.1)
    return vae.eval()


def latent(shape=(2, 4, 9, 13)) -> torch.Tensor:
    z = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    z[1:] = z[1:] * 3 + 1  # other samples with other statistics: GroupNorm moments are per sample
    return z


def test_the_plan_lists_the_decoder_as_it_is_built():
    vae = VAE(ModelConfig(block_out_channels=[96, 192, 384, 384], latent_channels=8))
    plan = vae.decoder.plan()
    assert [layer.kind for layer in plan[:5]] == ["conv", "resnet", "attention", "resnet", "resnet"]
    assert plan[0].name == "conv_in" and plan[-1].name == "conv_out" and plan[-1].norm is vae.decoder.conv_norm_out
    ups = [layer for layer in plan if layer.kind == "upsample"]
    assert [(u.name, u.cin, int(u.resolution)) for u in ups] == [
        ("up_blocks.0.upsamplers.0", 384, 1), ("up_blocks.1.upsamplers.0", 384, 2), ("up_blocks.2.upsamplers.0", 192, 4)]
    assert sum(layer.kind == "resnet" for layer in plan) == 2 + 4 * 3
    assert plan[-1].resolution == 8 and plan[-1].cout == 3
    enc = vae.encoder.plan()
    assert [layer.kind for layer in enc].count("downsample") == 3 and enc[-1].output_resolution == pytest.approx(1 / 8)
    for layer in plan:  # every name is the module's own path
        assert vae.decoder.get_submodule(layer.name) is layer.module


def test_the_forward_runs_the_variant():
    a, b = base(), variant()
    z = latent()
    with torch.no_grad():
        assert not torch.allclose(a.decode(z), b.decode(z), atol=1e-3)
        names = [layer.name for layer in b.decoder.plan()]
    assert "mid_block.attentions.1" in names and "up_blocks.1.resnets.1" in names
    assert names.index("up_blocks.2.resnets.3") == len(names) - 2


@pytest.mark.parametrize("tile", [4, 12])
def test_exact_and_recompute_tiling_follow_the_variant(tile):
    vae, z = variant(), latent()
    x = image(2, 36, 52)
    x[1] = x[1] * 0.3 + 0.5
    with torch.no_grad():
        ref = vae.decode(z)
        close(vae.decode(z, tile=tile), ref)
        close(vae.decode(z, tile=tile, recompute=True), ref)
        close(vae.encode(x, tile=tile).mean, vae.encode(x).mean)


def test_fast_tiling_follows_the_variant():
    """With full-size statistics and a halo covering the image, fast mode is exact: only the walk is tested."""
    vae = variant()
    z = latent((1, 4, 8, 12))
    x = image(1, 32, 48)
    with torch.no_grad():
        close(vae.decode(z, tile=8, tile_mode="fast", halo=48, stats_size=12), vae.decode(z))
        close(vae.encode(x, tile=8, tile_mode="fast", halo=48, stats_size=12).mean, vae.encode(x).mean)


def test_the_memory_estimate_follows_the_variant():
    cfg_plan, variant_plan = coder_plan(base(), "decode"), coder_plan(variant(), "decode")
    assert len(variant_plan) == len(cfg_plan) + 4
    # The widening ResNet's full-resolution maps (8 -> 32 channels) raise both estimates.
    assert untiled_peak_bytes(variant_plan, 1, 32, 32) > untiled_peak_bytes(cfg_plan, 1, 32, 32)
    assert tiled_peak_bytes(variant_plan, 1, 32, 32, 16) > tiled_peak_bytes(cfg_plan, 1, 32, 32, 16)
    vae, z = variant(), latent((1, 4, 32, 32))
    with torch.no_grad(), LiveTensorBytes() as stored:
        vae.decode(z, tile=16)
    assert stored.peak <= tiled_peak_bytes(variant_plan, 1, 32, 32, 16)


def _rank(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        torch.save(decode_parallel(variant(), latent()), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # starts two processes
def test_parallel_decode_follows_the_variant(tmp_path):
    world = 2
    mp.spawn(_rank, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world)
    vae, z = variant(), latent()
    with torch.no_grad():
        ref = vae.decode(z)
    atol = rounding_atol(ref, *vae_depth(vae))
    for r in range(world):
        out = torch.load(tmp_path / f"{r}.pt", weights_only=True)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= max(atol, REL_TOL * ref.abs().max().item())


def test_a_layer_that_does_not_describe_itself_is_named():
    vae = base()
    vae.decoder.up_blocks[0].resnets.append(nn.Identity())
    with pytest.raises(TypeError, match="Identity does not describe itself to the layer plan"):
        vae.decoder.plan()


def test_parallel_decode_in_one_process_follows_the_variant():
    vae = variant()
    z = latent((1, 4, 3, 5))
    with torch.no_grad():
        close(decode_parallel(vae, z), vae.decode(z))



def test_pruning_follows_the_variant():
    """The site graph lists the added layers, and pruning the variant to its own widths keeps it exactly."""
    teacher = variant(local=False)
    graph = site_graph(teacher.decoder)
    assert "mid_block.attentions.1.to_q" in graph.layers and "up_blocks.2.resnets.3.conv_shortcut" in graph.layers
    student = variant(local=False)
    for p in student.parameters():
        p.data.normal_()
    with torch.no_grad():
        prune_into(teacher.decoder, student.decoder, TINY["norm_num_groups"])
        prune_into(teacher.encoder, student.encoder, TINY["norm_num_groups"])
        z, x = latent(), image(2, 32, 32)
        assert torch.equal(student.decoder(z), teacher.decoder(z))
        assert torch.equal(student.encoder(x), teacher.encoder(x))


def test_pruning_names_a_layer_it_cannot_read():
    with pytest.raises(UsageError, match=r"up_blocks.1.resnets.1 is a local layer"):
        site_graph(variant().decoder)
