"""Invariants every packaged profile keeps."""

import pytest

from zturbo.config import available_profiles, load_settings


def test_the_packaged_profiles_are_all_found():
    # A profile missing here would go unchecked by the test below.
    assert {"ultrafast", "fast", "highres", "ultra", "standard", "demo", "flux-decoder-fast",
            "flux-decoder-ultrafast"} <= set(available_profiles())


@pytest.mark.parametrize("name", available_profiles())
def test_every_level_keeps_several_channels_per_norm_group(name):
    """One channel per GroupNorm group is a per-image instance norm: at the decoder's last
    norm it removes each channel's mean, so the output's mean colour no longer follows the
    latent. The demo had 16 groups on its 16-channel level and reconstructed every photo in
    the same grey-pink (#18)."""
    model = load_settings(name).model
    assert min(model.block_out_channels + model.decoder_channels) // model.norm_num_groups >= 2


def test_a_distillation_profile_states_its_decoder_widths_once():
    """[distill] holds the student's widths; the profile's model (what `config profiles` counts) follows them."""
    for name, widths in (("flux-decoder-fast", [96, 192, 384, 384]), ("flux-decoder-ultrafast", [64, 128, 256, 256])):
        settings = load_settings(name)
        assert settings.distill.decoder_channels == widths
        assert settings.model.decoder_channels == widths and settings.model.block_out_channels == [128, 256, 512, 512]
