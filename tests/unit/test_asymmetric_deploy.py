"""Asymmetric models (decoder widths != encoder widths) through `zturbo export` and `zturbo serve-batch`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from serve_helpers import shard_latents
from tolerances import rounding_atol, vae_depth

from zturbo.cli import run
from zturbo.data.images import pil_to_tensor
from zturbo.model import VAE, ModelConfig
from zturbo.distill.fingerprint import encoder_fingerprint

# A slim decoder with attention in its mid block: the widths change at every level and in the attention.
ASYMMETRIC = ModelConfig(block_out_channels=[16, 32], decoder_block_out_channels=[8, 16], norm_num_groups=4,
                         layers_per_block=1, latent_channels=4, sample_size=32)

pytestmark = pytest.mark.usefixtures("one_compute_thread")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return VAE(ASYMMETRIC).save_pretrained(tmp_path / "model")


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    folder = tmp_path / "pictures"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


@pytest.mark.slow  # the two ONNX exports take ~18 s on 2 cores
def test_asymmetric_model_exports_to_onnx_and_matches_torch(model_dir, tmp_path, pictures, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from zturbo.backends import create_backend

    out = tmp_path / "onnx"
    assert run(["export", str(model_dir), "--format", "onnx", "--out", str(out), "--size", "16:32:64", "-q"]) == 0
    capsys.readouterr()
    vae = VAE.from_pretrained(model_dir)
    backend = create_backend("onnx", out, device="cpu")
    assert backend.fingerprint == encoder_fingerprint(vae)
    torch.manual_seed(1)
    for h, w in ((32, 32), (16, 48)):
        z = torch.randn(2, 4, h // 2, w // 2)
        x = torch.rand(2, 3, h, w) * 2 - 1
        with torch.no_grad():
            ref_image, ref_latent = vae.decode(z), vae.encode(x).mean
        # ONNX Runtime and torch run the same fp32 network and differ only in summation order:
        # the bound of tests/tolerances.py for the model's conv depth and widest fan-in.
        layers, fan_in = vae_depth(vae)
        image = backend.decode(z)
        assert image.shape == (2, 3, h, w)
        torch.testing.assert_close(image, ref_image, atol=rounding_atol(ref_image, layers, fan_in), rtol=0)
        torch.testing.assert_close(backend.encode(x), ref_latent, atol=rounding_atol(ref_latent, layers, fan_in),
                                   rtol=0)

    # Shards encoded through the export name the same model as shards from the checkpoint itself.
    assert run(["serve-batch", "encode", str(out), "--input", str(pictures), "--output", str(tmp_path / "lat"),
                "--size", "32", "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    index = json.loads((tmp_path / "lat" / "index.json").read_text())
    assert index["encoder_fingerprint"] == encoder_fingerprint(vae)


def test_asymmetric_model_encodes_and_decodes_through_serve_batch(model_dir, tmp_path, pictures, capsys):
    latents, decoded = tmp_path / "latents", tmp_path / "decoded"
    common = ["--device", "cpu", "--quiet", "--backend", "torch"]
    assert run(["serve-batch", "encode", str(model_dir), "--input", str(pictures), "--output", str(latents),
                "--size", "32", *common]) == 0
    assert run(["serve-batch", "decode", str(model_dir), "--input", str(latents), "--output", str(decoded),
                "--format", "png", *common]) == 0
    capsys.readouterr()
    vae = VAE.from_pretrained(model_dir)
    stored = shard_latents(latents)
    assert sorted(stored) == ["p0.png", "p1.png", "p2.png"]
    layers, fan_in = vae_depth(vae)
    for source, latent in stored.items():
        with Image.open(pictures / source) as im:
            x = pil_to_tensor(im.convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            mean = vae.encode(x).mean[0]
            image = vae.decode(latent.float().unsqueeze(0))[0]
        # Batches of 3 in serve, of 1 here: another summation order only (tests/tolerances.py).
        torch.testing.assert_close(latent.float(), mean, atol=rounding_atol(mean, layers, fan_in), rtol=0)
        expected = ((image.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0)
        with Image.open(decoded / source) as im:
            written = torch.from_numpy(np.array(im.convert("RGB"))).float()
        assert written.shape == (32, 32, 3)
        # The same fp32 decode rounded to uint8: a rounding-order difference of a few ulps can move
        # a value across a .5 boundary, one level at most.
        assert float((written - expected).abs().max()) <= 1.0
