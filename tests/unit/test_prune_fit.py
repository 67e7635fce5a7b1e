"""Calibrated pruning: the ridge refit of each pruned conv (zturbo.distill.prune_fit) and its calibration data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_helpers import write_demo_photos

from zturbo.config import load_settings
from zturbo.data.datasets import split_data
from zturbo.distill.prune import channel_importance, kept_channels, prune_vae, site_graph
from zturbo.distill.prune_fit import ridge_conv
from zturbo.distill.student import calibration_batch
from zturbo.model import VAE, ModelConfig

TEACHER = ModelConfig(block_out_channels=[16, 32], norm_num_groups=4, layers_per_block=1, latent_channels=4,
                      sample_size=32)
HALF = TEACHER.model_copy(update={"decoder_block_out_channels": [8, 16]})

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def smooth_images(n: int, size: int = 32) -> torch.Tensor:
    """Images with structure at several scales (upsampled noise), in [-1, 1]."""
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(n, 3, size // 4, size // 4, generator=g) * 2 - 1
    return (F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
            + 0.1 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1)


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])  # a ResNet / upsampler conv; a downsampler's
def test_ridge_without_damping_recovers_a_conv_exactly(stride, padding):
    torch.manual_seed(0)
    truth, start = nn.Conv2d(6, 5, 3, stride, padding), nn.Conv2d(6, 5, 3, stride, padding)
    x = torch.randn(3, 6, 16, 16)
    with torch.no_grad():
        y = truth(x)
    weight, bias = ridge_conv(start, x, y, damping=0.0)
    # y is exact up to fp32 rounding (~1e-6 over 54 products of unit size); 768 (stride 1) or 147 (stride 2)
    # patch rows of Gaussian noise for 55 unknowns keep X^T X well conditioned, so the solve moves that
    # by at most a small factor: 1e-4 is far above it and far below the weights' own size (~0.1).
    torch.testing.assert_close(weight, truth.weight.detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(bias, truth.bias.detach(), atol=1e-4, rtol=0)


def test_ridge_damping_pulls_towards_the_pruned_weights():
    torch.manual_seed(0)
    truth, start = nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        y = truth(x)
    weight, _ = ridge_conv(start, x, y, damping=1e6)
    # theta = theta0 + (G + lam I)^-1 (X^T Y - G theta0) with lam = 1e6 mean(diag G): the step is ~1e-6 of
    # X^T Y / mean(diag G) (order 1), so the weights stay within 1e-4 of the start.
    torch.testing.assert_close(weight, start.weight.detach(), atol=1e-4, rtol=0)


def decoder_error(student: VAE, teacher: VAE, images: torch.Tensor) -> float:
    with torch.no_grad():
        z = teacher.encode(images).mean
        return float((student.decode(z) - teacher.decode(z)).pow(2).mean())


def test_calibration_brings_the_pruned_decoder_closer_to_the_teacher():
    torch.manual_seed(0)
    teacher = VAE(TEACHER).eval()
    images = smooth_images(4)
    plain = prune_vae(teacher, VAE(HALF), ("decoder",))
    fitted = prune_vae(teacher, VAE(HALF), ("decoder",), images).eval()
    # The last conv is fit to the teacher's output itself, given the student's own input to it; the
    # pruned weights are one candidate of that fit, so swapping them back can only raise the error on the
    # calibration images (up to fp32 rounding of the two decodes, far below 1e-4 of it).
    swapped = VAE(HALF).eval()
    swapped.load_state_dict(fitted.state_dict())
    with torch.no_grad():
        swapped.decoder.conv_out.weight.copy_(plain.decoder.conv_out.weight)
        swapped.decoder.conv_out.bias.copy_(plain.decoder.conv_out.bias)
    err_fitted = decoder_error(fitted, teacher, images)
    assert err_fitted <= decoder_error(swapped, teacher, images) * (1 + 1e-4)
    # End to end (every narrowed layer refit in turn): closer than the weight-only pruning, on the
    # calibration images and on others of the same kind.
    assert err_fitted < decoder_error(plain, teacher, images)
    held_out = smooth_images(8)[4:]
    assert decoder_error(fitted, teacher, held_out) < decoder_error(plain, teacher, held_out)
    # The frozen parts stay the teacher's.
    for key, value in teacher.state_dict().items():
        if not key.startswith(("decoder.", "post_quant_conv.")):
            assert torch.equal(fitted.state_dict()[key], value), key


def test_calibration_keeps_the_exact_cases_exact_and_fits_the_encoder():
    torch.manual_seed(0)
    teacher = VAE(TEACHER).eval()
    images = smooth_images(2)
    same = prune_vae(teacher, VAE(TEACHER), images=images)  # nothing removed: nothing refit
    for key, value in teacher.state_dict().items():
        assert torch.equal(same.state_dict()[key], value), key
    narrow = HALF.model_copy(update={"block_out_channels": [8, 16]})
    both = prune_vae(teacher, VAE(narrow), images=images)
    with torch.no_grad():  # the encoder's refit (its downsampler a stride-2 conv) brings it closer too
        plain_error = (prune_vae(teacher, VAE(narrow)).encode(images).mean - teacher.encode(images).mean).pow(2).mean()
        assert (both.encode(images).mean - teacher.encode(images).mean).pow(2).mean() < plain_error
    graph = site_graph(teacher.decoder)
    keep = kept_channels(channel_importance(teacher.decoder, graph)[graph.layers["conv_in"][1]], 16, groups=4)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():  # the first conv reads the whole latent, so it is not refit: bit for bit
        assert torch.equal(both.decoder.conv_in(z), teacher.decoder.conv_in(z)[:, keep])


def test_calibration_batch_takes_training_crops(tmp_path: Path):
    photos = write_demo_photos(tmp_path / "photos")  # four photos

    def settings(**distill):
        return load_settings("demo", None, {
            "data": {"data_dir": photos, "image_size": 32, "val_images": 1, "num_workers": 0},
            "distill": {"teacher": tmp_path, **distill},
        })

    train = split_data(photos, 1).train  # one of the four is held out
    cpu = torch.device("cpu")
    batch = calibration_batch(settings(calibration_images=16), train, cpu)
    assert batch.shape == (3, 3, 32, 32)  # every training image, at the crop size
    assert batch.min() >= -1 and batch.max() <= 1
    two = calibration_batch(settings(calibration_images=2), train, cpu)
    assert torch.equal(two, batch[[0, 1]])  # evenly spaced: images 0 and 3 // 2 = 1
    assert calibration_batch(settings(calibration_images=0), train, cpu) is None
    assert calibration_batch(settings(init="random"), train, cpu) is None
