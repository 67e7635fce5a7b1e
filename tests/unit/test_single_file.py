"""Single .safetensors VAEs: every layout read, what zturbo writes read back as written, every refusal one line.

The models are small random VAEs of each family's shape (tests/single_file_helpers.py);
the files are written here, in the layouts people hold (BFL/LDM, BFL FLUX.2, diffusers
names, the VAE of a full checkpoint), with or without zturbo's metadata.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from single_file_helpers import SHAPES, family_model

from zturbo.artifacts import Kind, load_vae, resolve
from zturbo.cli import run
from zturbo.errors import CheckpointError, UsageError
from zturbo.export.single_file import export_single_file, loader_limits, single_file_tensors
from zturbo.model import ModelConfig
from zturbo.model.single_file import open_single_file


def _equal_states(a, b) -> None:
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _bare(vae, path: Path, layout: str = "ldm", prefix: str = "", extra: dict | None = None) -> Path:
    """``vae`` as a file another tool wrote: the layout's names, no zturbo metadata."""
    tensors = {prefix + k: v for k, v in single_file_tensors(vae, layout).items()}
    save_file({**tensors, **(extra or {})}, str(path))
    return path


def _one_line_error(capsys, argv: list[str]) -> str:
    rc = run(argv)
    err = capsys.readouterr().err
    first = err.split("hint:")[0]
    assert rc == 2, err
    assert "error:" in first and "Traceback" not in err and len(first.strip().splitlines()) == 1, err
    return " ".join(err.split())


# -- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
@pytest.mark.parametrize("family", list(SHAPES))
def test_what_zturbo_writes_reads_back_bit_identical(tmp_path, family, layout):
    vae = family_model(family)
    path = tmp_path / "vae.safetensors"
    report = export_single_file(vae, path, layout=layout, force=True)
    single = open_single_file(path)
    assert single.config == vae.config  # factors, slim decoder widths, BatchNorm settings: all of it
    _equal_states(single.load(), vae)
    assert "zturbo's metadata" in single.note
    assert report["encoder_fingerprint"].startswith("sha256:")


def test_a_flux2_student_is_laid_out_as_bfl_writes_its_vae(tmp_path):
    path = tmp_path / "full_encoder_small_decoder.safetensors"
    export_single_file(family_model("flux2"), path, force=True)
    with open(path, "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    for key in ("encoder.quant_conv.weight", "decoder.post_quant_conv.weight", "bn.running_mean", "bn.running_var",
                "bn.num_batches_tracked", "decoder.mid.attn_1.q.weight", "encoder.norm_out.weight"):
        assert key in header, key
    assert "quant_conv.weight" not in header and header["decoder.mid.attn_1.q.weight"]["shape"] == [64, 64, 1, 1]
    assert json.loads(header["__metadata__"]["zturbo_config"])["decoder_block_out_channels"] == [32, 32, 64, 64]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_lower_precision_files_read_back_the_rounded_values(tmp_path, precision):
    vae = family_model("sdxl")
    path = tmp_path / "vae.safetensors"
    export_single_file(vae, path, precision=precision, force=True)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    back = open_single_file(path).load().state_dict()
    for key, value in vae.state_dict().items():
        assert torch.equal(back[key], value.to(dtype).to(value.dtype)), key


# -- layouts other tools write ----------------------------------------------------------------------------


def test_a_bfl_flux2_file_takes_its_family_from_its_shape(tmp_path):
    vae = family_model("flux2")
    single = open_single_file(_bare(vae, tmp_path / "flux2-vae.safetensors"))
    assert single.layout == "bfl-flux2" and single.config.patch_size == [2, 2]
    assert single.config.decoder_block_out_channels == [32, 32, 64, 64]
    assert "FLUX.2" in single.note and "the only family" in single.note
    _equal_states(single.load(), vae)


def test_a_flux2_file_without_the_batchnorm_step_count_reads(tmp_path):
    vae = family_model("flux2")
    tensors = single_file_tensors(vae)
    del tensors["bn.num_batches_tracked"]
    save_file(tensors, str(tmp_path / "vae.safetensors"))
    back = open_single_file(tmp_path / "vae.safetensors").load()
    assert torch.equal(back.bn.running_mean, vae.bn.running_mean) and int(back.bn.num_batches_tracked) == 0


