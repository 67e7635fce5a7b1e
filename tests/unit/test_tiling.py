"""Tiled encode and decode: the exact mode equals the untiled pass; fast mode, memory, bad input."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from tolerances import rounding_atol
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from zturbo import VAE, ModelConfig
from zturbo.errors import UsageError
from zturbo.tiling import maps
from zturbo.tiling.maps import Moments, online_attention
from zturbo.tiling.memory import coder_plan, plan_tiling, tiled_peak_bytes

pytestmark = pytest.mark.usefixtures("one_compute_thread")  # many tiny convs: a second thread only adds overhead

# Factor 4, GroupNorm over 4-channel groups, attention in the mid block, a channel change in every stage.
TINY = {"block_out_channels": [8, 16, 16], "norm_num_groups": 4, "latent_channels": 4, "layers_per_block": 1}
# The fast profile's structure (widths, 32 groups, two ResNets per stage, attention), factor 8.
REALISTIC = {"block_out_channels": [96, 192, 384, 384], "latent_channels": 8}

# Tolerance. Tiled and untiled compute the same sums in another order (convolutions blocked over other
# spatial extents) and GroupNorm as x*scale + shift instead of (x - mean)*rstd*w + b. Each layer then
# differs by about sqrt(K) fp32 roundings of its output scale, K <= 9*384 terms: 59 * 6e-8 = 3.5e-6;
# over the ~30 layers of a decoder, summed worst case, ~1e-4 of the output's scale. A wrong halo or
# per-tile statistics change outputs at the 1e-2..1e0 level.
REL_TOL = 1e-4


def close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
    assert err <= REL_TOL * max(scale, 1.0), f"max abs error {err:.3g} at output scale {scale:.3g}"


def model(**cfg) -> VAE:
    torch.manual_seed(0)
    return VAE(ModelConfig(**cfg)).eval()


def image(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(b, 3, h // 4 + 1, w // 4 + 1, generator=g), size=(h, w), mode="bilinear")
    return (smooth + 0.1 * torch.randn(b, 3, h, w, generator=g)).clamp(0, 1) * 2 - 1


@pytest.mark.parametrize("tile", [4, 12, 20, 44])  # 4: one latent pixel per tile, far below the receptive field
def test_exact_encode_equals_untiled_across_tiles(tile):
    vae = model(**TINY)
    x = image(2, 36, 52)  # non-square, not a multiple of any tile; the second sample differs (per-sample stats)
    x[1] = x[1] * 0.3 + 0.5
    with torch.no_grad():
        ref = vae.encode(x)
        out = vae.encode(x, tile=tile)
    close(out.mean, ref.mean)
    close(out.logvar, ref.logvar)


@pytest.mark.parametrize("tile", [4, 12, 28])
def test_exact_decode_equals_untiled_across_tiles(tile):
    vae = model(**TINY)
    z = torch.randn(2, 4, 9, 13, generator=torch.Generator().manual_seed(1))  # odd latent sizes
    z[1] = z[1] * 3 + 1
    with torch.no_grad():
        close(vae.decode(z, tile=tile), vae.decode(z))


def test_odd_image_size_encodes_exactly():
    """Odd sizes make the downsample's asymmetric padding and the last tiles' halos meet at the edge."""
    vae = model(**TINY)
    x = image(1, 37, 23)
    with torch.no_grad():
        close(vae.encode(x, tile=8).mean, vae.encode(x).mean)


def test_one_tile_equals_no_tiling():
    vae = model(**TINY)
    x = image(1, 32, 32)
    with torch.no_grad():
        z = vae.encode(x).mode()
        close(vae.encode(x, tile=64).mean, vae.encode(x).mean)
        close(vae.decode(z, tile=64), vae.decode(z))


def test_encode_then_tiled_decode_round_trip():
    vae = model(**TINY)
    x = image(1, 40, 56)
    with torch.no_grad():
        ref = vae.decode(vae.encode(x).mode())
        out = vae.decode(vae.encode(x, tile=16).mode(), tile=8)
    close(out, ref)


def test_realistic_structure_is_exact_both_ways():
    vae = model(**REALISTIC)
    x = image(1, 48, 72)
    with torch.no_grad():
        post = vae.encode(x)
        close(vae.encode(x, tile=16).mean, post.mean)
        close(vae.decode(post.mode(), tile=16), vae.decode(post.mode()))


def test_offloaded_tiles_give_the_same_result():
    vae = model(**TINY)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        close(vae.decode(z, tile=8, offload=True), vae.decode(z))


def test_moments_merge_stays_accurate_where_plain_sums_cancel():
    """Mean 1e4, spread 1e-2: sum(x^2)/n - mean^2 in fp32 loses every digit; Chan's merge keeps them."""
    g = torch.Generator().manual_seed(0)
    x = 1e4 + 1e-2 * torch.randn(1, 8, 64, 64, generator=g, dtype=torch.float64)
    moments = Moments()
    for rows in x.float().split(7, dim=2):
        for tile in rows.split(9, dim=3):
            moments.add(tile)
    gn = torch.nn.GroupNorm(2, 8, affine=False, eps=0.0)
    scale, _shift, _ = moments.norm(gn, silu=False)
    var = x.view(1, 2, -1).var(-1, unbiased=False)
    expected = var.rsqrt().repeat_interleave(4, 1).view(1, 8, 1, 1)
    # fp32 holds the tile means to 1e4 * 6e-8 = 6e-4 absolute, 6% of the 1e-2 spread: the merge is
    # exact in the deviations, so only that rounding of the tile data itself remains.
    torch.testing.assert_close(scale.double(), expected, rtol=0.1, atol=0)
    naive = (x.float().pow(2).mean((2, 3)) - x.float().mean((2, 3)).pow(2))
    assert (naive - var.repeat_interleave(4, 1)).abs().max() > 10 * var.max()  # why the merge is needed


