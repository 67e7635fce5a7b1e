"""Exact tiled decode that recomputes instead of storing: the untiled result in less memory."""

import pytest
import torch

from test_tiling import TINY, close, model
from tolerances import rounding_atol, vae_depth
from zturbo import ModelConfig
from zturbo.errors import UsageError
from zturbo.tiling.memory import coder_plan, plan_tiling, tiled_peak_bytes
from zturbo.tiling.recompute import recompute_plan

pytestmark = pytest.mark.usefixtures("one_compute_thread")  # many tiny convs: a second thread only adds overhead


@pytest.mark.parametrize("tile", [4, 12, 28])  # 4: one latent pixel per tile, far below the receptive field
def test_recompute_decode_equals_untiled_across_tiles(tile):
    vae = model(**TINY)
    z = torch.randn(2, 4, 9, 13, generator=torch.Generator().manual_seed(1))  # odd sizes, per-sample stats
    z[1] = z[1] * 3 + 1
    with torch.no_grad():
        close(vae.decode(z, tile=tile, recompute=True), vae.decode(z))


def test_recompute_equals_the_stored_tiled_pass_to_float64_rounding():
    """In float64 any functional difference (a wrong halo, padding before the norm, a missed zero row)
    stands ~10 orders of magnitude above rounding; the bound is two orderings of the decoder's convs."""
    vae = model(**TINY).double()
    z = torch.randn(1, 4, 11, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = vae.decode(z)
        stored = vae.decode(z, tile=8)
        lean = vae.decode(z, tile=8, recompute=True)
        lean_offloaded = vae.decode(z, tile=8, recompute=True, offload=True)
    atol = rounding_atol(ref, *vae_depth(vae))
    assert (lean - ref).abs().max().item() <= atol
    assert (lean - stored).abs().max().item() <= atol
    assert torch.equal(lean, lean_offloaded)  # the same arithmetic, only where tiles are kept differs


def test_fast_profile_plan_recomputes_only_the_largest_layers():
    # Decoder levels 384, 384, 192, 96 (latent to image). Units: channels x pixels, latent pixels = 1.
    # All recomputed, the largest need is the full-resolution resnets': 96 x 64 = 6144 (the first one's
    # fused input is 192 x 64 / 4 = 3072). Stored instead: a full-resolution resnet holds 2 x 96 x 64 =
    # 12288 (over), the 192 px level's first resnet (384 + 192) x 16 = 9216 (over), its others
    # 384 x 16 = 6144 (not over), the last upsample 4 x 192 x 16 = 12288 (over), the one before it
    # 4 x 384 x 4 = 6144 (not over).
    plan = recompute_plan(coder_plan(ModelConfig(block_out_channels=[96, 192, 384, 384]), "decode"))
    assert plan.fused == {"up_blocks.2.upsamplers.0"}
    assert plan.recompute == {"up_blocks.2.resnets.0", *(f"up_blocks.3.resnets.{j}" for j in range(3))}


def test_auto_recomputes_when_storing_does_not_fit():
    decoder = coder_plan(ModelConfig(**TINY), "decode")
    smallest_stored = min(tiled_peak_bytes(decoder, 1, 32, 32, t) for t in (4, 8, 16, 32, 64, 128))
    plan = plan_tiling(decoder, 1, 32, 32, budget_bytes=smallest_stored - 1)
    assert plan.recompute and plan.peak_bytes < smallest_stored
    vae = model(**TINY)
    z = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        close(vae.decode(z, tile="auto", memory_budget=plan.peak_bytes), vae.decode(z))


def test_recompute_is_refused_in_fast_mode():
    vae = model(**TINY)
    with pytest.raises(UsageError, match="recompute applies to the exact mode"):
        vae.decode(torch.randn(1, 4, 8, 8), tile=8, tile_mode="fast", recompute=True)