def test_shapes_two_families_share_are_refused_without_a_family(tmp_path):
    path = _bare(family_model("flux1"), tmp_path / "ae.safetensors")
    with pytest.raises(UsageError) as info:
        open_single_file(path)
    assert "flux1" in info.value.message and "sd3" in info.value.message and "--latent-family" in info.value.hint
    for name, scale, shift in (("flux1", 0.3611, 0.1159), ("zimage", 0.3611, 0.1159), ("sd3", 1.5305, 0.0609)):
        config = open_single_file(path, latent_family=name).config
        assert (config.scaling_factor, config.shift_factor) == (scale, shift)
    with pytest.raises(UsageError, match="does not fit"):
        open_single_file(path, latent_family="sdxl")
    with pytest.raises(UsageError, match="no family zturbo knows"):
        open_single_file(path, latent_family="flux9")


@pytest.mark.parametrize(("prefix", "context", "family", "scale"), [
    ("first_stage_model.", "conditioner.embedders.1.model.ln_final.weight", "sdxl", 0.13025),
    ("first_stage_model.", "cond_stage_model.transformer.text_model.final_layer_norm.weight", "sdxl", 0.18215),
    ("vae.", "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale", "flux1", 0.3611),
    ("first_stage_model.", "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "flux1", 1.5305),
])
def test_the_vae_of_a_full_checkpoint_takes_its_family_from_the_rest(tmp_path, prefix, context, family, scale):
    vae = family_model(family)
    path = _bare(vae, tmp_path / "checkpoint.safetensors", prefix=prefix,
                 extra={context: torch.ones(3), "model.diffusion_model.other.weight": torch.ones(2)})
    single = open_single_file(path)
    assert single.prefix == prefix and single.config.scaling_factor == scale
    assert "checkpoint's other weights" in single.note
    _equal_states(single.load(), vae)


def test_diffusers_names_in_one_file_read_old_attention_names_too(tmp_path):
    vae = family_model("sdxl")
    renamed = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v
               for k, v in vae.state_dict().items()}
    save_file(renamed, str(tmp_path / "vae.safetensors"))
    single = open_single_file(tmp_path / "vae.safetensors", latent_family="sdxl")
    assert single.layout == "diffusers"
    _equal_states(single.load(), vae)


def test_an_eight_channel_latent_fits_no_family_and_says_so(tmp_path):
    vae = family_model("sdxl", latent_channels=8)
    single = open_single_file(_bare(vae, tmp_path / "turbo.safetensors"))
    assert (single.config.scaling_factor, single.config.shift_factor) == (1.0, 0.0)
    assert "no known family" in single.note


def test_a_decoder_only_file_is_joined_with_the_encoder_it_decodes_for(tmp_path, capsys):
    teacher = family_model("flux2", decoder_block_out_channels=None)
    teacher_file = tmp_path / "flux2-vae.safetensors"
    export_single_file(teacher, teacher_file, force=True)
    student = family_model("flux2", seed=1)
    tensors = single_file_tensors(student)
    decoder_only = tmp_path / "small_decoder.safetensors"
    save_file({k: v for k, v in tensors.items() if k.startswith("decoder.")}, str(decoder_only))
    err = _one_line_error(capsys, ["eval", str(decoder_only), "--data", str(tmp_path)])
    assert "holds a decoder only" in err and "--encoder-from" in err

    out = tmp_path / "joined"
    assert run(["import", str(decoder_only), "--encoder-from", str(teacher_file), "--out", str(out), "-q"]) == 0
    joined = load_vae(out).state_dict()
    for key in student.state_dict():
        source = student if key.startswith(("decoder.", "post_quant_conv.")) else teacher
        assert torch.equal(joined[key], source.state_dict()[key]), key


# -- refusals ---------------------------------------------------------------------------------------------


