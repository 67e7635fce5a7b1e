"""Zoom and colour augmentation (zturbo.data.augment) in the training dataset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from zturbo.data.augment import LUMA, Augment, apply_chroma_map
from zturbo.data.datasets import ImageFolderDataset, augment_seed
from zturbo.data.images import chroma_planes


def _photo(path, w=96, h=64, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_identity_map_and_luma_kept():
    x = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    assert torch.equal(apply_chroma_map(x, torch.eye(2)), x)
    # A hue rotation keeps luma where nothing clips: mid-grey photo with mild colours.
    y = (torch.rand(3, 16, 16) * 0.4 - 0.2)
    rot = torch.tensor([[math.cos(1.0), -math.sin(1.0)], [math.sin(1.0), math.cos(1.0)]])
    z = apply_chroma_map(y, rot)
    luma = torch.tensor(LUMA)
    torch.testing.assert_close(torch.einsum("c,chw->hw", luma, z), torch.einsum("c,chw->hw", luma, y),
                               atol=1e-5, rtol=0)
    # and rotates the chroma vector by that angle (same length, the angle between them 1 rad)
    cy, cz = chroma_planes(y[None])[0].flatten(1), chroma_planes(z[None])[0].flatten(1)
    torch.testing.assert_close(cz.norm(dim=0), cy.norm(dim=0), atol=1e-5, rtol=0)
    cos = (cy * cz).sum(0) / (cy.norm(dim=0) * cz.norm(dim=0))
    torch.testing.assert_close(cos, torch.full_like(cos, math.cos(1.0)), atol=1e-4, rtol=0)


def test_grey_removes_colour():
    x = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    grey = apply_chroma_map(x, torch.zeros(2, 2))
    assert grey.dtype == torch.uint8
    # every channel equal: no chroma at all after rounding
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_draw_probabilities():
    generator = torch.Generator().manual_seed(0)
    aug = Augment(hue_probability=0.5, grey_probability=0.25)
    kinds = {"grey": 0, "hue": 0, "none": 0}
    for _ in range(4000):
        m = aug.colour_transform(generator)
        kinds["none" if m is None else "grey" if not m.any() else "hue"] += 1
    # grey 1/4; hue 1/2 of the rest (3/8); none 3/8. 4000 draws: sd of a share is under 0.008.
    assert abs(kinds["grey"] / 4000 - 0.25) < 0.04
    assert abs(kinds["hue"] / 4000 - 0.375) < 0.04
    assert Augment().colour_transform(generator) is None


def test_zoom_range_and_cap():
    generator = torch.Generator().manual_seed(0)
    aug = Augment(max_zoom=4.0)
    sides = [aug.zoomed_side(32, 1000, generator) for _ in range(500)]
    assert min(sides) >= 32 and max(sides) <= 128
    # log-uniform: about half the draws under the geometric middle (64)
    assert 0.4 < sum(s < 64 for s in sides) / len(sides) < 0.6
    # never past the photo's own pixels, never under the crop
    assert all(aug.zoomed_side(32, 48, generator) <= 48 for _ in range(50))
    assert aug.zoomed_side(32, 20, generator) == 32
    assert Augment().zoomed_side(32, 1000, generator) == 32


def test_dataset_stream(tmp_path):
    paths = [_photo(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    plain = ImageFolderDataset(paths, 32, as_uint8=True)
    off = ImageFolderDataset(paths, 32, as_uint8=True, augment=Augment())
    on = ImageFolderDataset(paths, 32, as_uint8=True, augment=Augment(max_zoom=2.0, hue_probability=0.5,
                                                                      grey_probability=0.2))
    keys = [(i, augment_seed(7, epoch, i)) for epoch in range(4) for i in range(3)]
    # off: exactly the stream without the option
    for key in keys:
        assert torch.equal(plain[key], off[key])
    # on: the same crop for the same (seed, epoch, index) whatever the order, and different from off
    first = [on[key] for key in keys]
    again = [on[key] for key in reversed(keys)][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert any(not torch.equal(a, plain[key]) for a, key in zip(first, keys))
    assert all(a.shape == (3, 32, 32) and a.dtype == torch.uint8 for a in first)
    # unaugmented reads (no generator: eval, the sample grid) are untouched
    assert torch.equal(on[0], plain[0])


@pytest.mark.parametrize("option", [{"max_zoom": 2.0}, {"hue_probability": 0.5}])
def test_augmented_crops_never_left_encoded(tmp_path, option):
    path = tmp_path / "a.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(path, quality=95)
    assert not ImageFolderDataset([path], 32, device_decode=True, augment=Augment(**option)).device_decode
