"""Training on CUDA: bf16 autocast, micro-batch fitting, out-of-memory halving. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from zturbo.config import load_settings

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

OVERRIDES = {
    "model": {"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4, "sample_size": 64},
    "data": {"image_size": 64, "num_workers": 2, "val_images": 2},
    "train": {"batch_size": 8, "precision": "bf16", "max_steps": 4, "log_every": 1, "device": "cuda"},
    "loss": {"perceptual_weight": 0.0, "disc_weight": 0.5, "disc_start": 2},
}


def test_cuda_bf16_training_runs_and_fits_micro_batch(tmp_path):
    from zturbo.data import demo_dir
    from zturbo.train import Trainer

    settings = load_settings(
        None,
        None,
        {
            **OVERRIDES,
            "data": {**OVERRIDES["data"], "data_dir": demo_dir()},
            "train": {**OVERRIDES["train"], "output_dir": tmp_path},
        },
        default_profile=None,
    )
    trainer = Trainer(settings, quiet=True)
    result = trainer.fit()
    assert result.precision == "bf16" and result.device.startswith("cuda")
    assert result.micro_batch == 8  # a tiny model fits whole
    assert result.last_loss is not None and result.last_loss == result.last_loss
    assert result.peak_memory_gib is not None and result.peak_memory_gib > 0
    assert trainer.engine.vae.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)


def test_cuda_out_of_memory_halves_the_micro_batch():
    from zturbo.train.engine import TrainEngine

    settings = load_settings(None, None, OVERRIDES, default_profile=None)
    messages = []
    engine = TrainEngine(settings, torch.device("cuda"), total_steps=4, log=messages.append)
    real = engine.forward

    def forward(x, noise):
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x, noise)

    engine.forward = forward
    result = engine.step(torch.rand(8, 3, 64, 64) * 2 - 1, 0)
    assert result.micro_batch == 2 and not result.skipped
    assert any("retrying the step with micro-batch 4" in m for m in messages)
    assert any("micro-batch 2" in m for m in messages)