def test_online_attention_equals_softmax_attention(monkeypatch):
    monkeypatch.setattr(maps, "Q_CHUNK", 7)  # blocks that do not divide the token count
    monkeypatch.setattr(maps, "K_CHUNK", 11)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 30, 16, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    # In float64 the blockwise softmax differs from the one-pass one by rounding alone: two products
    # (scores over 16 dims, values over 30 tokens) bound it (tests/tolerances.py); in fp32 the same
    # check sat at half its tolerance on this machine.
    atol = rounding_atol(ref, layers=2, fan_in=30)
    torch.testing.assert_close(online_attention(q, k, v), ref, rtol=0, atol=atol)


def test_fast_mode_without_downscaling_and_with_full_halo_is_exact():
    """Statistics from the full-size pass and a halo covering the image: only the mechanism remains."""
    vae = model(**TINY)
    z = torch.randn(1, 4, 8, 12)
    with torch.no_grad():
        close(vae.decode(z, tile=8, tile_mode="fast", halo=48, stats_size=12), vae.decode(z))
        x = image(1, 32, 48)
        close(vae.encode(x, tile=8, tile_mode="fast", halo=48, stats_size=12).mean, vae.encode(x).mean)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created while active and still referenced (pre-existing storage is
    counted only while a new view of it lives). Deterministic, unlike RSS, and blind to the allocator's
    caching; a tensor op's internal scratch (oneDNN reorders) is not seen, which affects both passes alike."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, int] = {}

    def _drop(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if key not in self.refs:
                    self.refs[key] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._drop, key, nbytes)
        return out


