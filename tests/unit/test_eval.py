"""zturbo eval: metric values against scikit-image and closed forms, the runner, reports, compare, bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zturbo.backends import Backend, available_backends
from zturbo.cli import run
from zturbo.config import EvalConfig
from zturbo.errors import CheckpointError, InputError, MissingDependencyError, ZTurboError
from zturbo.eval import evaluate, per_image_csv, report_json
from zturbo.eval.metrics import MS_SSIM_MIN_SIDE, MetricSuite, ms_ssim_uint8, psnr_uint8, ssim_uint8
from zturbo.model import VAE
from zturbo.perceptual import MissingWeightsError

skm = pytest.importorskip("skimage.metrics")

TINY = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "mid_block_add_attention": False,
}
NARROW = {
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "mid_block_add_attention": False,
}  # cheap at full resolution
TINY3 = {
    "block_out_channels": [32, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "mid_block_add_attention": False,
}


def _chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def _photo(h: int, w: int, seed: int = 0, low: int = 0, high: int = 256) -> np.ndarray:
    """A smooth-plus-texture test image (SSIM on pure noise says little)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 3 + yy) % 256, (yy * 2) % 256, (xx + yy * 5) % 256], axis=-1).astype(np.float64)
    img = base * 0.8 + rng.normal(0, 20, (h, w, 3))
    return (
        np.clip(img, 0, 255).astype(np.uint8)
        if (low, high) == (0, 256)
        else (low + (np.clip(img, 0, 255) / 255 * (high - low - 1))).astype(np.uint8)
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    a = VAE(**TINY).save_pretrained(root / "turbo")
    b = VAE(**TINY3).save_pretrained(root / "standard")
    return {"a": a, "b": b, "root": root}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    Image.fromarray(_photo(40, 56, 1)).save(root / "landscape.png")
    Image.fromarray(_photo(56, 40, 2)).save(root / "portrait.png")
    Image.fromarray(_photo(48, 48, 3)[..., 0], "L").save(root / "gray.png")
    (root / "sub").mkdir()
    Image.fromarray(_photo(44, 60, 4)).save(root / "sub" / "photo.jpg", quality=92)
    return root


class ShiftBackend(Backend):
    """Encode is the identity; decode adds a +/-delta checkerboard in 8-bit levels (0: a lossless codec)."""

    name = "shift"

    def __init__(self, delta: int = 0, factor: int = 8, latent_channels: int = 3, fail_decode: bool = False):
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.delta = delta
        self.downsample_factor = factor
        self.latent_channels = latent_channels
        self.fail_decode = fail_decode

    @classmethod
    def load(cls, model, **options):
        return cls(**options)

    def encode(self, images):
        assert (
            images.shape[-1] % self.downsample_factor == 0 and images.shape[-2] % self.downsample_factor == 0
        )
        return images.clone()

    def decode(self, latents):
        if self.fail_decode:
            raise RuntimeError("Got invalid dimensions for input: latent, index 1 Got: 3 Expected: 8")
        yy, xx = torch.meshgrid(
            torch.arange(latents.shape[-2]), torch.arange(latents.shape[-1]), indexing="ij"
        )
        sign = ((yy + xx) % 2 * 2 - 1).to(latents.dtype)
        return latents + sign * (self.delta / 127.5)


# ---------------------------------------------------------------------------------------------------------
# Metrics against closed forms and scikit-image


def test_identical_images_give_psnr_inf_and_ssim_one():
    x = _chw(_photo(MS_SSIM_MIN_SIDE, MS_SSIM_MIN_SIDE + 7))
    assert math.isinf(psnr_uint8(x, x).item()) and psnr_uint8(x, x).item() > 0
    assert ssim_uint8(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert ms_ssim_uint8(x, x).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("delta", [1, 4, 13])
def test_known_error_gives_closed_form_psnr(delta):
    # Every pixel off by exactly +/-delta levels: MSE = delta^2, PSNR = 20 log10(255 / delta).
    ref = _photo(32, 48, 5, low=40, high=200)
    sign = np.where((np.indices(ref.shape[:2]).sum(0) % 2) == 0, 1, -1)[..., None]
    rec = (ref.astype(int) + sign * delta).astype(np.uint8)
    assert psnr_uint8(_chw(rec), _chw(ref)).item() == pytest.approx(20 * math.log10(255 / delta), abs=1e-4)


@pytest.mark.parametrize("shape", [(40, 56), (56, 40), (37, 61)])
def test_psnr_and_ssim_match_scikit_image(shape):
    rng = np.random.default_rng(7)
    ref = _photo(*shape, seed=8)
    rec = np.clip(ref.astype(int) + rng.normal(0, 9, ref.shape).round().astype(int), 0, 255).astype(np.uint8)
    expected_psnr = skm.peak_signal_noise_ratio(ref, rec, data_range=255)
    expected_ssim = skm.structural_similarity(
        ref,
        rec,
        channel_axis=-1,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
    )
    assert psnr_uint8(_chw(rec), _chw(ref)).item() == pytest.approx(expected_psnr, abs=1e-3)
    assert ssim_uint8(_chw(rec), _chw(ref)).item() == pytest.approx(expected_ssim, abs=1e-4)


def test_ms_ssim_where_the_size_allows():
    small = _chw(_photo(64, 64))
    assert math.isnan(ms_ssim_uint8(small, small).item())
    ref = _photo(MS_SSIM_MIN_SIDE, MS_SSIM_MIN_SIDE + 3, seed=1)
    rng = np.random.default_rng(2)
    noisy = [np.clip(ref + rng.normal(0, s, ref.shape), 0, 255).astype(np.uint8) for s in (4, 16, 48)]
    values = [ms_ssim_uint8(_chw(n), _chw(ref)).item() for n in noisy]
    assert all(0 < v < 1 for v in values) and values[0] > values[1] > values[2]


def test_lpips_without_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError) as info:
        MetricSuite(["psnr", "lpips"], torch.device("cpu"), lpips_nets=["alex"], allow_download=False)
    assert "alexnet" in info.value.message and "--metrics psnr,ssim" in info.value.hint
    suite = MetricSuite(
        ["psnr", "lpips"],
        torch.device("cpu"),
        lpips_nets=["alex"],
        allow_download=False,
        missing_weights="skip",
    )
    assert suite.per_image_names == ["psnr"] and "lpips_alex" in suite.unavailable


def test_lpips_plumbing_with_random_backbone_is_labelled():
    # Random backbone: tests that LPIPS is wired (0 for identical, > 0 otherwise), never a quality figure.
    torch.manual_seed(0)
    suite = MetricSuite(["lpips"], torch.device("cpu"), lpips_nets=["alex"], lpips_random_backbone=True)
    ref = _chw(_photo(32, 32))
    other = _chw(_photo(32, 32, seed=9))
    values = suite.update("model", torch.cat([ref, other]), torch.cat([ref, ref]))
    assert list(values) == ["lpips_alex_random"]
    assert values["lpips_alex_random"][0].item() == pytest.approx(0.0, abs=1e-6)
    assert values["lpips_alex_random"][1].item() > 1e-4


def test_rfid_needs_torch_fidelity_or_says_so():
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError) as info:
            MetricSuite(["rfid"], torch.device("cpu"))
        assert "torch-fidelity" in info.value.hint or "torch_fidelity" in info.value.message
    else:
        pytest.skip("torch-fidelity is installed; the missing-dependency message cannot be shown here")


