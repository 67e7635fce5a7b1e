"""Patch-parallel decode: ranks on the gloo backend (CPU processes) give the single-process decode."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tolerances import SAFETY, rounding_atol, unit_roundoff, vae_depth

from zturbo import VAE, ModelConfig
from zturbo.errors import UsageError
from zturbo.tiling.maps import Moments
from zturbo.tiling.parallel import band_bounds, decode_parallel

# Factor 4, 4 GroupNorm groups, mid-block attention, a channel change in every stage.
TINY = {"block_out_channels": [8, 16, 16], "norm_num_groups": 4, "latent_channels": 4, "layers_per_block": 1}
LATENT = (2, 4, 7, 10)  # non-square; 7 rows split 3 + 4 over two ranks, 2 + 2 + 3 over three


def model(dtype: torch.dtype) -> VAE:
    torch.manual_seed(0)
    return VAE(ModelConfig(**TINY)).eval().to(dtype)


def latent(dtype: torch.dtype, shape=LATENT) -> torch.Tensor:
    z = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z[1] = z[1] * 3 + 1  # a second sample with other statistics: GroupNorm moments are per sample
    return z.to(dtype)


def _rank(rank: int, world: int, store: str, out: str) -> None:
    """One rank: decode in fp32 and fp64, then try a latent too thin to split; results go to ``out``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        for dtype in (torch.float32, torch.float64):
            torch.save(decode_parallel(model(dtype), latent(dtype)), f"{out}/{rank}-{dtype}.pt")
        try:
            decode_parallel(model(torch.float32), latent(torch.float32, (2, 4, world - 1, 10)))
            refusal = None
        except UsageError as exc:
            refusal = str(exc)
        with open(f"{out}/{rank}.json", "w") as f:
            json.dump({"refusal": refusal}, f)
    finally:
        dist.destroy_process_group()


# 3 ranks: a middle band takes its halo from both neighbours (a few seconds more of process start-up)
@pytest.mark.slow  # starts 2 and 3 processes
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_decode_what_one_process_decodes(world, tmp_path):
    mp.spawn(_rank, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world)
    for dtype in (torch.float32, torch.float64):
        vae, z = model(dtype), latent(dtype)
        with torch.no_grad():
            ref = vae.decode(z)
        # Rounding only: the bands' convolutions, the merged GroupNorm moments and the online softmax sum
        # in another order than the untiled pass, a few roundings of the output's scale per layer
        # (tests/tolerances.py); a missing or wrong halo row, or per-band statistics, give errors of 1e-2..1e0.
        atol = rounding_atol(ref, *vae_depth(vae))
        outs = [torch.load(tmp_path / f"{r}-{dtype}.pt", weights_only=True) for r in range(world)]
        for out in outs:
            assert out.shape == ref.shape and out.dtype == dtype
            assert torch.equal(out, outs[0])  # every rank returns the same image
        err = (outs[0] - ref).abs().max().item()
        assert err <= atol, f"{dtype}: max abs error {err:.3g} > {atol:.3g}"
    for r in range(world):
        refusal = json.loads((tmp_path / f"{r}.json").read_text())["refusal"]
        assert refusal is not None and "\n" not in refusal
        assert f"at least 1 latent row per rank (a latent height of at least {world}" in refusal


def test_one_process_without_a_group_decodes_untiled():
    vae, z = model(torch.float32), latent(torch.float32)
    with torch.no_grad():
        ref = vae.decode(z)
    assert (decode_parallel(vae, z) - ref).abs().max().item() <= rounding_atol(ref, *vae_depth(vae))


def test_bands_are_as_even_as_possible():
    assert band_bounds(7, 2) == (0, 3, 7)
    assert band_bounds(7, 3) == (0, 2, 4, 7)
    assert band_bounds(3, 3) == (0, 1, 2, 3)
    with pytest.raises(UsageError, match="at least 1 latent row per rank"):
        band_bounds(2, 3)


def test_bad_latent_shape_and_group_without_distributed_are_refused():
    vae = model(torch.float32)
    with pytest.raises(UsageError, match="latent, got shape"):
        decode_parallel(vae, torch.zeros(4, 7, 10))
    with pytest.raises(UsageError, match="not initialised"):
        decode_parallel(vae, latent(torch.float32), group=object())


def test_moments_merged_over_bands_stay_accurate_next_to_a_large_mean():
    """Bands with different means (a ramp down the rows) around a mean 1e4 times the spread, in fp32."""
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 0.2, 31, dtype=torch.float64).view(1, 1, 31, 1)
    x = (1e3 + ramp + 0.05 * torch.randn(2, 8, 31, 16, generator=g, dtype=torch.float64)).float()
    total = Moments()
    for band in (x[:, :, :10], x[:, :, 10:21], x[:, :, 21:]):
        part = Moments()
        part.add(band)
        total.merge(part.n, part.mean, part.m2)
    var, mean = torch.var_mean(x.double().flatten(2), -1, correction=0)
    # Updating and pairwise variance algorithms err by about u * kappa relative, kappa = |mean| / std
    # (Chan, Golub & LeVeque 1983); sums of x and x^2 by u * kappa^2 (here ~30: no digit left), and a
    # merge without the (mean_b - mean_a)^2 term by the bands' spread of means (here ~0.5).
    kappa = (mean.abs() / var.sqrt()).max().item()
    assert total.n == 31 * 16
    assert ((total.m2.double() / total.n - var).abs() / var).max().item() <= SAFETY * unit_roundoff(x.dtype) * kappa
    assert torch.allclose(total.mean.double(), mean, rtol=0, atol=SAFETY * unit_roundoff(x.dtype) * 1e3)