@pytest.mark.slow  # measures peaks at several sizes
def test_exact_decode_memory_stays_under_its_estimate_and_the_untiled_peak():
    cfg = ModelConfig(**TINY)
    vae = model(**TINY)
    z = torch.randn(1, 4, 32, 32)  # a 128 px image
    with torch.no_grad():
        with LiveTensorBytes() as untiled:
            vae.decode(z)
        with LiveTensorBytes() as stored:
            vae.decode(z, tile=16)
        with LiveTensorBytes() as lean:
            vae.decode(z, tile=16, recompute=True)
    # Decoder levels 16, 16, 8 (latent to image), P image pixels. The untiled first ResNet of the last
    # stage (16 -> 8 channels) holds x, GN(x) and conv1's output: at least (2*16 + 8) P = 40 P values.
    # The stored tiled pass holds x and conv1's output, (16 + 8) P = 24 P, plus one tile's workspace:
    # 24/40 = 0.6, plus a little.
    assert stored.peak <= 0.65 * untiled.peak, (stored.peak, untiled.peak)
    assert stored.peak <= tiled_peak_bytes(coder_plan(cfg, "decode"), 1, 32, 32, 16)
    # Recomputing, the full-resolution ResNets hold their input (the upsample's 16-channel source at
    # P/4 = 4 P, or 8 P) and the output that replaces it row by row: about 8 P; the level below, stored,
    # (16 + 16) P/4 = 8 P. Add a tile row or two of band and one tile's workspace (16 px tiles of 128:
    # an eighth of a map per row): under half of the stored pass, under 0.3 of the untiled one.
    assert lean.peak <= 0.5 * stored.peak, (lean.peak, stored.peak)
    assert lean.peak <= 0.3 * untiled.peak, (lean.peak, untiled.peak)
    assert lean.peak <= tiled_peak_bytes(coder_plan(cfg, "decode"), 1, 32, 32, 16, recompute=True)


def test_tile_not_a_multiple_of_the_factor_is_refused():
    vae = model(**TINY)
    with pytest.raises(UsageError, match=r"^tile 10 px is not a multiple of the downsampling factor 4 .*use 8 or 12$"):
        vae.decode(torch.randn(1, 4, 8, 8), tile=10)


def test_tile_below_the_minimum_is_refused_with_the_minimum():
    vae = model(**TINY)
    with pytest.raises(UsageError, match=r"below the minimum of 4 px: a tile must hold at least one latent pixel"):
        vae.encode(torch.randn(1, 3, 16, 16), tile=2)


def test_a_pass_over_the_memory_budget_says_how_much_it_needs():
    vae = model(**TINY)
    z = torch.randn(1, 4, 64, 64)
    with pytest.raises(UsageError, match=r"with 32 px tiles needs about [0-9.]+ MiB, over the memory budget of 1.0 MiB"):
        vae.decode(z, tile=32, memory_budget=1 << 20)
    with pytest.raises(UsageError, match=r"needs about [0-9.]+ MiB even tiled"):
        vae.decode(z, tile="auto", memory_budget=1 << 20)


@pytest.mark.parametrize("bad", [{"tile_mode": "blend"}, {"tile": 12.5}, {"tile_mode": "fast", "halo": 6}])
def test_other_bad_tiling_arguments_are_refused(bad):
    vae = model(**TINY)
    with pytest.raises(UsageError):
        vae.decode(torch.randn(1, 4, 8, 8), **{"tile": 8, **bad})


def test_auto_tiles_only_when_the_untiled_pass_does_not_fit():
    decoder = coder_plan(ModelConfig(**TINY), "decode")
    plenty = plan_tiling(decoder, 1, 64, 64, budget_bytes=1 << 40)
    assert plenty.tile is None
    tight = plan_tiling(decoder, 1, 64, 64, budget_bytes=plenty.peak_bytes - 1)
    assert tight.tile is not None and tight.peak_bytes < plenty.peak_bytes
    vae = model(**TINY)
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        close(vae.decode(z, tile="auto", memory_budget=tight.peak_bytes), vae.decode(z))


def test_fast_mode_error_is_below_diffusers_tiling_error_on_the_same_weights():
    """Per-tile statistics (diffusers) versus statistics shared by all tiles (ours), on an image whose
    latent spans 4x4 tiles. Random weights make both far from exact (attention and GroupNorm see the
    whole image); the bound is relative: the shared statistics and the exact latent stage must not
    do worse than per-tile normalisation with blending."""
    diffusers = pytest.importorskip("diffusers")
    cfg = ModelConfig(**TINY)
    vae = model(**TINY)
    n = len(cfg.block_out_channels)
    ref = diffusers.AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups, sample_size=32,
    ).eval()
    ref.load_state_dict(vae.state_dict())
    ref.enable_tiling()
    x = image(1, 128, 128)
    with torch.no_grad():
        z = vae.encode(x).mode()
        exact = vae.decode(z)
        ours = (vae.decode(z, tile=32, tile_mode="fast") - exact).abs().max()
        theirs = (ref.decode(z).sample - exact).abs().max()
    assert 0 < ours < theirs, (ours.item(), theirs.item())
