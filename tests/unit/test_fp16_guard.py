"""fp16 on the torch backend: layers whose activations overflow fp16 run in fp32, as in the ONNX export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from zturbo.backends.fp16_guard import guard_layers, measure_ranges, plan_guard
from zturbo.backends.torch_backend import TorchBackend
from zturbo.cli import run
from zturbo.errors import UsageError
from zturbo.export.verify import FP16_MIN_PSNR_DB, compare, sample_images
from zturbo.model import VAE

pytestmark = pytest.mark.usefixtures("one_compute_thread")

CONFIG = {"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4,
          "mid_block_add_attention": True, "sample_size": 32}
CPU = torch.device("cpu")
SIDE = 16  # px: torch's CPU convolutions in fp16 take a slow path (about 0.2 GFLOP/s on one core)
# The scaled layer's outputs reach about 1e5 or more on the photos: past fp16's 65504 (the GroupNorm
# after it brings them back).
SCALE = 100000.0


def _overflowing_state() -> dict:
    torch.manual_seed(0)
    vae = VAE(**CONFIG)
    conv = vae.decoder.up_blocks[0].resnets[0].conv2
    with torch.no_grad():
        conv.weight.mul_(SCALE)
        conv.bias.mul_(SCALE)
    return vae.state_dict()


@pytest.fixture(scope="module")
def overflowing() -> dict:
    return _overflowing_state()


def _vae(state: dict) -> VAE:
    vae = VAE(**CONFIG)
    vae.load_state_dict(state)
    return vae


def _roundtrip(backend, x: torch.Tensor) -> torch.Tensor:
    return backend.decode(backend.encode(x)).float()


def test_layers_past_the_threshold_and_only_those_are_kept(overflowing):
    vae = _vae(overflowing)
    ranges = measure_ranges(vae, sample_images(32, 2))
    guard = plan_guard(vae, ranges)
    assert guard.max_activation > 65504 and guard.kept
    for name, layer in guard_layers(vae).items():
        inside = [max(ranges[f"{name}.{sub}" if sub else name]) for sub, _ in layer.named_modules()
                  if (f"{name}.{sub}" if sub else name) in ranges]
        peak = ranges[name][0] if isinstance(layer, torch.nn.GroupNorm) else max(inside, default=0.0)
        assert (name in guard.kept) == (peak > guard.threshold), name
    assert "decoder.up_blocks.0.resnets.0" in guard.kept and not any(k.startswith("encoder") for k in guard.kept)


def test_guarded_fp16_stays_finite_and_close_to_fp32(overflowing):
    x = sample_images(SIDE, 2)
    reference = _roundtrip(TorchBackend(_vae(overflowing), CPU, torch.float32), x)
    plain = _vae(overflowing).half()
    with torch.inference_mode():
        unguarded = plain.decode(plain.encode(x.half()).mean).float()
    assert not torch.isfinite(unguarded).all()  # the failure the guard exists for
    backend = TorchBackend(_vae(overflowing), CPU, torch.float16)
    guarded = _roundtrip(backend, x)
    result = compare(reference, guarded, data_range=2.0)
    assert result["finite"] and result["psnr_db"] >= FP16_MIN_PSNR_DB  # the ONNX fp16 export's criterion
    summary = backend.describe()["fp16_guard"]
    assert summary["kept_fp32_layers"] and summary["max_activation"] > 65504
    # The same module given to an fp32 backend afterwards runs plain fp32 again: the hooks are gone.
    rounded = _vae({k: v.float() for k, v in backend.vae.state_dict().items()})  # its weights, as fp16 left them
    expected = _roundtrip(TorchBackend(rounded, CPU, torch.float32), x)
    assert torch.equal(_roundtrip(TorchBackend(backend.vae, CPU, torch.float32), x), expected)


def test_a_model_within_range_runs_plain_fp16():
    torch.manual_seed(0)
    state = VAE(**CONFIG).state_dict()
    x = sample_images(SIDE, 2)
    backend = TorchBackend(_vae(state), CPU, torch.float16)
    assert backend.fp16_guard is not None and not backend.fp16_guard.kept
    plain = _vae(state).half().eval().requires_grad_(False)  # as a backend holds it (CPU kernels differ)
    with torch.inference_mode():
        expected = plain.decode(plain.encode(x.half()).mean).float()
    assert torch.equal(_roundtrip(backend, x), expected)


def test_fp16_with_tiles_is_refused_for_a_model_that_needs_the_guard(overflowing):
    with pytest.raises(UsageError, match=r"--precision fp16 with --tile.*reach"):
        TorchBackend(_vae(overflowing), CPU, torch.float16, tile=32)


def test_serve_decode_at_fp16_writes_what_fp32_writes(overflowing, tmp_path, capsys):
    """serve-batch decode --precision fp16 wrote black images for a model past fp16's range."""
    model = tmp_path / "vae"
    _vae(overflowing).save_pretrained(model)
    src = tmp_path / "src"
    src.mkdir()
    for i, im in enumerate(sample_images(SIDE, 4)):
        Image.fromarray(((im.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(src / f"{i}.png")
    assert run(["serve-batch", "encode", str(model), "-i", str(src), "-o", str(tmp_path / "lat"), "--size", str(SIDE),
                "-q"]) == 0
    capsys.readouterr()
    for precision in ("fp32", "fp16"):
        assert run(["serve-batch", "decode", str(model), "-i", str(tmp_path / "lat"), "-o",
                    str(tmp_path / precision), "--precision", precision, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["failed"] == 0 and report["processed"] == 4
    assert report["backend"]["fp16_guard"]["kept_fp32_layers"]
    for i in range(4):
        ref, half = (np.asarray(Image.open(tmp_path / p / f"{i}.png")).astype(np.float64) for p in ("fp32", "fp16"))
        mse = np.mean((ref - half) ** 2)
        assert mse == 0 or 10 * np.log10(255.0**2 / mse) >= FP16_MIN_PSNR_DB
