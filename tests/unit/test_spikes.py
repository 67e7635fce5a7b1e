"""The GroupNorm spike (droplet) penalty: its statistic, its gate, and its place in the training step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from zturbo.config import load_settings
from zturbo.model import VAE, kernels
from zturbo.train.engine import TrainEngine
from zturbo.train.spikes import KURTOSIS_LIMIT, SpikePenalty, group_kurtosis

pytestmark = pytest.mark.usefixtures("one_compute_thread")

TINY = {
    "model": {"block_out_channels": [16, 32], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
              "mid_block_add_attention": False, "sample_size": 32},
    "data": {"image_size": 32, "num_workers": 0},
    "train": {"batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0, "precision": "fp32"},
    "loss": {"perceptual_weight": 0.0, "disc_weight": 0.0, "spike_weight": 1.0},
}


def tiny_vae() -> VAE:
    torch.manual_seed(0)
    return VAE(**TINY["model"])


@pytest.mark.parametrize("share", [0.5, 0.1, 0.01])
def test_kurtosis_of_a_two_point_group_has_its_closed_form(share):
    # A fraction p of the values is 1, the rest 0 (Bernoulli): kurtosis (1 - 3p + 3p^2) / (p (1 - p)).
    n = 4 * 8 * 8
    flat = torch.zeros(n)
    flat[: round(share * n)] = 1.0
    x = flat[torch.randperm(n)].reshape(1, 4, 8, 8)
    p = round(share * n) / n
    expected = (1 - 3 * p + 3 * p * p) / (p * (1 - p))
    assert group_kurtosis(x, 1).item() == pytest.approx(expected, rel=1e-5)
    # Per group: two groups with different shapes are measured apart.
    both = torch.cat([x, torch.tensor([1.0, -1.0]).repeat(n // 2).reshape(1, 4, 8, 8)], dim=1)
    values = group_kurtosis(both, 2)[0]
    assert values[0].item() == pytest.approx(expected, rel=1e-5) and values[1].item() == pytest.approx(1.0)


def test_gaussian_maps_cost_nothing_and_a_spike_costs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 32, 32, generator=g)
    # A Gaussian's kurtosis is 3; the estimate over 4096 values is within a few standard errors (sqrt(24/n)).
    assert torch.allclose(group_kurtosis(x, 4), torch.full((2, 4), 3.0), atol=6 * math.sqrt(24 / 4096))
    norm = nn.GroupNorm(4, 16)
    penalty = SpikePenalty(norm)
    with penalty.recording():
        norm(x)
    assert penalty.collect().item() == 0.0
    spiked = x.clone()
    spiked[:, :, 10:13, 10:13] += 40.0  # a 3x3 spot in every channel, as the droplets are
    assert group_kurtosis(spiked, 4).min() > 3 * KURTOSIS_LIMIT
    spiked.requires_grad_(True)
    with penalty.recording():
        norm(spiked)
    term = penalty.collect()
    assert term.item() > 1.0
    term.backward()
    # Descending the penalty's gradient flattens the spot: the term falls.
    with penalty.recording():
        norm((spiked - 0.5 * spiked.grad / spiked.grad.abs().max()).detach())
    assert penalty.collect().item() < term.item()


def test_only_the_recorded_forward_counts():
    vae = tiny_vae()
    penalty = SpikePenalty(vae)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    vae(x)  # outside recording(): nothing kept
    with pytest.raises(RuntimeError, match="recording"):
        penalty.collect()
    with penalty.recording():
        vae(x)
    norms = sum(isinstance(m, nn.GroupNorm) for m in vae.modules())
    assert len(penalty._terms) == norms  # one term per GroupNorm call
    penalty.collect()
    with torch.no_grad(), penalty.recording():
        vae(x)  # no gradient, nothing to learn from: not kept
    assert penalty._terms == []
    penalty.remove()
    assert not any(m._forward_pre_hooks for m in vae.modules())


def test_frozen_norms_are_not_watched():
    vae = tiny_vae()
    vae.encoder.requires_grad_(False)
    penalty = SpikePenalty(vae)
    watched = len(penalty._handles)
    assert watched == sum(isinstance(m, nn.GroupNorm) for m in vae.decoder.modules())
    with pytest.raises(ValueError, match="no trainable GroupNorm"):
        SpikePenalty(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_a_hooked_group_norm_never_takes_the_fused_kernel(monkeypatch):
    """The fused (Triton) GroupNorm skips the module call; a hooked norm must not, or its hooks go blind."""
    monkeypatch.setattr(kernels, "use_triton_group_norm", lambda x: True)
    monkeypatch.setattr(torch.ops, "zturbo", None)  # any use of the fused ops would fail loudly
    norm = nn.GroupNorm(2, 8)
    seen = []
    norm.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape))
    x = torch.randn(1, 8, 4, 4)
    out = kernels.group_norm_silu(norm, x, silu=True)
    assert seen == [x.shape]
    assert torch.allclose(out, torch.nn.functional.silu(norm(x)))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_step_adds_and_logs_the_term(checkpointing):
    settings = load_settings(None, None, {**TINY, "train": {**TINY["train"], "gradient_checkpointing": checkpointing}},
                             default_profile=None)
    engine = TrainEngine(settings, torch.device("cpu"), total_steps=4)
    assert engine.spikes is not None
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    result = engine.step(x, 0)
    assert "spike" in result.terms and math.isfinite(result.terms["spike"]) and result.terms["spike"] >= 0
    # The logged loss holds the term: loss = nll (+ kl_weight * kl) + spike_weight * spike.
    expected = result.terms["nll"] + settings.loss.kl_weight * result.terms["kl"] + result.terms["spike"]
    assert result.terms["loss"] == pytest.approx(expected, rel=1e-5)
    # Recomputing checkpointed layers in the backward adds no terms for the next step to pick up.
    assert engine.spikes._terms == []
    off = load_settings(None, None, {**TINY, "loss": {**TINY["loss"], "spike_weight": 0.0}}, default_profile=None)
    assert TrainEngine(off, torch.device("cpu"), total_steps=4).spikes is None