class _Trap:
    """Unpickling this creates a folder: proof that nothing was unpickled when the folder is absent."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("name", ["vae.ckpt", "vae.pt", "vae.weights"])
def test_a_pickle_is_refused_unread(tmp_path, capsys, name):
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"state_dict": _Trap(marker)}, protocol=2))
    err = _one_line_error(capsys, ["eval", str(path), "--data", str(tmp_path)])
    assert "PyTorch pickle" in err and "safetensors" in err and not marker.exists()


def test_a_truncated_file_is_named_truncated(tmp_path, capsys):
    path = tmp_path / "ae.safetensors"
    export_single_file(family_model("sdxl"), path, force=True)
    data = path.read_bytes()
    for cut in (len(data) - 1000, 40, 5):
        path.write_bytes(data[:cut])
        err = _one_line_error(capsys, ["export", str(path), "--format", "single-file", "--out",
                                       str(tmp_path / "out.safetensors")])
        assert f"{path} is truncated" in err, cut


def test_an_unknown_layout_names_its_first_unexpected_key(tmp_path, capsys):
    save_file({"model.layers.0.weight": torch.ones(2), "model.norm.weight": torch.ones(2)},
              str(tmp_path / "llm.safetensors"))
    err = _one_line_error(capsys, ["serve-batch", "encode", str(tmp_path / "llm.safetensors"), "--input",
                                   str(tmp_path), "--output", str(tmp_path / "out")])
    assert "first unexpected key 'model.layers.0.weight'" in err

    path = _bare(family_model("sdxl"), tmp_path / "odd.safetensors",
                 extra={"encoder.down.0.block.0.norm3.weight": torch.ones(32)})
    err = _one_line_error(capsys, ["bench", "--model", str(path), "--latent-family", "sdxl"])
    assert "first unexpected key 'encoder.down.0.block.0.norm3.weight'" in err


def test_a_file_missing_a_tensor_names_it(tmp_path):
    tensors = single_file_tensors(family_model("sdxl"))
    del tensors["decoder.up.2.block.1.conv2.weight"]
    save_file(tensors, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="lacks decoder.up.2.block.1.conv2.weight"):
        open_single_file(tmp_path / "vae.safetensors", latent_family="sdxl")


def test_the_ambiguity_refusal_is_one_line_with_exit_2(tmp_path, capsys):
    path = _bare(family_model("flux1"), tmp_path / "ae.safetensors")
    err = _one_line_error(capsys, ["train", "--profile", "demo", "--teacher", str(path), "--dry-run"])
    assert "--latent-family flux1 or --latent-family sd3" in err


# -- commands ---------------------------------------------------------------------------------------------


def test_every_command_takes_a_single_file_and_says_where_its_factors_came_from(tmp_path, capsys):
    path = _bare(family_model("flux1"), tmp_path / "ae.safetensors")
    assert resolve(path, "flux1").kind is Kind.SINGLE_FILE
    assert run(["train", "--profile", "demo", "--teacher", str(path), "--latent-family", "flux1", "--dry-run",
                "--json"]) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    assert plan["settings"]["distill"]["teacher"] == str(path)
    assert "latent factors of FLUX.1 / Z-Image (scaling 0.3611, shift 0.1159), from --latent-family" in captured.err
    out = tmp_path / "imported"
    assert run(["import", str(path), "--latent-family", "sd3", "--out", str(out), "-q"]) == 0
    assert load_vae(out).config.scaling_factor == 1.5305


def test_export_writes_a_single_file_and_refuses_what_the_tools_cannot_load(tmp_path, capsys):
    source = tmp_path / "turbo"
    family_model("sdxl", latent_channels=8).save_pretrained(source)
    out = tmp_path / "vae.safetensors"
    err = _one_line_error(capsys, ["export", str(source), "--format", "single-file", "--out", str(out)])
    assert "encoder widths [32, 64, 64, 64]" in err and "--force" in err and not out.exists()
    assert run(["export", str(source), "--format", "single-file", "--out", str(out), "--force", "--precision",
                "bf16", "--verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "bf16" and report["verify"] and out.is_file()
    err = _one_line_error(capsys, ["export", str(source), "--format", "onnx", "--precision", "bf16", "--out",
                                   str(tmp_path / "onnx")])
    assert "bf16 is for --format single-file" in err


def test_the_loader_limits_are_those_of_comfyui_and_stable_diffusion_cpp():
    flux1 = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 16, "use_quant_conv": False,
             "use_post_quant_conv": False}
    assert loader_limits(ModelConfig(**flux1, decoder_block_out_channels=[96, 192, 384, 384])) == []
    assert loader_limits(ModelConfig(**flux1, decoder_block_out_channels=[64, 128, 256, 256])) == []
    assert loader_limits(ModelConfig(block_out_channels=[128, 256, 512, 512], latent_channels=32,
                                     patch_size=[2, 2], decoder_block_out_channels=[96, 192, 384, 384])) == []
    odd_decoder = loader_limits(ModelConfig(**flux1, decoder_block_out_channels=[96, 192, 320, 320]))
    assert len(odd_decoder) == 1 and "not one base width x [1, 2, 4, 4]" in odd_decoder[0]
    turbo = loader_limits(ModelConfig(block_out_channels=[96, 192, 384, 384], latent_channels=8))
    assert any("encoder widths" in line for line in turbo) and any("8 latent channels" in line for line in turbo)
    one_conv = loader_limits(ModelConfig(**{**flux1, "use_quant_conv": True}))
    assert any("both or neither" in line for line in one_conv)
    asymmetric = ModelConfig(**flux1, decoder_block_out_channels=[96, 192, 384, 384])
    assert "one width list" in loader_limits(asymmetric, "diffusers")[0]
