"""The one-line error for a training step that does not fit even at micro-batch 1."""

from zturbo.train.memory import DoesNotFitError, does_not_fit


def test_error_names_profile_size_peak_and_what_to_change():
    err = does_not_fit("ultra", 2048, 41.26, 30.0, checkpointing=False)
    assert isinstance(err, DoesNotFitError)
    assert err.message == ("profile ultra at 2048 px does not fit even at micro-batch 1: one image's step peaks "
                           "at 41.3 GiB, over the 30.0 GiB available")
    assert "gradient_checkpointing" in err.hint
    # With checkpointing already on, the advice is what is left to change.
    assert "gradient_checkpointing" not in does_not_fit("ultra", 2048, 41.3, 30.0, checkpointing=True).hint


def test_the_cli_prints_it_in_one_line(monkeypatch, capsys, tiny_config, small_data, tmp_path):
    """Where the micro-batch fitting gives up (CUDA only), `zturbo train` prints the error and its hint, exit 1."""
    from zturbo.cli import run
    from zturbo.train.engine import TrainEngine

    def fit(self, image_size, headroom=0.85):
        raise does_not_fit(self.settings.profile, image_size, 41.26, 30.0, self.settings.train.gradient_checkpointing)

    monkeypatch.setattr(TrainEngine, "fit_micro_batch", fit)
    rc = run(["train", "--profile", "demo", "--config", str(tiny_config), "--data", str(small_data),
              "--output", str(tmp_path / "run"), "--max-steps", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(lines) == 2, lines
    assert lines[0] == ("error: profile demo at 32 px does not fit even at micro-batch 1: one image's step peaks at "
                        "41.3 GiB, over the 30.0 GiB available")
    assert lines[1].startswith("hint: turn on train.gradient_checkpointing")
