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
