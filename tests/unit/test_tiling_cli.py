"""--tile on eval, bench and serve-batch: the same results as whole images, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tolerances import rounding_atol, vae_depth

from zturbo import VAE
from zturbo.backends import open_backend
from zturbo.cli import run
from zturbo.errors import UsageError
from zturbo.export.layout import FORMAT_VERSION, META_NAME

# Two levels (downsampling factor 2): small enough for the suite, deep enough to have halos and GroupNorm.
TINY = dict(block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4,
            mid_block_add_attention=True, sample_size=32)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "vae"
    VAE(**TINY).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


def _latents(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted((folder / "shards").glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def test_eval_with_exact_tiles_reports_the_untiled_figures(model, images, capsys):
    args = ["eval", str(model), "--data", str(images), "--size", "32", "--metrics", "psnr", "--device", "cpu", "--json"]
    assert run(args) == 0
    whole = json.loads(capsys.readouterr().out)
    assert run([*args, "--tile", "8"]) == 0
    tiled = json.loads(capsys.readouterr().out)
    # PSNR of 8-bit-rounded reconstructions: the tiled pass differs by float rounding only, which moves a
    # pixel across a rounding boundary at most rarely, so the mean PSNR agrees to well under 0.1 dB.
    a = [row["model"]["psnr"] for row in whole["per_image"]]
    b = [row["model"]["psnr"] for row in tiled["per_image"]]
    assert np.allclose(a, b, atol=0.05), (a, b)


def test_serve_batch_tiled_encode_and_decode_equal_whole_images(model, images, tmp_path, capsys):
    base = ["--size", "32", "--device", "cpu", "--reading", "phased", "-q", "--json"]
    assert run(["serve-batch", "encode", str(model), "-i", str(images), "-o", str(tmp_path / "whole"), *base]) == 0
    assert run(["serve-batch", "encode", str(model), "-i", str(images), "-o", str(tmp_path / "tiled"), *base,
                "--tile", "8"]) == 0
    capsys.readouterr()
    whole, tiled = _latents(tmp_path / "whole"), _latents(tmp_path / "tiled")
    vae = VAE.from_pretrained(model)
    assert whole.keys() == tiled.keys()
    for key in whole:
        torch.testing.assert_close(tiled[key], whole[key], atol=rounding_atol(whole[key], *vae_depth(vae)), rtol=0)


@pytest.mark.parametrize("extra", [[], ["--tile-recompute"]])
def test_serve_batch_decodes_latents_far_larger_than_the_training_size(model, tmp_path, capsys, extra):
    # The model was made for 32 px; a 256 px image's latents decode tiled, and equal the whole decode.
    vae = VAE.from_pretrained(model)
    torch.manual_seed(1)
    z = torch.randn(1, 4, 128, 128)
    np.save(tmp_path / "big.npy", z.numpy())
    out = tmp_path / "decoded"
    assert run(["serve-batch", "decode", str(model), "-i", str(tmp_path / "big.npy"), "-o", str(out),
                "--device", "cpu", "--tile", "64", "--format", "png", "-q", *extra]) == 0
    written = sorted(out.rglob("*.png"))
    assert len(written) == 1 and Image.open(written[0]).size == (256, 256)
    with torch.no_grad():
        ref = ((vae.decode(z).clamp(-1, 1) + 1) * 127.5).round().squeeze(0).permute(1, 2, 0).numpy()
    got = np.asarray(Image.open(written[0]).convert("RGB")).astype(np.float64)
    # 8-bit output: the tiled and whole decodes differ by rounding, so a pixel moves by at most one level.
    assert np.abs(got - ref).max() <= 1


@pytest.mark.parametrize(("extra", "suffix"), [([], "/tile16-exact"), (["--tile-recompute"], "/tile16-exact-recompute")])
def test_bench_times_tiled_cases_under_their_own_key(model, capsys, extra, suffix):
    args = ["bench", "--model", str(model), "--device", "cpu", "--resolutions", "32", "--batch-sizes", "1",
            "--what", "decode", "--repeats", "1", "--warmup", "0", "--quiet", "--json", "-"]
    assert run([*args, "--tile", "16", *extra]) == 0
    report = json.loads(capsys.readouterr().out)
    (case,) = [c for c in report["cases"] if c["role"] == "ours"]
    assert case["status"] == "ok" and case["tile"] == 16 and case["key"].endswith(suffix)


def test_tiles_are_refused_where_the_model_does_not_run_layer_by_layer(model, tmp_path):
    with pytest.raises(UsageError, match="the compile backend runs whole images"):
        open_backend(model, "compile", job="eval", device="cpu", tile=16)
    export = tmp_path / "trt"
    export.mkdir()
    parts = {}
    for part, (inp, out) in {"encoder": ("image", "latent"), "decoder": ("latent", "image")}.items():
        for suffix in ("onnx", "plan"):  # placeholders: only the export's metadata is read before the refusal
            (export / f"{part}.{suffix}").write_bytes(b"placeholder")
        parts[part] = {"onnx": f"{part}.onnx", "plan": f"{part}.plan", "input": inp, "output": out}
    meta = {"format_version": FORMAT_VERSION, "format": "trt", "model": VAE(**TINY).config.model_dump(mode="json"),
            "parts": parts}
    (export / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="the trt backend runs whole images"):
        open_backend(export, job="serve-batch", device="cpu", tile=16)


def test_bad_tile_values_are_one_line_errors(model, images, capsys):
    base = ["eval", str(model), "--data", str(images), "--size", "32", "--metrics", "psnr", "--device", "cpu"]
    assert run([*base, "--tile", "big"]) == 2
    assert "--tile must be a number of pixels or 'auto'" in capsys.readouterr().err
    assert run([*base, "--tile", "7"]) == 2  # not a multiple of the downsampling factor (2)
    assert "multiple" in capsys.readouterr().err
    assert run([*base, "--tile", "16", "--tile-mode", "sloppy"]) == 2
    assert "tile_mode" in capsys.readouterr().err
    assert run([*base, "--tile-recompute"]) == 2  # nothing to recompute without exact tiles
    err = capsys.readouterr().err
    assert "tile_recompute applies to exact tiling" in err and len(err.strip().splitlines()) <= 2
