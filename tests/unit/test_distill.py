"""Distillation into a teacher's latent space: pruning, frozen encoder, stored latents, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import write_demo_photos

from zturbo.config import load_settings
from zturbo.data.batch import TrainBatch
from zturbo.data.datasets import split_data
from zturbo.distill import DistillForward, build_student, load_student, student_settings
from zturbo.distill.prune import channel_importance, kept_channels, prune_vae, site_graph
from zturbo.errors import UsageError
from zturbo.model import VAE, ModelConfig
from zturbo.distill.fingerprint import encoder_fingerprint
from zturbo.train.engine import TrainEngine

TEACHER = ModelConfig(
    block_out_channels=[16, 32], norm_num_groups=4, layers_per_block=1, latent_channels=4, sample_size=32,
    scaling_factor=0.7, shift_factor=0.05, latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1.0, 2.0, 3.0, 4.0],
)


# 2 shared cores: one intra-op thread is faster and keeps CPU numerics reproducible.
pytestmark = pytest.mark.usefixtures("one_compute_thread")


@pytest.fixture
def teacher_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return VAE(TEACHER).save_pretrained(tmp_path / "teacher")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Four demo photos at 32 px, the teacher's size, so a crop is the whole image."""
    return write_demo_photos(tmp_path / "photos")


def settings(teacher: Path, data: Path, out: Path, **distill):
    overrides = {
        "data": {"data_dir": data, "image_size": 32, "val_images": 0, "num_workers": 0, "random_flip": False},
        "train": {"output_dir": out, "batch_size": 2, "max_steps": 2, "warmup_steps": 0, "learning_rate": 1e-2},
        "distill": {"teacher": teacher, "decoder_channels": [8, 16], **distill},
    }
    return load_settings("demo", None, overrides)


def student(s, train_paths=None):
    """The student of settings ``s`` on the CPU, as the trainer makes it (calibrated on the training photos)."""
    s = student_settings(s)
    if train_paths is None:
        train_paths = split_data(s.data.data_dir, s.data.val_images).train
    return load_student(s, torch.device("cpu"), train_paths)


# -- pruning ------------------------------------------------------------------------------------------------


def test_prune_to_own_widths_is_the_teacher_exactly():
    torch.manual_seed(0)
    teacher = VAE(TEACHER)
    student = prune_vae(teacher, VAE(TEACHER))
    for key, value in teacher.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key


def test_first_pruned_conv_equals_teacher_on_kept_channels_and_groups_stay_whole():
    torch.manual_seed(0)
    teacher = VAE(TEACHER).eval()
    student = prune_vae(teacher, VAE(TEACHER.model_copy(update={"decoder_block_out_channels": [8, 16]})))
    graph = site_graph(teacher.decoder)
    site = graph.layers["conv_in"][1]
    keep = kept_channels(channel_importance(teacher.decoder, graph)[site], 16, groups=4)
    # Student group g (4 channels of 16) draws only from teacher group g (8 channels of 32).
    assert (keep.view(4, 4) // 8 == torch.arange(4).unsqueeze(1)).all()
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():  # the same rows of the same weights on the same input: bit for bit
        assert torch.equal(student.decoder.conv_in(z), teacher.decoder.conv_in(z)[:, keep])


def test_importance_keeps_the_channels_a_layer_relies_on():
    torch.manual_seed(0)
    teacher = VAE(TEACHER)
    with torch.no_grad():  # make teacher channel 3 of the decoder's first site dominate everything that touches it
        teacher.decoder.conv_in.weight[3] *= 50
    student = prune_vae(teacher, VAE(TEACHER.model_copy(update={"decoder_block_out_channels": [8, 16]})))
    rows = [int((teacher.decoder.conv_in.weight - w).abs().flatten(1).sum(1).argmin()) for w in student.decoder.conv_in.weight]
    assert 3 in rows


def test_prune_refuses_a_wider_student_and_other_shortcuts():
    teacher = VAE(TEACHER)
    with pytest.raises(UsageError, match="wider than the teacher"):
        prune_vae(teacher, VAE(TEACHER.model_copy(update={"decoder_block_out_channels": [16, 64]})))
    with pytest.raises(UsageError, match="shortcut"):
        prune_vae(teacher, VAE(TEACHER.model_copy(update={"decoder_block_out_channels": [16, 16]})))


# -- decoder distillation -----------------------------------------------------------------------------------


def test_decoder_distillation_keeps_the_teachers_encoder_bit_for_bit(teacher_dir, photos, tmp_path):
    s = settings(teacher_dir, photos, tmp_path / "run", teacher_weight=0.5)
    d = student(s)
    assert d.model.config.latents_mean == TEACHER.latents_mean and d.model.config.scaling_factor == 0.7
    engine = TrainEngine(d.settings, torch.device("cpu"), model=d.model, forward_module=d.forward, total_steps=2)
    trained = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in d.model.decoder.parameters()} | {id(p) for p in d.model.post_quant_conv.parameters()}
    before = {k: v.clone() for k, v in d.model.state_dict().items()}
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for step in range(2):
        result = engine.step(x, step)
    assert "teacher" in result.terms and not result.skipped
    teacher = VAE.from_pretrained(teacher_dir)
    with torch.no_grad():
        for model in (d.model, engine.ema.model):
            assert torch.equal(model.encode(x).mean, teacher.encode(x).mean)
    after = d.model.state_dict()
    assert not torch.equal(after["decoder.conv_in.weight"], before["decoder.conv_in.weight"])
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))


