"""Training: losses, discriminator, NaN guard, data robustness, CLI (exact resume and DDP: tests/e2e).

Everything is tiny (32 px, [32, 64] channels, one thread).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from train_helpers import train_argv

from zturbo.config import LossConfig, load_settings
from zturbo.model.vae import VAE
from zturbo.train import NonFiniteLossError, TrainEngine, Trainer
from zturbo.train.losses import VAELoss, discriminator_loss

# 2 shared cores: one intra-op thread is faster and keeps CPU numerics reproducible.
pytestmark = pytest.mark.usefixtures("one_compute_thread")


def settings_for(tiny_config: Path, data: Path, output: Path, **train):
    overrides = {"data": {"data_dir": data}, "train": {"output_dir": output, **train}}
    return load_settings(None, tiny_config, overrides, default_profile=None)


def tiny_vae() -> VAE:
    torch.manual_seed(0)
    return VAE(
        block_out_channels=[32, 64],
        layers_per_block=1,
        latent_channels=4,
        mid_block_add_attention=False,
        sample_size=32,
    )


# -- losses ---------------------------------------------------------------------------------------------


def _grads_for(loss_cfg: LossConfig, perceptual=None, with_disc=False):
    from zturbo.train.discriminator import NLayerDiscriminator
    from zturbo.data.batch import TrainBatch
    from zturbo.train.engine import TrainForward

    vae = tiny_vae().train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = TrainForward(vae)(TrainBatch(x), torch.randn(2, 4, 16, 16))
    recon, mean, logvar = out.recon, out.mean, out.logvar
    assert out.extra_loss is None and not out.terms  # the plain VAE adds nothing to the profile's losses
    disc = NLayerDiscriminator(n_layers=2).requires_grad_(False) if with_disc else None
    total, terms = VAELoss(loss_cfg, perceptual)(
        x,
        recon,
        mean,
        logvar,
        discriminator=disc,
        last_layer=vae.decoder.conv_out.weight if with_disc else None,
    )
    total.backward()
    enc = vae.encoder.conv_in.weight.grad
    dec = vae.decoder.conv_out.weight.grad
    return enc, dec, terms


def _nonzero(g) -> bool:
    return g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_each_loss_term_contributes_gradient():
    only = {"reconstruction_weight": 0.0, "perceptual_weight": 0.0, "kl_weight": 0.0, "disc_weight": 0.0}
    enc, dec, _ = _grads_for(LossConfig(**{**only, "reconstruction_weight": 1.0}))
    assert _nonzero(enc) and _nonzero(dec)
    enc, dec, _ = _grads_for(
        LossConfig(**{**only, "reconstruction_weight": 1.0, "reconstruction_loss": "l2"})
    )
    assert _nonzero(enc) and _nonzero(dec)
    # KL only reaches the encoder.
    enc, dec, terms = _grads_for(LossConfig(**{**only, "kl_weight": 1.0}))
    assert _nonzero(enc) and (dec is None or dec.abs().sum() == 0)
    assert terms["kl"] > 0
    # LPIPS with a RANDOMLY INITIALISED backbone (no pretrained weights offline): this checks only
    # that gradients flow through the perceptual network into the VAE, not LPIPS' values.
    from zturbo.perceptual import load_lpips

    # SqueezeNet keeps construction cheap; the gradient path is the same for every backbone.
    lpips_random = load_lpips("squeeze", "cpu", random_backbone=True)
    enc, dec, terms = _grads_for(
        LossConfig(**{**only, "perceptual_weight": 1.0, "perceptual_net": "squeeze"}), perceptual=lpips_random
    )
    assert _nonzero(enc) and _nonzero(dec) and "lpips" in terms
    assert not any(p.grad is not None for p in lpips_random.parameters())  # frozen
    # GAN generator term, scaled by the adaptive weight (clamped, detached).
    enc, dec, terms = _grads_for(
        LossConfig(**{**only, "disc_weight": 1.0, "reconstruction_weight": 1.0, "adaptive_weight_max": 5.0}),
        with_disc=True,
    )
    assert _nonzero(dec)
    assert 0 < float(terms["d_weight"]) <= 5.0 and not terms["d_weight"].requires_grad


def test_adaptive_weight_balances_gradients_and_clamps():
    from zturbo.train.losses import adaptive_gan_weight

    w = torch.randn(4, 4, requires_grad=True)
    nll = (w * 3.0).sum()
    g = (w * 0.5).sum()
    assert float(adaptive_gan_weight(nll, g, w, 1e4)) == pytest.approx(6.0, rel=1e-3)
    assert float(adaptive_gan_weight(nll, g, w, 2.0)) == 2.0


def test_discriminator_step_leaves_vae_gradients_alone():
    from zturbo.train.discriminator import NLayerDiscriminator

    vae = tiny_vae()
    disc = NLayerDiscriminator(n_layers=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = vae(x)
    recon.abs().mean().backward(retain_graph=True)
    before = {n: p.grad.clone() for n, p in vae.named_parameters()}
    discriminator_loss(disc, x, recon).backward()
    assert all(torch.equal(p.grad, before[n]) for n, p in vae.named_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


def test_discriminator_starts_at_disc_start(tiny_config, tmp_path):
    settings = load_settings(
        None, tiny_config, {"loss": {"disc_weight": 0.5, "disc_start": 2}}, default_profile=None
    )
    engine = TrainEngine(settings, torch.device("cpu"), total_steps=4)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    initial = {k: v.clone() for k, v in engine.disc.state_dict().items()}
    for step in range(2):
        result = engine.step(x, step)
        assert not result.disc_active and "g" not in result.terms and "d" not in result.terms
    assert all(torch.equal(v, engine.disc.state_dict()[k]) for k, v in initial.items())
    result = engine.step(x, 2)
    assert result.disc_active and "g" in result.terms and "d" in result.terms
    weights = [k for k in initial if k.endswith("weight")]
    assert any(not torch.equal(initial[k], engine.disc.state_dict()[k]) for k in weights)


# -- training runs ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loss_falls_on_demo_photos(tiny_config, tmp_path):
    from zturbo.data import demo_dir

    settings = settings_for(
        tiny_config,
        demo_dir(),
        tmp_path / "run",
        max_steps=40,
        checkpoint_every=20,
        sample_every=20,
        learning_rate=3e-3,
    )
    trainer = Trainer(settings, quiet=True)

    def val_error(model) -> float:  # L1 on the fixed, held-out validation crops
        with torch.no_grad():
            return float((model(trainer.val_batch) - trainer.val_batch).abs().mean())

    before = val_error(trainer.engine.vae)
    result = trainer.fit()
    after = val_error(trainer.engine.ema.model)
    assert after < 0.7 * before, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert sum(r["rec"] for r in rows[-10:]) < sum(r["rec"] for r in rows[:10])
    run = tmp_path / "run"
    assert (run / "samples" / "step-40.png").is_file() and (run / "samples" / "step-20.png").is_file()
    grid = Image.open(run / "samples" / "step-40.png")
    # 2 validation images and 2 training images: rows of held-out original | reconstruction | training
    # original | reconstruction, 32 px each.
    assert grid.size == (128, 64)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-20", "step-40"]
    step = run / "checkpoints" / "step-40"
    for name in (
        "model/config.json",
        "ema/diffusion_pytorch_model.safetensors",
        "trainer_state.pt",
        "trainer_state.json",
        "settings.json",
    ):
        assert (step / name).is_file(), name
    from zturbo import load_vae

    final = load_vae(run)  # resolves RUN_DIR/final (the EMA weights)
    ema = load_vae(step / "ema")
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), ema.state_dict().values()))
    assert result.steps == 40 and result.final_dir == str(run / "final")


def test_nonfinite_guard_skips_then_stops_with_checkpoint_intact(
    tiny_config, small_data, tmp_path, monkeypatch
):
    settings = settings_for(
        tiny_config, small_data, tmp_path / "run", max_steps=20, checkpoint_every=3, max_nonfinite_steps=3
    )
    trainer = Trainer(settings, quiet=True)
    poisoned = {"on": False}
    real_combine = VAELoss.combine

    def combine(self, *args, **kwargs):
        total = real_combine(self, *args, **kwargs)
        return total * float("nan") if poisoned["on"] else total

    monkeypatch.setattr(VAELoss, "combine", combine)

    def on_step(step, result):
        if step == 3:
            poisoned["on"] = True

    trainer.on_step = on_step
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        trainer.fit()
    assert trainer.engine.skipped_steps == 3
    step3 = tmp_path / "run" / "checkpoints" / "step-3"
    assert [p.name for p in step3.parent.iterdir()] == ["step-3"]
    from zturbo import load_vae

    saved = load_vae(step3 / "model").state_dict()
    # Skipped steps never touched the weights: what is in memory is what the checkpoint holds.
    assert all(torch.equal(saved[k], v) for k, v in trainer.engine.vae.state_dict().items())


def test_single_nonfinite_step_is_skipped_and_counted(tiny_config):
    settings = load_settings(None, tiny_config, default_profile=None)
    engine = TrainEngine(settings, torch.device("cpu"), total_steps=3)
    good = torch.rand(4, 3, 32, 32) * 2 - 1
    before = {k: v.clone() for k, v in engine.vae.state_dict().items()}
    result = engine.step(torch.full_like(good, float("nan")), 0)
    assert result.skipped and engine.skipped_steps == 1 and engine.nonfinite_streak == 1
    assert all(torch.equal(before[k], v) for k, v in engine.vae.state_dict().items())
    result = engine.step(good, 1)
    assert not result.skipped and engine.nonfinite_streak == 0


def test_corrupt_image_is_skipped_with_a_warning(tiny_config, small_data, tmp_path, capsys):
    from zturbo.cli import run

    (small_data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = next(small_data.glob("*.png"))
    (small_data / "truncated.png").write_bytes(good.read_bytes()[:200])
    (small_data / "empty.jpg").write_bytes(b"")
    rc = run(train_argv(tiny_config, small_data, tmp_path / "run", "--max-steps", "4", "--json", "--quiet"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "skipping unreadable image" in captured.err and "broken.png" in captured.err
    assert json.loads(captured.out)["steps"] == 4


def test_existing_run_needs_resume_flag(tiny_config, small_data, tmp_path, capsys):
    from zturbo.cli import run

    args = train_argv(tiny_config, small_data, tmp_path / "run", "--quiet", "--json")
    assert run([*args, "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert run([*args, "--max-steps", "3"]) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert run([*args, "--max-steps", "3", "--resume", "auto"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["start_step"] == 2 and out["steps"] == 3 and out["resumed_from"].endswith("step-2")


def test_missing_lpips_weights_is_a_clear_error(tiny_config, small_data, tmp_path, capsys, monkeypatch):
    from zturbo.cli import run

    def offline(url, dst, progress=True):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    rc = run(train_argv(tiny_config, small_data, tmp_path / "run", "--perceptual-weight", "0.5", "--max-steps", "1"))
    err = capsys.readouterr().err
    assert rc == 1
    assert "vgg16-397923af.pth" in err and str(tmp_path / "hub") in err and "perceptual weight to 0" in err


# -- CLI ----------------------------------------------------------------------------------------------------


def test_interactive_menu_picks_a_profile(monkeypatch, capsys, tmp_path):
    import zturbo.commands.train as train_cmd
    from zturbo.cli import run

    monkeypatch.setattr(train_cmd, "_interactive", lambda: True)
    monkeypatch.setattr(sys, "stdin", io.StringIO("9\nultrafast\n"))
    rc = run(["train", "--dry-run", "--json", "--data", str(tmp_path), "--output", str(tmp_path / "r")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert json.loads(captured.out)["profile"] == "ultrafast"
    assert "highres" in captured.err and "not one of" in captured.err

    monkeypatch.setattr(sys, "stdin", io.StringIO("3\n"))
    assert run(["train", "--dry-run", "--json", "--data", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["profile"] == "highres"

    monkeypatch.setattr(train_cmd, "_interactive", lambda: False)
    assert run(["train", "--dry-run", "--json", "--data", str(tmp_path)]) == 0
    plan = json.loads(capsys.readouterr().out)
    fast = load_settings("fast")
    assert plan["profile"] == "fast"
    assert (plan["image_size"], plan["batch_size"]) == (fast.data.image_size, fast.train.batch_size)


def test_seed_flag_spellings(capsys, tmp_path):
    from zturbo.cli import run

    rc = run(
        [
            "train",
            "--profile",
            "fast",
            "--data",
            str(tmp_path),
            "--output_dir",
            str(tmp_path / "o"),
            "--batch_size",
            "8",
            "--image_size",
            "512",
            "--z_channels",
            "16",
            "--learning_rate",
            "1e-4",
            "--perceptual_weight",
            "0.5",
            "--reconstruction_weight",
            "2",
            "--mixed_precision",
            "--num_workers",
            "2",
            "--warmup_epochs",
            "1",
            "--epochs",
            "7",
            "--dry-run",
            "--json",
        ]
    )
    assert rc == 0
    s = json.loads(capsys.readouterr().out)["settings"]
    assert (
        s["train"]["batch_size"] == 8
        and s["data"]["image_size"] == 512
        and s["model"]["latent_channels"] == 16
    )
    assert s["train"]["learning_rate"] == 1e-4 and s["loss"]["perceptual_weight"] == 0.5
    assert (
        s["loss"]["reconstruction_weight"] == 2
        and s["data"]["num_workers"] == 2
        and s["train"]["epochs"] == 7
    )
    assert s["data"]["data_dir"] == str(tmp_path) and s["train"]["output_dir"] == str(tmp_path / "o")
    for dropped in ("--data_path", "--save_steps"):  # the seed script's other names for --data, --checkpoint-every
        assert run(["train", "--profile", "fast", dropped, "1", "--dry-run"]) == 2


def test_demo_profile_defaults_to_bundled_photos(capsys):
    from zturbo.cli import run
    from zturbo.data import demo_dir

    assert run(["train", "--profile", "demo", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["data_dir"] == str(demo_dir())
    assert plan["settings"]["loss"]["perceptual_weight"] == 0.0  # runs offline
    # An explicit --epochs replaces the profile's step count.
    assert run(["train", "--profile", "demo", "--epochs", "3", "--dry-run", "--json"]) == 0
    train = json.loads(capsys.readouterr().out)["settings"]["train"]
    assert train["epochs"] == 3 and train["max_steps"] is None


def test_prepared_folder_layout_uses_its_val_split(tmp_path, small_data):
    from zturbo.data.datasets import split_data

    prepared = tmp_path / "prepared"
    shutil.copytree(small_data, prepared / "train")
    (prepared / "val").mkdir()
    shutil.move(str(next((prepared / "train").glob("*.png"))), prepared / "val" / "v.png")
    split = split_data(prepared, val_images=4)
    assert split.layout == "prepared" and [p.name for p in split.val] == ["v.png"] and len(split.train) == 5


# -- precision and compile --------------------------------------------------------------------------------


@pytest.mark.slow
def test_fp16_grad_scaler_absorbs_overflow_and_keeps_training(tiny_config):
    """fp16 autocast with a GradScaler: an overflowing step is the scaler's to skip, not the NaN guard's."""
    settings = load_settings(None, tiny_config, {"train": {"precision": "fp16"}}, default_profile=None)
    engine = TrainEngine(settings, torch.device("cpu"), total_steps=10)
    assert engine.scaler.is_enabled() and engine.autocast_dtype is torch.float16
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    engine.step(x, 0)
    # A scale this large overflows fp16 gradients: the scaler must skip the update and back off.
    engine.scaler.update(2.0**40)
    before = {k: v.clone() for k, v in engine.vae.state_dict().items()}
    result = engine.step(x, 1)
    assert engine.scaler.get_scale() < 2.0**40
    assert engine.nonfinite_streak == 0 and not result.skipped
    assert all(torch.equal(before[k], v) for k, v in engine.vae.state_dict().items()), "overflowed step applied"
    # Once the scale is back in range (halving from 2**40 would take ~25 steps), steps update again.
    engine.scaler.update(1024.0)
    result = engine.step(x, 2)
    assert not result.skipped and math.isfinite(result.terms["loss"])
    assert not all(torch.equal(before[k], v) for k, v in engine.vae.state_dict().items())
    assert all(torch.isfinite(p).all() for p in engine.vae.parameters())


@pytest.mark.slow
def test_compiled_training_step_matches_eager(tiny_config):
    pytest.importorskip("torch._inductor")
    import shutil as _shutil

    if _shutil.which("cc") is None and _shutil.which("gcc") is None:
        pytest.skip("torch.compile on CPU needs a C compiler")
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    results = []
    for compiled in (False, True):
        settings = load_settings(None, tiny_config, {"train": {"compile": compiled}}, default_profile=None)
        engine = TrainEngine(settings, torch.device("cpu"), total_steps=10)
        results.append([engine.step(x, i).terms["rec"] for i in range(3)])
        if compiled:
            assert engine.forward is not engine.vae and hasattr(engine.forward, "_orig_mod")
    eager, compiled = results
    assert compiled == pytest.approx(eager, rel=1e-3, abs=1e-5)
