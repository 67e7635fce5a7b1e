"""loss.lpips_size: LPIPS on a resized or cropped view of reconstruction and target."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zturbo.config import LossConfig, load_settings
from zturbo.errors import UsageError
from zturbo.train.engine import TrainEngine
from zturbo.train.losses import VAELoss, perceptual_view


class Recorder(nn.Module):
    """A stand-in perceptual net: the mean squared difference, remembering the shapes it saw."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(a.shape))
        return ((a - b) ** 2).mean(dim=(1, 2, 3), keepdim=True)


def test_full_resolution_is_the_default_and_passes_tensors_through():
    a, b = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    assert LossConfig().lpips_size is None
    for size in (None, 16):
        ra, rb = perceptual_view(a, b, size, "resize")
        assert ra is a and rb is b


def test_resize_view_averages_whole_pixels():
    # Constant 2x2 blocks: an area downsample by 2 returns each block's value exactly.
    small = torch.rand(1, 3, 8, 8)
    big = small.repeat_interleave(2, -2).repeat_interleave(2, -1)
    ra, rb = perceptual_view(big, big * 2, 8, "resize")
    torch.testing.assert_close(ra, small)
    torch.testing.assert_close(rb, small * 2)


def test_crop_view_is_the_square_at_the_offset_and_passes_gradients():
    a = torch.rand(2, 3, 20, 24, requires_grad=True)
    b = torch.rand(2, 3, 20, 24)
    ra, rb = perceptual_view(a, b, 8, "crop", torch.tensor([5, 11]))
    assert torch.equal(ra, a[..., 5:13, 11:19]) and torch.equal(rb, b[..., 5:13, 11:19])
    ra.sum().backward()
    assert a.grad[..., 5:13, 11:19].eq(1).all() and a.grad.sum() == ra.numel()


def test_lpips_size_larger_than_the_image_is_a_one_line_error():
    a = torch.rand(1, 3, 32, 32)
    with pytest.raises(UsageError, match="lpips_size=64 is larger than the 32x32") as info:
        perceptual_view(a, a, 64, "resize")
    assert "\n" not in info.value.message
    overrides = {
        "model": {"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4, "sample_size": 32},
        "data": {"image_size": 32},
        "train": {"precision": "fp32"},
        "loss": {"perceptual_weight": 0.5, "disc_weight": 0.0, "lpips_size": 64},
    }
    settings = load_settings(None, None, overrides, default_profile=None)
    with pytest.raises(UsageError, match="lpips_size"):  # at start-up, before any step
        TrainEngine(settings, torch.device("cpu"), perceptual=Recorder())


@pytest.mark.parametrize("view", ["resize", "crop"])
def test_the_loss_feeds_the_perceptual_net_the_view(view):
    recorder = Recorder()
    loss = VAELoss(LossConfig(perceptual_weight=1.0, lpips_size=16, lpips_view=view), recorder)
    target = torch.rand(2, 3, 32, 32)
    recon = target.clone().requires_grad_(True)
    mean, logvar = torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    total, terms = loss(target, recon, mean, logvar, crop_offset=torch.tensor([3, 9]))
    assert recorder.shapes == [(2, 3, 16, 16)]
    assert terms["lpips"] == 0  # identical views
    total.backward()
    assert recon.grad is not None


def test_cli_reports_a_too_large_lpips_size_before_loading_the_backbone(
    monkeypatch, capsys, tiny_config, small_data, tmp_path
):
    """Offline with no LPIPS backbone cached: the size error comes first (exit 2, one line), not the missing file."""
    from zturbo.cli import run

    def offline(url, dst, progress=True):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("ZTURBO_LOSS__LPIPS_SIZE", "64")
    run_dir = tmp_path / "run"
    rc = run(["train", "--config", str(tiny_config), "--data", str(small_data), "--output", str(run_dir),
              "--perceptual-weight", "0.5", "--max-steps", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 2, lines
    assert lines[0] == "error: loss.lpips_size=64 is larger than the 32x32 training images"
    assert lines[1].startswith("hint: set loss.lpips_size to at most 32")
    assert not run_dir.exists()
