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

    def forward(batch, noise):
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(batch, noise)

    engine.forward = forward
    result = engine.step(torch.rand(8, 3, 64, 64) * 2 - 1, 0)
    assert result.micro_batch == 2 and not result.skipped
    assert any("retrying the step with micro-batch 4" in m for m in messages)
    assert any("micro-batch 2" in m for m in messages)


def test_cuda_triton_group_norm_training_gradients_match_torch():
    """The Triton training kernels on the GPU against F.group_norm in fp32, bf16 inputs and output gradients."""
    import torch.nn.functional as F

    from zturbo.model import kernels

    torch.manual_seed(0)
    assert kernels.probe_triton_group_norm(torch.device("cuda"))
    x = (torch.randn(2, 128, 128, 128, device="cuda") * 2 + 3).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    norm = torch.nn.GroupNorm(32, 128, eps=1e-6).cuda()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    assert kernels.use_triton_group_norm(x)
    dy = torch.randn_like(x)
    y = kernels.group_norm_silu(norm, x, silu=True)
    grads = torch.autograd.grad(y, (x, norm.weight, norm.bias), dy)
    xf = x.detach().float().requires_grad_(True)
    ref = F.silu(F.group_norm(xf, 32, norm.weight, norm.bias, 1e-6))
    ref_grads = torch.autograd.grad(ref, (xf, norm.weight, norm.bias), dy.float())
    # bf16 output and input gradient: one rounding (2**-8 relative) of values of order max|ref|.
    assert (y.float() - ref).abs().max() <= 2**-7 * ref.abs().max()
    assert (grads[0].float() - ref_grads[0]).abs().max() <= 2**-7 * ref_grads[0].abs().max()
    for got, want in zip(grads[1:], ref_grads[1:]):  # fp32 sums of the same bf16 products
        assert (got - want).abs().max() <= 1e-3 * want.abs().max()


def test_cuda_compiled_step_matches_eager_and_reports_graph_breaks():
    """The compiled bf16 step (compile auto = on for CUDA) against the eager one, three steps."""
    from zturbo.train.engine import TrainEngine

    x = torch.rand(8, 3, 64, 64) * 2 - 1
    losses = {}
    for mode in ("off", "auto"):
        settings = load_settings(None, None, {**OVERRIDES, "train": {**OVERRIDES["train"], "compile": mode}},
                                 default_profile=None)
        settings.loss.disc_start = 0
        engine = TrainEngine(settings, torch.device("cuda"), total_steps=4)
        losses[mode] = [engine.step(x, i).terms["rec"] for i in range(3)]
    report = engine.compile_report()
    assert report["compiled"] and report["graph_breaks"] == 1, report  # the decoder's last conv, on purpose
    # bf16 autocast: both paths round to bf16 (2**-8 relative) at different points; 2% over three steps.
    assert losses["auto"] == pytest.approx(losses["off"], rel=2e-2)


def test_cuda_jpeg_decoding_matches_pillow_within_decoder_differences(tmp_path):
    import numpy as np
    from PIL import Image

    from zturbo.data.datasets import ImageFolderDataset
    from zturbo.data.jpeg_device import EncodedBatch, EncodedImage

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).resize((80, 64)).save(
            tmp_path / f"{i}.jpg", quality=95)
    paths = sorted(tmp_path.iterdir())
    cpu, dev = ImageFolderDataset(paths, 64), ImageFolderDataset(paths, 64, device_decode=True)
    keys = [(i, 11 + i) for i in range(3)]
    items = [dev[k] for k in keys]
    assert all(isinstance(i, EncodedImage) for i in items)
    out = EncodedBatch(items, 64).decode(torch.device("cuda"))
    ref = torch.stack([cpu[k] for k in keys]).cuda()
    # nvJPEG and libjpeg-turbo differ in IDCT and chroma upsampling: a few levels of 255 at most, on average < 1.
    diff = (out - ref).abs() * 127.5
    assert diff.max() <= 8 and diff.mean() <= 1.0


def test_cuda_out_of_memory_at_micro_batch_one_is_a_one_line_error():
    from zturbo.train.engine import TrainEngine
    from zturbo.train.memory import DoesNotFitError

    settings = load_settings(None, None, {**OVERRIDES, "train": {**OVERRIDES["train"], "compile": "off"}},
                             default_profile=None)
    engine = TrainEngine(settings, torch.device("cuda"), total_steps=4)

    def forward(batch, noise):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    engine.forward = forward
    with pytest.raises(DoesNotFitError, match="at 64 px does not fit even at micro-batch 1") as info:
        engine.step(torch.rand(8, 3, 64, 64) * 2 - 1, 0)
    assert "\n" not in info.value.message and "gradient_checkpointing" in info.value.hint


def test_cuda_training_on_jpegs_decodes_them_on_the_gpu_by_default(tmp_path):
    """data.decode = auto on CUDA with a JPEG folder: the loader leaves them encoded, nvJPEG decodes, training runs."""
    import numpy as np
    from PIL import Image

    from zturbo.data.jpeg_device import _DEVICE_FAILED, EncodedBatch
    from zturbo.train import Trainer

    data = tmp_path / "jpegs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(data / f"{i}.jpg", quality=90)
    overrides = {**OVERRIDES, "data": {**OVERRIDES["data"], "data_dir": data},
                 "train": {**OVERRIDES["train"], "output_dir": tmp_path / "run", "max_steps": 2, "compile": "off"}}
    settings = load_settings(None, None, overrides, default_profile=None)
    assert settings.data.decode == "auto"
    trainer = Trainer(settings, quiet=True)
    assert trainer.device_decode and isinstance(next(iter(trainer.loader)), EncodedBatch)
    result = trainer.fit()
    assert result.steps == 2 and result.last_loss == result.last_loss
    assert not _DEVICE_FAILED, _DEVICE_FAILED  # nvJPEG decoded them, no fallback to Pillow


def test_cuda_micro_batch_fitting_names_what_does_not_fit(monkeypatch):
    """One image's measured step over the free memory: DoesNotFitError with profile, size and measured peak."""
    from zturbo.train.engine import TrainEngine
    from zturbo.train.memory import DoesNotFitError

    settings = load_settings(None, None, {**OVERRIDES, "train": {**OVERRIDES["train"], "compile": "off"}},
                             default_profile=None)
    engine = TrainEngine(settings, torch.device("cuda"), total_steps=4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 1 << 30))  # 1 MiB free
    with pytest.raises(DoesNotFitError, match=r"profile \(none\) at 64 px does not fit even at micro-batch 1: "
                                              r"one image's step peaks at \d+\.\d GiB") as info:
        engine.fit_micro_batch(64)
    assert "\n" not in info.value.message and "gradient_checkpointing" in info.value.hint
