"""`eval --latent-stats --write` on a FLUX.2-layout model: the BatchNorm statistics, and a student keeping them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import write_demo_photos

from zturbo.cli import run
from zturbo.errors import CheckpointError, UsageError
from zturbo.eval.data import find_images, iter_batches
from zturbo.eval.latent_stats import latent_statistics, write_latent_stats
from zturbo.model import VAE, ModelConfig
from zturbo.model.diffusers import WEIGHTS_NAME
from zturbo.model.vae import patchify_latents

# AutoencoderKLFlux2's layout, tiny: 4 latent channels patchified 2x2 into 16 normalised by bn.
FLUX2 = ModelConfig(block_out_channels=[16, 32], norm_num_groups=4, layers_per_block=1, latent_channels=4,
                    sample_size=32, mid_block_add_attention=False, patch_size=[2, 2])

pytestmark = pytest.mark.usefixtures("one_compute_thread")


@pytest.fixture
def flux2_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return VAE(FLUX2).save_pretrained(tmp_path / "flux2")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return write_demo_photos(tmp_path / "photos")


def _latents(model_dir: Path, photos: Path) -> torch.Tensor:
    """The posterior means in one batch of 4, as latent_statistics computes them with batch_size=4."""
    vae = VAE.from_pretrained(model_dir)
    (batch,) = iter_batches(find_images(photos), 32, 4, 1 << 28)
    with torch.no_grad():
        return vae.encode(batch.pixels.float().div_(127.5).sub_(1.0)).mean


def test_bn_statistics_match_a_direct_computation(flux2_dir, photos):
    stats = latent_statistics(flux2_dir, photos, size=32, batch_size=4)
    z = patchify_latents(_latents(flux2_dir, photos), [2, 2]).double()  # (4, 16, 8, 8)
    per_channel = z.transpose(0, 1).flatten(1)
    assert len(stats.bn_running_mean) == 16 and stats.positions == 4 * 16 * 16
    # The same fp32 latents (same batch, same model); only the float64 sums' order differs,
    # 256 terms of |z| < 10: under 256 * 2^-53 * 100, far below 1e-10.
    torch.testing.assert_close(torch.tensor(stats.bn_running_mean, dtype=torch.float64), per_channel.mean(1),
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.tensor(stats.bn_running_var, dtype=torch.float64),
                               per_channel.var(1, unbiased=True), rtol=0, atol=1e-10)
    with pytest.raises(UsageError, match="multiple of 4"):
        latent_statistics(flux2_dir, photos, size=30)


def test_write_stores_bn_statistics_and_nothing_else(flux2_dir, photos, capsys):
    before_config = (flux2_dir / "config.json").read_bytes()
    before = load_file(str(flux2_dir / WEIGHTS_NAME))
    assert run(["eval", str(flux2_dir), "--data", str(photos), "--latent-stats", "--size", "32", "--batch-size", "4",
                "--write", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["written"] == str(flux2_dir / WEIGHTS_NAME)
    after = load_file(str(flux2_dir / WEIGHTS_NAME))
    assert (flux2_dir / "config.json").read_bytes() == before_config
    assert sorted(after) == sorted(before)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"bn.running_mean", "bn.running_var"}
    assert torch.equal(after["bn.running_mean"], torch.tensor(result["bn_running_mean"], dtype=torch.float64).float())
    assert torch.equal(after["bn.running_var"], torch.tensor(result["bn_running_var"], dtype=torch.float64).float())
    assert [p.name for p in flux2_dir.iterdir() if p.name.startswith(".")] == []

    # What the pipelines then see, (patchify(z) - mean) / sqrt(var + eps): zero mean and a variance
    # of var / (var + eps) per channel over the data, up to fp32 rounding of the stored statistics.
    vae = VAE.from_pretrained(flux2_dir)
    normalised = vae.normalize_latents(_latents(flux2_dir, photos)).double().transpose(0, 1).flatten(1)
    var = vae.bn.running_var.double()
    torch.testing.assert_close(normalised.mean(1), torch.zeros(16, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(normalised.var(1), var / (var + FLUX2.batch_norm_eps), rtol=1e-5, atol=0)


def test_write_refuses_weights_it_cannot_update_in_place(flux2_dir, photos):
    stats = latent_statistics(flux2_dir, photos, size=32)
    legacy = flux2_dir.parent / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_bytes((flux2_dir / "config.json").read_bytes())
    torch.save(load_file(str(flux2_dir / WEIGHTS_NAME)), legacy / "diffusion_pytorch_model.bin")
    before = (legacy / "diffusion_pytorch_model.bin").read_bytes()
    stats.model = str(legacy)
    with pytest.raises(CheckpointError, match="single safetensors file"):
        write_latent_stats(stats)
    assert (legacy / "diffusion_pytorch_model.bin").read_bytes() == before


def test_distilled_decoder_keeps_the_teachers_bn_statistics_exactly(flux2_dir, photos, tmp_path, capsys):
    assert run(["eval", str(flux2_dir), "--data", str(photos), "--latent-stats", "--size", "32", "--write",
                "--quiet"]) == 0
    capsys.readouterr()
    teacher = VAE.from_pretrained(flux2_dir)
    out = tmp_path / "run"
    assert run(["train", "--profile", "demo", "--data", str(photos), "--output", str(out), "--image-size", "32",
                "--batch-size", "2", "--max-steps", "2", "--teacher", str(flux2_dir), "--decoder-channels", "8,16",
                "--num-workers", "0", "--quiet"]) == 0
    student = VAE.from_pretrained(out / "final")
    assert student.config.decoder_channels == [8, 16] and student.config.patch_size == [2, 2]
    for name in ("running_mean", "running_var"):
        assert torch.equal(getattr(student.bn, name), getattr(teacher.bn, name)), name