class _TinyFeatures(torch.nn.Module):
    """A fixed random feature network standing in for Inception (plumbing only)."""

    num_features = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        return self.conv(x.float() / 255).mean(dim=(2, 3))


def test_rfid_plumbing_with_custom_features(models, images):
    report = evaluate(
        ShiftBackend(0), images, EvalConfig(size=32, metrics=["psnr", "rfid"]), fid_feature=_TinyFeatures()
    )
    assert report.metrics == ["psnr", "rfid_random"]
    assert report.dataset_metrics["model"]["rfid_random"] == pytest.approx(0.0, abs=1e-3)
    assert any("not comparable" in n for n in report.notes)


# ---------------------------------------------------------------------------------------------------------
# The runner


def test_lossless_backend_reports_inf_sensibly(images, tmp_path):
    report = evaluate(
        ShiftBackend(0), images, EvalConfig(size="native", metrics=["psnr", "ssim"], sheet_images=1)
    )
    psnr = report.summary["model"]["psnr"]
    assert psnr["identical"] == 4 and math.isinf(psnr["median"]) and math.isinf(psnr["mean"])
    assert report.summary["model"]["ssim"]["mean"] == pytest.approx(1.0, abs=1e-6)
    data = report_json(report)
    json.loads(json.dumps(data), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["per_image"][0]["model"]["psnr"] == "inf"
    assert data["per_image"][0]["model"]["ms_ssim"] is None  # too small for five scales
    rows = list(csv.DictReader(per_image_csv(report).splitlines()))
    assert {r["psnr"] for r in rows} == {"inf"} and {r["ms_ssim"] for r in rows} == {""}


def test_known_noise_end_to_end_through_padding(tmp_path):
    # Odd sizes are padded to the factor and cropped back; only the image's own pixels are scored.
    for name, (h, w) in {"a.png": (33, 51), "b.png": (51, 33)}.items():
        Image.fromarray(_photo(h, w, low=30, high=220)).save(tmp_path / name)
    report = evaluate(ShiftBackend(5), tmp_path, EvalConfig(size="native", metrics=["psnr"]))
    expected = 20 * math.log10(255 / 5)
    assert [r["model"]["psnr"] for r in report.per_image] == pytest.approx([expected, expected], abs=1e-4)
    assert [(r["width"], r["height"]) for r in report.per_image] == [(51, 33), (33, 51)]


@pytest.mark.slow
def test_odd_native_sizes_with_a_real_model(models, tmp_path):
    Image.fromarray(_photo(517, 333, 11)).save(tmp_path / "portrait.png")
    Image.fromarray(_photo(333, 517, 12)).save(tmp_path / "landscape.png")
    Image.fromarray(_photo(65, 47, 13)[..., 1], "L").save(tmp_path / "small_gray.png")
    torch.manual_seed(0)
    report = evaluate(
        VAE(**NARROW), tmp_path, EvalConfig(size="native", metrics=["psnr", "ssim"], device="cpu")
    )
    sizes = {r["name"]: (r["width"], r["height"]) for r in report.per_image}
    assert sizes == {"landscape.png": (517, 333), "portrait.png": (333, 517), "small_gray.png": (47, 65)}
    assert all(math.isfinite(r["model"]["psnr"]) for r in report.per_image)
    ms = {r["name"]: r["model"]["ms_ssim"] for r in report.per_image}
    assert math.isfinite(ms["portrait.png"]) and math.isnan(ms["small_gray.png"])


@pytest.mark.slow
def test_fixed_size_resizes_and_crops(models, images):
    report = evaluate(
        models["a"], images, EvalConfig(size=24, metrics=["psnr"], batch_size=3, sheet_images=0)
    )
    assert {(r["width"], r["height"]) for r in report.per_image} == {(24, 24)}
    assert {(r["source_width"], r["source_height"]) for r in report.per_image} == {
        (56, 40),
        (40, 56),
        (48, 48),
        (60, 44),
    }
    assert [r["name"] for r in report.per_image] == [
        "gray.png",
        "landscape.png",
        "portrait.png",
        "sub/photo.jpg",
    ]


def test_mismatched_decoder_is_a_clear_error(images):
    with pytest.raises(CheckpointError, match="latent channels"):
        evaluate(ShiftBackend(0, latent_channels=8), images, EvalConfig(size=16, metrics=["psnr"]))
    with pytest.raises(CheckpointError, match="decoder rejected latents"):
        evaluate(ShiftBackend(0, fail_decode=True), images, EvalConfig(size=16, metrics=["psnr"]))


def _quick_onnx_export(vae: VAE, folder: Path, decoder_vae: VAE | None = None) -> Path:
    """An export folder made with the fast TorchScript exporter (the dynamo export takes minutes here)."""
    import warnings

    from zturbo.export.layout import FORMAT_VERSION, INPUT_NAMES, META_NAME, OUTPUT_NAMES, onnx_name
    from zturbo.export.onnx import example_input, part_graph

    folder.mkdir(parents=True)
    parts = {}
    for part, source in (("encoder", vae), ("decoder", decoder_vae or vae)):
        names = INPUT_NAMES[part], OUTPUT_NAMES[part]
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                part_graph(source.eval(), part),
                (example_input(source, part),),
                str(folder / onnx_name(part)),
                input_names=[names[0]],
                output_names=[names[1]],
                opset_version=18,
                dynamo=False,
                dynamic_axes={n: {0: "batch", 2: "height", 3: "width"} for n in names},
            )
        parts[part] = {"onnx": onnx_name(part), "input": names[0], "output": names[1]}
    c = vae.config
    meta = {
        "format_version": FORMAT_VERSION,
        "format": "onnx",
        "model": c.model_dump(mode="json"),
        "parts": parts,
        "latent_channels": c.latent_channels,
        "downsample_factor": c.downsample_factor,
        "apply_scaling": False,
        "scaling_factor": c.scaling_factor,
        "shift_factor": c.shift_factor,
        "precision": "fp32",
    }
    (folder / META_NAME).write_text(json.dumps(meta))
    return folder


