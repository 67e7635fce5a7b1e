"""Invariants every packaged profile keeps."""

import pytest

from zturbo.config import PROFILE_NAMES, load_settings


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_every_level_keeps_several_channels_per_norm_group(name):
    """One channel per GroupNorm group is a per-image instance norm: at the decoder's last
    norm it removes each channel's mean, so the output's mean colour no longer follows the
    latent. The demo had 16 groups on its 16-channel level and reconstructed every photo in
    the same grey-pink (#18)."""
    model = load_settings(name).model
    assert min(model.block_out_channels) // model.norm_num_groups >= 2
