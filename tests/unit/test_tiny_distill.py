"""Tiny students: settings from the teacher, what each mode trains and learns from, the command line, and the
jobs (export, bench, eval) taking a tiny model as any other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tolerances import rounding_atol, vae_depth
from train_helpers import write_demo_photos

from zturbo.config import load_settings
from zturbo.data.batch import TrainBatch
from zturbo.data.datasets import split_data
from zturbo.distill import load_student, student_settings
from zturbo.errors import UsageError
from zturbo.model import VAE, ModelConfig, TinyConfig, TinyVAE, load_pretrained

pytestmark = pytest.mark.usefixtures("one_compute_thread")

TEACHER = ModelConfig(block_out_channels=[8, 8, 8, 8], norm_num_groups=4, layers_per_block=1, latent_channels=4,
                      mid_block_add_attention=False, sample_size=32, scaling_factor=0.7, shift_factor=0.05)
STUDENT = {"architecture": "tiny", "encoder_block_out_channels": [8] * 4, "decoder_block_out_channels": [8] * 4,
           "num_encoder_blocks": [1, 1, 1, 1], "num_decoder_blocks": [1, 1, 1, 1]}


@pytest.fixture
def teacher_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return VAE(TEACHER).save_pretrained(tmp_path / "teacher")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return write_demo_photos(tmp_path / "photos")


def settings(teacher: Path, data: Path, out: Path, mode: str = "decoder", **distill):
    overrides = {
        "model": STUDENT,
        "data": {"data_dir": data, "image_size": 32, "val_images": 0, "num_workers": 0, "random_flip": False},
        "train": {"output_dir": out, "batch_size": 2, "max_steps": 2, "warmup_steps": 0, "learning_rate": 1e-3},
        "distill": {"teacher": teacher, "mode": mode, **distill},
    }
    return load_settings("demo", None, overrides)


def student(s):
    s = student_settings(s)
    return load_student(s, torch.device("cpu"), split_data(s.data.data_dir, s.data.val_images).train)


def test_the_students_settings_put_it_in_the_teachers_latent_space(teacher_dir, photos, tmp_path):
    s = student_settings(settings(teacher_dir, photos, tmp_path / "run"))
    assert isinstance(s.model, TinyConfig) and s.model.encoder_block_out_channels == [8] * 4
    assert (s.model.latent_channels, s.model.vae_scale, s.model.vae_shift) == (4, 0.7, 0.05)
    assert (s.model.scaling_factor, s.model.shift_factor) == (1.0, 0.0)  # pipelines hand it their latents as they are
    assert s.distill.init == "random" and s.loss.kl_weight == 0 and s.model.sample_size == 32
    assert student_settings(s) == s


def test_teachers_a_tiny_student_cannot_learn_from_are_named(tmp_path, photos):
    flux2 = VAE(TEACHER.model_copy(update={"patch_size": [2, 2]})).save_pretrained(tmp_path / "flux2")
    with pytest.raises(UsageError, match="FLUX.2's patchified BatchNorm"):
        student_settings(settings(flux2, photos, tmp_path / "run"))
    f4 = VAE(TEACHER.model_copy(update={"block_out_channels": [8, 8, 8]})).save_pretrained(tmp_path / "f4")
    with pytest.raises(UsageError, match="the teacher downsamples by 4, the tiny model by 8"):
        student_settings(settings(f4, photos, tmp_path / "run"))


def test_the_decoder_learns_to_decode_the_normalised_teacher_latent(teacher_dir, photos, tmp_path):
    d = student(settings(teacher_dir, photos, tmp_path / "run", teacher_weight=0.5))
    assert isinstance(d.model, TinyVAE)
    assert not any(p.requires_grad for p in d.model.encoder.parameters())
    assert all(p.requires_grad for p in d.model.decoder.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = d.forward(TrainBatch(x))
    teacher = VAE.from_pretrained(teacher_dir)
    with torch.no_grad():
        expected = teacher.normalize_latents(teacher.encode(x).mean)
    torch.testing.assert_close(out.mean, expected, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(out.recon, d.model.decode(expected), rtol=0, atol=0)
    assert "teacher" in out.terms and "latent" not in out.terms
    (out.recon.abs().mean() + out.extra_loss).backward()
    assert d.model.decoder.layers[0].weight.grad is not None


def test_the_encoder_regresses_the_normalised_latent_and_feeds_the_teachers_decoder(teacher_dir, photos, tmp_path):
    d = student(settings(teacher_dir, photos, tmp_path / "run", mode="encoder"))
    assert not any(p.requires_grad for p in d.model.decoder.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = d.forward(TrainBatch(x))
    teacher = d.forward.teacher
    with torch.no_grad():
        target = teacher.normalize_latents(teacher.encode(x).mean)
        mine = d.model.encode(x).mean
        assert torch.equal(out.recon, teacher.decode(teacher.denormalize_latents(mine)))
    torch.testing.assert_close(out.terms["latent"], torch.nn.functional.mse_loss(mine, target))
    out.extra_loss.backward()
    assert d.model.encoder.layers[0].weight.grad is not None


def test_both_coders_train_and_stored_latents_equal_live_ones(teacher_dir, photos, tmp_path):
    from zturbo.config import ServeConfig
    from zturbo.serve import encode_collection

    d = student(settings(teacher_dir, photos, tmp_path / "run", mode="both"))
    assert all(p.requires_grad for p in d.model.parameters())
    latents = tmp_path / "latents"
    encode_collection(teacher_dir, photos, latents, ServeConfig(size=32, device="cpu", batch_size=2, reading="phased"))
    stored = student(settings(teacher_dir, photos, tmp_path / "run2", latents_dir=latents))
    assert stored.forward.teacher is None  # stored latents and no teacher term: nothing of the teacher runs
    dataset = stored.dataset(sorted(photos.iterdir()), photos, 32)
    batch = dataset.collate([dataset[i] for i in range(2)])
    with torch.no_grad():
        live = d.forward(TrainBatch(batch.images)).mean
        # The same fp32 convolutions; only the batch (2 here and when encoded) may order sums differently.
        torch.testing.assert_close(stored.forward(batch).mean, live, atol=1e-5, rtol=0)


def test_the_command_line_trains_a_tiny_model_and_exports_it(teacher_dir, photos, tmp_path, capsys):
    from zturbo.cli import run

    config = tmp_path / "tiny.toml"
    config.write_text("[model]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in STUDENT.items()) + "\n")
    out = tmp_path / "run"
    assert run(["train", "--profile", "demo", "--config", str(config), "--teacher", str(teacher_dir), "--data",
                str(photos), "--output", str(out), "--image-size", "32", "--batch-size", "2", "--max-steps", "2",
                "--distill", "both", "--num-workers", "0", "--quiet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 2 and result["skipped_steps"] == 0
    final = load_pretrained(out / "final")
    assert isinstance(final, TinyVAE) and final.config.vae_scale == 0.7
    assert run(["export", str(out), "--format", "taesd", "--out", str(tmp_path / "taesd"), "--force", "--verify"]) == 0
    assert "bit-identical" in capsys.readouterr().out
    # Refusals: one line, exit 2, nothing written.
    for argv, message in (
        (["export", str(out), "--format", "single-file", "--out", str(tmp_path / "x.safetensors")], "use --format taesd"),
        (["export", str(teacher_dir), "--format", "taesd", "--out", str(tmp_path / "kl")], "writes tiny models"),
        (["train", "--profile", "tiny-flux", "--data", str(photos), "--output", str(tmp_path / "no-teacher"),
          "--quiet"], "a tiny model learns a teacher's latent space"),
    ):
        code = run(argv)
        err = capsys.readouterr().err
        assert code == 2 and message in err, (argv, err)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "no-teacher").exists()


def test_bench_times_a_tiny_model_against_diffusers_autoencoder_tiny():
    from zturbo.bench.cases import build_engine, diffusers_subject, our_subject

    ours = our_subject(TinyConfig(**STUDENT), "tiny")
    theirs = diffusers_subject(ours)
    assert type(theirs.model).__name__ == "AutoencoderTiny"
    z = torch.randn(1, 4, 4, 4)
    engines = [build_engine(s, "torch", torch.device("cpu"), "fp32", False) for s in (ours, theirs)]
    a, b = (e.decode(z) for e in engines)
    assert a.shape == (1, 3, 32, 32) and (a - b).abs().max() <= rounding_atol(b, *vae_depth(ours.model))


@pytest.mark.slow
def test_onnx_graphs_of_a_tiny_model_match_torch(tmp_path):
    from zturbo.backends import create_backend

    torch.manual_seed(0)
    vae = TinyVAE(TinyConfig(**STUDENT)).eval()
    vae.save_pretrained(tmp_path / "model")
    backend = create_backend("onnx", tmp_path / "model", device="cpu")
    x = torch.rand(2, 3, 48, 32) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).mean
        ref = vae.decode(z)
    assert (backend.encode(x) - z).abs().max() <= rounding_atol(z, *vae_depth(vae))
    assert (backend.decode(z) - ref).abs().max() <= rounding_atol(ref, *vae_depth(vae))