@pytest.mark.slow
@pytest.mark.skipif("onnx" not in available_backends(), reason="the ONNX Runtime backend is not in this tree")
def test_onnx_export_matches_torch_and_foreign_decoder_is_a_clear_error(models, images, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    vae = VAE.from_pretrained(models["a"])
    ours = _quick_onnx_export(vae, tmp_path / "ours")
    args = ["--data", str(images), "--size", "32", "--metrics", "psnr", "--json"]
    assert run(["eval", str(ours), *args]) == 0
    onnx_report = json.loads(capsys.readouterr().out)
    assert onnx_report["models"]["model"]["backend"] == "onnx"
    assert run(["eval", str(models["a"]), *args]) == 0
    torch_report = json.loads(capsys.readouterr().out)
    assert onnx_report["summary"]["model"]["psnr"]["mean"] == pytest.approx(
        torch_report["summary"]["model"]["psnr"]["mean"], abs=0.05
    )
    torch.manual_seed(1)
    foreign = _quick_onnx_export(vae, tmp_path / "foreign", decoder_vae=VAE(**{**TINY, "latent_channels": 8}))
    rc = run(["eval", str(foreign), "--data", str(images), "--size", "32", "--metrics", "psnr"])
    err = capsys.readouterr().err
    assert rc == 2 and "decoder rejected latents" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------
# CLI: compare, reports, bad input


@pytest.mark.slow
def test_compare_two_checkpoints_cli(models, images, tmp_path, capsys):
    out = tmp_path / "report"
    rc = run(
        [
            "eval",
            str(models["a"]),
            "--data",
            str(images),
            "--compare",
            str(models["b"]),
            "--size",
            "32",
            "--metrics",
            "psnr,ssim",
            "--out",
            str(out),
            "--json",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    cmp = data["compare"]["metrics"]["psnr"]
    assert cmp["model"] == pytest.approx(data["summary"]["model"]["psnr"]["mean"])
    assert cmp["other"] == pytest.approx(data["summary"]["other"]["psnr"]["mean"])
    assert cmp["ratio"] == pytest.approx(cmp["model"] / cmp["other"])
    assert cmp["images"] == 4 and 0 <= cmp["model_better_images"] <= 4
    speed = data["compare"]["speed"]
    assert speed["model_images_per_s"] > 0 and speed["ratio"] == pytest.approx(
        speed["model_images_per_s"] / speed["other_images_per_s"]
    )
    # Different models really ran: their per-image values differ.
    assert any(r["model"]["psnr"] != r["other"]["psnr"] for r in data["per_image"])
    header = (out / "per_image.csv").read_text().splitlines()[0].split(",")
    assert {"model_psnr", "other_psnr", "model_ssim", "other_ssim"} <= set(header)
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 5 * 256  # original | recon A | error A | recon B | error B
        assert sheet.height > 4 * 256  # every image is among the worst or best four
    assert (
        json.loads((out / "summary.json").read_text())["compare"]["metrics"]["psnr"]["ratio"] == cmp["ratio"]
    )


def test_summary_table_and_contact_sheet(models, images, tmp_path, capsys):
    out = tmp_path / "r"
    rc = run(
        ["eval", str(models["a"]), "--data", str(images), "--size", "32", "--metrics", "psnr", "-o", str(out)]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "mean" in text and "median" in text and "worst by psnr" in text
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width == 3 * (256 + 4) + 4
        assert np.asarray(sheet.convert("L")).std() > 5  # not a blank canvas


@pytest.mark.slow
def test_run_and_diffusers_folders_are_accepted(models, images, capsys):
    import shutil

    root = models["root"]
    shutil.copytree(models["a"], root / "run" / "final", dirs_exist_ok=True)
    shutil.copytree(models["a"], root / "pipeline" / "vae", dirs_exist_ok=True)
    for folder in ("run", "pipeline"):
        rc = run(
            ["eval", str(root / folder), "--data", str(images), "--size", "16", "--metrics", "psnr", "--json"]
        )
        assert rc == 0
        assert json.loads(capsys.readouterr().out)["data"]["evaluated"] == 4


def test_unreadable_images_are_skipped_and_reported(models, images, tmp_path, capsys):
    data = tmp_path / "mixed"
    data.mkdir()
    Image.fromarray(_photo(32, 32)).save(data / "good.png")
    (data / "truncated.png").write_bytes((images / "landscape.png").read_bytes()[:60])
    (data / "text.jpg").write_text("not an image")
    rc = run(["eval", str(models["a"]), "--data", str(data), "--size", "16", "--metrics", "psnr", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["data"]["evaluated"] == 1
    assert {s["path"]: s["reason"] for s in out["data"]["skipped"]} == {
        "text.jpg": "not-an-image",
        "truncated.png": "corrupt",
    }
    (data / "good.png").unlink()
    rc = run(["eval", str(models["a"]), "--data", str(data), "--metrics", "psnr"])
    err = capsys.readouterr().err
    assert rc == 2 and "none of the 2 images" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-checkpoint", "is not there (no such file or folder); eval needs"),
        ("empty-data", "no images in"),
        ("missing-data", "data folder not found"),
        ("bad-metric", "unknown metric"),
        ("bad-size", "--size must be"),
    ],
)
def test_bad_input_is_one_clear_line(models, images, tmp_path, capsys, case, message):
    (tmp_path / "empty").mkdir()
    argv = {
        "missing-checkpoint": [str(tmp_path / "nope"), "--data", str(images)],
        "empty-data": [str(models["a"]), "--data", str(tmp_path / "empty")],
        "missing-data": [str(models["a"]), "--data", str(tmp_path / "nowhere")],
        "bad-metric": [str(models["a"]), "--data", str(images), "--metrics", "psnr,vmaf"],
        "bad-size": [str(models["a"]), "--data", str(images), "--size", "big"],
    }[case]
    rc = run(["eval", *argv, "--metrics", "psnr"] if "--metrics" not in argv else ["eval", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err


@pytest.mark.slow
def test_named_lpips_without_weights_fails_cleanly(models, images, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("zturbo.perceptual.torch.hub.download_url_to_file", _no_network)
    rc = run(
        ["eval", str(models["a"]), "--data", str(images), "--metrics", "psnr,lpips-alex", "--size", "16"]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "LPIPS-alex backbone weights" in err and "--metrics psnr,ssim" in err
    # Not named: the default set leaves LPIPS out with a warning and still measures the rest.
    rc = run(["eval", str(models["a"]), "--data", str(images), "--size", "16", "--json"])
    captured = capsys.readouterr()
    assert rc == 0 and "left out" in captured.err
    assert json.loads(captured.out)["metrics"] == ["psnr", "ssim", "ms_ssim"]


def _no_network(*args, **kwargs):
    raise OSError("network unreachable (test)")


def test_metric_flag_parsing():
    from zturbo.commands.eval import parse_metrics

    assert parse_metrics("psnr,lpips-alex") == (["psnr", "lpips"], ["alex"])
    assert parse_metrics("lpips,lpips-vgg") == (["lpips"], None)
    assert parse_metrics("ms-ssim,fid") == (["ssim", "rfid"], None)
    assert parse_metrics(None) == (None, None)


def test_empty_folder_error_from_python(tmp_path):
    with pytest.raises(InputError, match="no images"):
        evaluate(ShiftBackend(0), tmp_path, EvalConfig(metrics=["psnr"]))


@pytest.mark.gpu
def test_cuda_eval_matches_cpu(models, images, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # cuDNN runs fp32 convolutions in TF32 by default (10-bit mantissa); compare true fp32 here.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = {"size": 32, "metrics": ["psnr", "ssim"], "sheet_images": 2}
    cpu = evaluate(models["a"], images, EvalConfig(device="cpu", **cfg))
    gpu = evaluate(models["a"], images, EvalConfig(device="cuda", **cfg), compare=models["b"])
    assert gpu.models["model"]["device"].startswith("cuda")
    for metric in ("psnr", "ssim"):
        assert gpu.summary["model"][metric]["mean"] == pytest.approx(
            cpu.summary["model"][metric]["mean"], rel=1e-3
        )
    bf16 = evaluate(models["a"], images, EvalConfig(device="cuda", precision="bf16", **cfg))
    assert abs(bf16.summary["model"]["psnr"]["mean"] - cpu.summary["model"]["psnr"]["mean"]) < 1.0


def test_nothing_left_to_measure_is_an_error(images, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ZTurboError, match="none of the requested metrics can run"):
        evaluate(
            ShiftBackend(0),
            images,
            EvalConfig(metrics=["lpips"]),
            missing_weights="skip",
            allow_download=False,
        )
