"""zturbo export: ONNX parity on dynamic shapes, the fp16 overflow guard, diffusers both ways,
TensorRT's clear message (and an engine build where TensorRT exists), bad input, atomicity."""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
# torch's ONNX exporter needs onnxscript; looked up, not imported (its import takes seconds and the
# exporter imports it when a test exports).
if importlib.util.find_spec("onnxscript") is None:
    pytest.skip("torch's ONNX exporter needs onnxscript", allow_module_level=True)

from tolerances import rounding_atol, vae_depth

from zturbo import VAE, load_vae
from zturbo.backends import create_backend
from zturbo.backends.verify import export_checkpoint
from zturbo.cli import run
from zturbo.config import ExportConfig
from zturbo.errors import UsageError
from zturbo.export import META_NAME, export_model, read_export_meta

TINY = {"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4, "sample_size": 64}


def _tiny_vae(seed: int = 0, **overrides) -> VAE:
    torch.manual_seed(seed)
    return VAE(**{**TINY, **overrides}).eval()


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    _tiny_vae(scaling_factor=0.5, shift_factor=0.1).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fp32_export(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "onnx"
    rc = run(
        ["export", str(checkpoint), "--out", str(out), "--size", "32:64:128", "--scaled", "--verify", "-q"]
    )
    assert rc == 0
    return out


# -- ONNX fp32 ----------------------------------------------------------------------------------------


@pytest.mark.slow  # shares a 15 s ONNX export
def test_onnx_graphs_are_checked_named_and_dynamic(fp32_export):
    for part, (inp, out) in {"encoder": ("image", "latent"), "decoder": ("latent", "image")}.items():
        model = onnx.load(str(fp32_export / f"{part}.onnx"))
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
        (graph_in,), (graph_out,) = model.graph.input, model.graph.output
        assert (graph_in.name, graph_out.name) == (inp, out)
        dims = [d.dim_param or d.dim_value for d in graph_in.type.tensor_type.shape.dim]
        assert isinstance(dims[0], str) and isinstance(dims[2], str) and isinstance(dims[3], str), dims
        assert dims[1] == (3 if part == "encoder" else 4)
        props = {p.key: p.value for p in model.metadata_props}
        assert props["zturbo_part"] == part and props["zturbo_apply_scaling"] == "true"
        assert float(props["zturbo_scaling_factor"]) == 0.5


@pytest.mark.slow  # shares a 15 s ONNX export
@pytest.mark.parametrize("batch,height,width", [(1, 32, 48), (3, 64, 32)])
def test_onnx_fp32_matches_torch_at_two_sizes_and_batches(fp32_export, checkpoint, batch, height, width):
    vae = load_vae(checkpoint)
    backend = create_backend("onnx", fp32_export, device="cpu")
    torch.manual_seed(batch)
    images = torch.rand(batch, 3, height, width) * 2 - 1
    with torch.inference_mode():
        ref_latent = vae.encode(images).mean
        ref_image = vae.decode(ref_latent)
    latent = backend.encode(images)
    image = backend.decode(ref_latent)
    assert latent.shape == ref_latent.shape and image.shape == ref_image.shape
    assert (latent - ref_latent).abs().max() <= 1e-4
    assert (image - ref_image).abs().max() <= 1e-4


@pytest.mark.slow  # shares a 15 s ONNX export
def test_export_metadata_describes_the_folder(fp32_export):
    meta = read_export_meta(fp32_export)
    graph_opset = {o.domain: o.version for o in onnx.load(str(fp32_export / "decoder.onnx")).opset_import}[""]
    assert meta["precision"] == "fp32" and meta["opset"] == graph_opset
    assert meta["scaling_factor"] == 0.5 and meta["shift_factor"] == 0.1
    assert meta["model"]["latent_channels"] == 4 and meta["downsample_factor"] == 2
    assert set(meta["parts"]) == {"encoder", "decoder"}
    for part in ("encoder", "decoder"):
        stats = meta["verify"][part]
        assert stats["passed"] and stats["max_abs"] <= 1e-4 and stats["psnr_db"] > 60
    assert not [p for p in fp32_export.iterdir() if p.name.startswith(".")], "staging files left behind"


@pytest.mark.slow  # shares a 15 s ONNX export
def test_scaled_graphs_apply_factors_and_backend_undoes_them(fp32_export, checkpoint):
    """The fixture's export has --scaled: graphs speak diffusion-model latents, the backend plain ones."""
    vae = load_vae(checkpoint)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        mean = vae.encode(images).mean
        ref_image = vae.decode(mean)
    encoder = ort.InferenceSession(str(fp32_export / "encoder.onnx"), providers=["CPUExecutionProvider"])
    raw = torch.from_numpy(encoder.run(None, {"image": images.numpy()})[0])
    assert torch.allclose(raw, (mean - 0.1) * 0.5, atol=1e-5)
    decoder = ort.InferenceSession(str(fp32_export / "decoder.onnx"), providers=["CPUExecutionProvider"])
    image = torch.from_numpy(decoder.run(None, {"latent": raw.numpy()})[0])
    assert torch.allclose(image, ref_image, atol=1e-4)
    assert read_export_meta(fp32_export)["apply_scaling"] is True


# -- FP16 overflow guard ------------------------------------------------------------------------------


@pytest.mark.slow
def test_fp16_guard_keeps_overflowing_layers_fp32(tmp_path, monkeypatch):
    """The SDXL-VAE failure: a decoder layer whose activations exceed 65504 turns plain fp16 into inf/NaN.

    The fp32 graph is exported once; the export pipeline below reuses it (exports are the slow part).
    """
    import shutil

    import zturbo.export.onnx as onnx_export
    import zturbo.export.pipeline as export_pipeline
    from zturbo.export.fp16 import activation_ranges, convert_to_fp16
    from zturbo.export.pipeline import _calibration_feeds

    vae = _tiny_vae(seed=1)
    with torch.no_grad():
        conv = vae.decoder.up_blocks[0].resnets[0].conv2
        conv.weight.mul_(1e5)
        conv.bias.mul_(1e5)
    vae.save_pretrained(tmp_path / "hot")
    fp32 = onnx_export.export_part(vae, "decoder", tmp_path / "decoder.fp32.onnx")

    cfg = ExportConfig(format="onnx", precision="fp16", parts=["decoder"], size=(32, 64, 64), verify=True)
    feeds = _calibration_feeds(vae, "decoder", cfg)
    assert max(activation_ranges(fp32, feeds[:1]).values()) > 65504, (
        "the scaled layer must really overflow fp16"
    )
    naive = convert_to_fp16(fp32, tmp_path / "naive.onnx", None)
    session = ort.InferenceSession(str(naive), providers=["CPUExecutionProvider"])
    assert not np.isfinite(session.run(None, {"latent": feeds[0]})[0]).all(), "unguarded fp16 should overflow"

    monkeypatch.setattr(export_pipeline, "export_part", lambda vae, part, path, **_: shutil.copy(fp32, path))
    out = tmp_path / "fp16"
    meta = export_checkpoint(tmp_path / "hot", out, cfg)
    fp16 = meta["parts"]["decoder"]["fp16"]
    assert "decoder.up_blocks.0.resnets.0.conv2" in fp16["kept_fp32_layers"]
    assert fp16["max_activation"] > 65504
    assert meta["verify"]["decoder"]["finite"] and meta["verify"]["decoder"]["passed"]

    model = onnx.load(str(out / "decoder.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer), (
        "nothing became fp16"
    )
    typed = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in typed.graph.value_info}
    norm_and_softmax = [n for n in model.graph.node if n.op_type in ("InstanceNormalization", "Softmax")]
    assert norm_and_softmax, "the decoder has GroupNorm and attention"
    for node in norm_and_softmax:
        assert types.get(node.output[0]) == onnx.TensorProto.FLOAT, f"{node.name} is not fp32"

    latents = torch.randn(3, 4, 24, 32)  # a size and batch the calibration never saw
    with torch.inference_mode():
        ref = vae.decode(latents)
    got = create_backend("onnx", out).decode(latents)
    assert torch.isfinite(got).all()
    mse = float((got - ref).pow(2).mean())
    assert 10 * np.log10(4.0 / mse) > 40, f"guarded fp16 too far from fp32 (mse {mse})"
    with pytest.raises(UsageError, match="no encoder"):
        create_backend("onnx", out).encode(torch.zeros(1, 3, 32, 32))


# -- diffusers format ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_diffusers_export_loads_in_diffusers_with_matching_outputs(checkpoint, tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    out = tmp_path / "hf"
    assert (
        run(["export", str(checkpoint), "--format", "diffusers", "--out", str(out), "--verify", "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    ours = load_vae(checkpoint)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        fp32_bound = rounding_atol(ours(x), *vae_depth(ours))
    assert report["verify"]["decoder"]["max_abs"] <= fp32_bound
    theirs = diffusers.AutoencoderKL.from_pretrained(str(out)).eval()
    assert theirs.config.scaling_factor == 0.5 and theirs.config.shift_factor == 0.1
    with torch.inference_mode():
        z = theirs.encode(x).latent_dist.mean
        torch.testing.assert_close(ours.encode(x).mean, z, atol=rounding_atol(z, *vae_depth(ours)), rtol=0)


def test_export_takes_the_ema_weights_of_a_run(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step-10"
    _tiny_vae(seed=1).save_pretrained(step / "model")
    ema = _tiny_vae(seed=2)
    ema.save_pretrained(step / "ema")
    report = export_checkpoint(tmp_path / "run", tmp_path / "hf", ExportConfig(format="diffusers"))
    assert report["source"].endswith("ema")
    exported = load_vae(tmp_path / "hf")
    for key, value in ema.state_dict().items():
        assert torch.equal(exported.state_dict()[key], value), key


@pytest.mark.slow
def test_import_diffusers_vae_matches_diffusers(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(3)
    # FLUX.1-style: no quant convs, shift factor, 16 latent channels; stored as fp16 in a pipeline's vae/.
    theirs = diffusers.AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ).eval()
    theirs.to(torch.float16).save_pretrained(tmp_path / "pipe" / "vae")
    theirs = theirs.float()
    out = tmp_path / "imported"
    assert (
        run(["import-diffusers", str(tmp_path / "pipe"), "--out", str(out), "--verify", "--json", "-q"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["latent_channels"] == 16 and report["model"]["use_quant_conv"] is False
    ours = load_vae(out)
    assert ours.config.shift_factor == pytest.approx(0.1159) and ours.config.scaling_factor == pytest.approx(
        0.3611
    )
    # The fp16 file reads back into fp32 exactly, so both models hold the same weights; in float64
    # the two implementations then agree to rounding (tolerances.py), which checks the import itself.
    layers, fan_in = vae_depth(ours)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    ours64, theirs64 = copy.deepcopy(ours).double(), copy.deepcopy(theirs).double()
    with torch.inference_mode():
        z = theirs64.encode(x).latent_dist.mean
        torch.testing.assert_close(ours64.encode(x).mean, z, atol=rounding_atol(z, layers, fan_in), rtol=0)
        ref = theirs64.decode(z).sample
        torch.testing.assert_close(ours64.decode(z), ref, atol=rounding_atol(ref, layers, fan_in), rtol=0)
        # --verify compares in fp32 on sample photos: outputs lie in about [-1, 1] (data range 2).
        fp32_bound = rounding_atol(ref.float(), layers, fan_in)
    assert report["verify"]["decoder"]["max_abs"] <= fp32_bound


def test_import_rejects_non_vae_folder(tmp_path, capsys):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert run(["import-diffusers", str(tmp_path / "unet"), "--out", str(tmp_path / "o")]) == 2
    assert "not an AutoencoderKL" in capsys.readouterr().err


# -- TensorRT -----------------------------------------------------------------------------------------


@pytest.mark.skipif(_has_tensorrt(), reason="this machine has TensorRT and a GPU")
def test_trt_without_tensorrt_or_gpu_says_what_is_needed(checkpoint, tmp_path, capsys):
    rc = run(["export", str(checkpoint), "--trt", "--out", str(tmp_path / "trt")])
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    assert "tensorrt" in err.lower() or "TensorRT" in err
    assert "NVIDIA GPU" in err and "pip install" in err
    assert not (tmp_path / "trt").exists() or not any((tmp_path / "trt").iterdir())
    rc = run(["export", str(checkpoint), "--format", "trt", "--out", str(tmp_path / "trt")])
    assert rc != 0
    from zturbo.errors import ZTurboError

    with pytest.raises(ZTurboError, match="TensorRT|tensorrt"):
        create_backend("trt", checkpoint)


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not _has_tensorrt(), reason="needs TensorRT and an NVIDIA GPU")
def test_trt_engine_builds_and_matches_torch(checkpoint, tmp_path):
    out = tmp_path / "trt"
    meta = export_checkpoint(
        checkpoint,
        out,
        ExportConfig(format="trt", precision="fp16", batch=(1, 2, 4), size=(32, 64, 256), verify=True),
    )
    assert (out / "encoder.plan").is_file() and (out / "decoder.plan").is_file()
    assert (out / "timing.cache").is_file()
    assert meta["tensorrt"]["tensorrt_version"] and meta["tensorrt"]["gpu"]
    for part in ("encoder", "decoder"):
        assert meta["verify"][part]["passed"] and meta["verify"][part]["finite"]
    backend = create_backend("trt", out, device="cuda")
    vae = load_vae(checkpoint).cuda()
    x = torch.rand(3, 3, 64, 96, device="cuda") * 2 - 1
    with torch.inference_mode():
        ref = vae.decode(vae.encode(x).mean)
    got = backend.decode(backend.encode(x))
    assert torch.isfinite(got).all() and (got - ref).abs().mean() < 2e-2
    # a second build into the same folder reuses the timing cache
    export_checkpoint(
        checkpoint, out, ExportConfig(format="trt", parts=["decoder"], batch=(1, 2, 4), size=(32, 64, 256))
    )


@pytest.mark.gpu
@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available(),
    reason="needs onnxruntime-gpu and a CUDA GPU",
)
def test_onnx_cuda_provider_with_io_binding(fp32_export, checkpoint):
    backend = create_backend("onnx", fp32_export, device="cuda")
    vae = load_vae(checkpoint)
    x = torch.rand(2, 3, 64, 32) * 2 - 1
    with torch.inference_mode():
        ref = vae.decode(vae.encode(x).mean)
    z = backend.encode(x.cuda())
    out = backend.decode(z)
    assert z.is_cuda and out.is_cuda
    assert (out.cpu() - ref).abs().max() < 1e-2  # cuDNN may use TF32


# -- bad input and atomicity --------------------------------------------------------------------------


def test_checkpoint_config_mismatch_is_a_clean_error(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in checkpoint.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config["latent_channels"] = 8
    (bad / "config.json").write_text(json.dumps(config))
    assert run(["export", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "do not match" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "flags,message", [(["--opset", "12"], "opset"), (["--size", "33:64:128"], "divisible")]
)
def test_bad_flags_exit_2(checkpoint, tmp_path, capsys, flags, message):
    assert run(["export", str(checkpoint), "--out", str(tmp_path / "o"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_unwritable_output_is_a_clean_error(checkpoint, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert run(["export", str(checkpoint), "--out", str(blocker / "sub")]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err


@pytest.mark.slow  # shares a 15 s ONNX export
def test_interrupted_export_leaves_previous_export_intact(checkpoint, fp32_export, tmp_path, monkeypatch):
    import shutil

    import zturbo.export.pipeline as export_pipeline

    out = tmp_path / "existing"
    shutil.copytree(fp32_export, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def exploding_export(vae, part, path, **_):
        if part == "decoder":
            raise KeyboardInterrupt
        return shutil.copy(fp32_export / "encoder.onnx", path)

    monkeypatch.setattr(export_pipeline, "export_part", exploding_export)
    with pytest.raises(KeyboardInterrupt):
        export_model(checkpoint, out, ExportConfig())
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before, "an interrupted export changed or left files in the output folder"

    # A SIGKILLed export leaves its staging folder; the next export into OUT removes it once stale.
    import os

    stale = out / ".zturbo-export-killed"
    stale.mkdir()
    (stale / "encoder.onnx").write_bytes(b"half")
    os.utime(stale, (0, 0))
    with pytest.raises(KeyboardInterrupt):
        export_model(checkpoint, out, ExportConfig())
    assert not stale.exists()


def test_incomplete_export_folder_is_refused(fp32_export, tmp_path):
    from zturbo.errors import CheckpointError

    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "decoder.onnx").write_bytes((fp32_export / "decoder.onnx").read_bytes())
    with pytest.raises(CheckpointError, match="incomplete"):
        read_export_meta(folder)
    assert (fp32_export / META_NAME).is_file()