def test_encoder_distillation_regresses_the_normalised_mean(teacher_dir, photos, tmp_path):
    s = settings(teacher_dir, photos, tmp_path / "run", mode="encoder", encoder_channels=[8, 16], decoder_channels=None)
    d = student(s)
    assert d.model.config.decoder_channels == [16, 32] and d.model.config.block_out_channels == [8, 16]
    assert not any(p.requires_grad for p in d.model.decoder.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = d.forward(TrainBatch(x))
    extra, terms = out.extra_loss, out.terms
    teacher = d.forward.teacher
    with torch.no_grad():
        want = torch.nn.functional.mse_loss(
            (d.model.encode(x).mean - 0.05) * 0.7, (teacher.encode(x).mean - 0.05) * 0.7
        )
    torch.testing.assert_close(terms["latent"], want, rtol=1e-6, atol=0)
    extra.backward()
    assert d.model.encoder.conv_in.weight.grad is not None


def test_student_settings_are_complete_and_resolving_them_again_changes_nothing(teacher_dir, photos, tmp_path):
    raw = settings(teacher_dir, photos, tmp_path / "run", teacher_weight=0.5)
    resolved = student_settings(raw)
    assert resolved.model.block_out_channels == [16, 32] and resolved.model.decoder_channels == [8, 16]
    assert resolved.model.latents_std == TEACHER.latents_std and resolved.loss.kl_weight == 0
    assert raw.model.block_out_channels == [16, 32, 64, 64]  # the caller's settings are left as they were
    assert student_settings(resolved) == resolved
    with pytest.raises(UsageError, match="not the student of"):  # weights for settings nobody resolved
        load_student(raw, torch.device("cpu"), [])


def test_trainer_resolves_the_student_before_it_reads_settings_and_splits_the_data_once(
    teacher_dir, photos, tmp_path, monkeypatch
):
    from zturbo.train import loop

    calls = []
    real_split = loop.split_data
    monkeypatch.setattr(loop, "split_data", lambda *a: calls.append(a) or real_split(*a))
    raw = settings(teacher_dir, photos, tmp_path / "run")
    trainer = loop.Trainer(raw, quiet=True)
    assert len(calls) == 1
    assert trainer.settings == student_settings(raw) and trainer.engine.settings is trainer.settings
    assert trainer.engine.vae is trainer.student.model and trainer.student.model.config == trainer.settings.model
    assert raw.model.block_out_channels == [16, 32, 64, 64]
    result = trainer.fit()
    assert result.steps == 2 and VAE.from_pretrained(result.final_dir).config.decoder_channels == [8, 16]


# -- stored latents -----------------------------------------------------------------------------------------


def test_stored_latents_equal_on_the_fly_teacher_latents(teacher_dir, photos, tmp_path):
    from zturbo.config import ServeConfig
    from zturbo.serve import encode_collection

    latents = tmp_path / "latents"
    encode_collection(teacher_dir, photos, latents, ServeConfig(size=32, device="cpu", batch_size=2, reading="phased"))
    s = settings(teacher_dir, photos, tmp_path / "run", latents_dir=latents)
    d = student(s)
    paths = sorted(photos.iterdir())
    dataset = d.dataset(paths, photos, 32)
    assert len(dataset) == 4
    batch = dataset.collate([dataset[i] for i in range(4)])  # what the loader hands the engine
    assert batch.latents.shape == (4, 4, 16, 16)
    with torch.no_grad():
        from_stored, live = d.forward(batch), d.forward(TrainBatch(batch.images))
    recon_stored, z_stored, recon_live, z_live = from_stored.recon, from_stored.mean, live.recon, live.mean
    # The same fp32 convolutions on the same pixels; only the batch (4 here, 2 when encoded) may
    # change the summation order, a few fp32 ulps on values of order 1.
    torch.testing.assert_close(z_stored, z_live, atol=1e-5, rtol=0)
    torch.testing.assert_close(recon_stored, recon_live, atol=1e-4, rtol=0)


def test_latents_from_another_model_are_refused(teacher_dir, photos, tmp_path):
    from zturbo.config import ServeConfig
    from zturbo.serve import encode_collection

    torch.manual_seed(1)
    other = VAE(TEACHER).save_pretrained(tmp_path / "other")
    latents = tmp_path / "latents"
    encode_collection(other, photos, latents, ServeConfig(size=32, device="cpu", reading="phased"))
    s = settings(teacher_dir, photos, tmp_path / "run", latents_dir=latents)
    with pytest.raises(UsageError, match=f"come from model {other} .*not from the teacher {teacher_dir} "):
        student(s)
    # An index written before fingerprints were recorded: the teacher re-encodes one entry instead.
    index = json.loads((latents / "index.json").read_text())
    del index["encoder_fingerprint"]
    (latents / "index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match="not made by the teacher"):
        student(s)


def test_teacher_latents_are_accepted_by_fingerprint_alone(teacher_dir, photos, tmp_path):
    from zturbo.config import ServeConfig
    from zturbo.serve import encode_collection

    latents = tmp_path / "latents"
    encode_collection(teacher_dir, photos, latents, ServeConfig(size=32, device="cpu", reading="phased"))
    # The check reads no image when the fingerprints match: with the images gone it still passes
    # (the fallback re-encoding would stop at the missing file). No calibration either: it reads images.
    data = tmp_path / "elsewhere"
    data.mkdir()
    s = settings(teacher_dir, data, tmp_path / "run", latents_dir=latents, calibration_images=0)
    d = student(s, train_paths=[])
    assert d.index.fingerprint == encoder_fingerprint(VAE.from_pretrained(teacher_dir))


# -- bad input ----------------------------------------------------------------------------------------------


def _cli(capsys, *args: str) -> tuple[int, str]:
    from zturbo.cli import run

    code = run(["train", "--profile", "demo", "--max-steps", "1", "--quiet", *args])
    return code, capsys.readouterr().err


def test_bad_input_is_one_line_exit_2_and_writes_nothing(teacher_dir, photos, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--data", str(photos), "--output", str(out), "--image-size", "32"]
    cases = [
        (["--teacher", str(photos)], "train --teacher needs a model folder"),
        (["--teacher", str(teacher_dir), "--decoder-channels", "6,12"], "not divisible by norm_num_groups"),
        (["--teacher", str(teacher_dir), "--z-channels", "8"], "differ from the teacher's 4"),
        (["--teacher", str(teacher_dir), "--decoder-channels", "32,64"], "wider than the teacher"),
        (["--teacher", str(teacher_dir), "--distill", "sideways"], "distill.mode"),
    ]
    for extra, message in cases:
        code, err = _cli(capsys, *base, *extra)
        assert code == 2, (extra, err)
        assert message in err, (extra, err)
        assert len([line for line in err.splitlines() if line.strip() and not line.startswith("hint")]) <= 2
        assert not out.exists()


def test_dry_run_shows_the_students_settings(teacher_dir, photos, tmp_path, capsys):
    from zturbo.cli import run

    assert run(["train", "--profile", "flux-decoder-ultrafast", "--teacher", str(teacher_dir), "--data", str(photos),
                "--image-size", "32", "--decoder-channels", "8,16", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["settings"]
    # The teacher's architecture and statistics with the student's decoder, not the profile's FLUX.1 shape.
    assert plan["model"]["block_out_channels"] == [16, 32] and plan["model"]["decoder_block_out_channels"] == [8, 16]
    assert plan["model"]["latents_mean"] == TEACHER.latents_mean and plan["loss"]["kl_weight"] == 0


def test_random_init_copies_only_the_frozen_parts():
    torch.manual_seed(0)
    teacher = VAE(TEACHER)
    student = build_student(teacher, TEACHER.model_copy(update={"decoder_block_out_channels": [8, 16]}), "decoder", "random")
    assert torch.equal(student.encoder.conv_in.weight, teacher.encoder.conv_in.weight)
    assert not student.encoder.conv_in.weight.requires_grad and student.decoder.conv_in.weight.requires_grad
    forward = DistillForward(student, None, "decoder", 0.0)
    out = forward(TrainBatch(torch.zeros(1, 3, 32, 32)))
    assert out.recon.shape == (1, 3, 32, 32) and float(out.extra_loss) == 0 and not out.terms
    assert not out.logvar.any() and out.mean.shape == (1, 4, 16, 16)  # the decoded latent; the KL term reads zeros


# -- latent statistics --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_latent_stats_match_a_direct_computation_and_write_atomically(teacher_dir, photos, capsys):
    from zturbo.cli import run
    from zturbo.eval.data import find_images, load_pixels
    from zturbo.eval.latent_stats import latent_statistics

    stats = latent_statistics(teacher_dir, photos, size=32, batch_size=3)
    vae = VAE.from_pretrained(teacher_dir)
    x = torch.stack([load_pixels(p, 32, 1 << 28)[0] for p in find_images(photos).paths]).float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x).mean.double()
    # The statistics ran the encoder in batches of 3, this in one of 4: fp32 convolutions summed in
    # another order give latents (|z| < ~2) a few ulps apart (2^-24 relative each, so < 1e-6); the
    # float64 sums add nothing measurable. Means and stds therefore agree to 1e-6.
    per_channel = z.transpose(0, 1).flatten(1)
    torch.testing.assert_close(torch.tensor(stats.latents_mean, dtype=torch.float64), per_channel.mean(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        torch.tensor(stats.latents_std, dtype=torch.float64), per_channel.std(1, unbiased=False), rtol=0, atol=1e-6
    )
    assert stats.shift_factor == pytest.approx(float(z.mean()), abs=1e-6)
    assert stats.scaling_factor == pytest.approx(1 / float(z.std(unbiased=False)), rel=1e-5)

    assert run(["eval", str(teacher_dir), "--data", str(photos), "--latent-stats", "--size", "32", "--write", "--json"]) == 0
    capsys.readouterr()
    saved = json.loads((teacher_dir / "config.json").read_text())
    assert saved["scaling_factor"] == pytest.approx(stats.scaling_factor) and len(saved["latents_mean"]) == 4
    assert VAE.from_pretrained(teacher_dir).config.shift_factor == pytest.approx(stats.shift_factor)
    assert [p.name for p in teacher_dir.iterdir() if p.name.startswith(".")] == []


def test_both_mode_trains_decoder_on_teacher_latents_and_encoder_by_regression(teacher_dir, photos, tmp_path):
    s = settings(teacher_dir, photos, tmp_path / "run", mode="both", encoder_channels=[8, 16])
    d = student(s)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = d.forward(TrainBatch(x))
    recon, z, extra, terms = out.recon, out.mean, out.extra_loss, out.terms
    with torch.no_grad():
        assert torch.equal(z, d.forward.teacher.encode(x).mean)  # the decoder learns from the teacher's latents
    (recon.abs().mean() + extra).backward()
    assert d.model.encoder.conv_in.weight.grad is not None and d.model.decoder.conv_in.weight.grad is not None
    assert "latent" in terms


def test_cli_trains_from_stored_latents_and_the_result_encodes_as_the_teacher(teacher_dir, photos, tmp_path, capsys):
    from zturbo.cli import run

    latents = tmp_path / "latents"
    assert run(["serve-batch", "encode", str(teacher_dir), "--input", str(photos), "--output", str(latents),
                "--size", "32", "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    assert run(["train", "--profile", "demo", "--data", str(photos), "--output", str(out), "--image-size", "32",
                "--batch-size", "2", "--max-steps", "2", "--teacher", str(teacher_dir), "--decoder-channels", "8,16",
                "--latents", str(latents), "--num-workers", "0", "--quiet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 2 and result["skipped_steps"] == 0
    final = VAE.from_pretrained(out / "final")
    teacher = VAE.from_pretrained(teacher_dir)
    assert final.config.decoder_channels == [8, 16] and final.config.latents_std == TEACHER.latents_std
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(final.encode(x).mean, teacher.encode(x).mean)
