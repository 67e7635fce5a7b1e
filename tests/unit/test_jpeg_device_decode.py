"""Device JPEG decoding for training batches: which files qualify, and the same crops and flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from zturbo.data.datasets import ImageFolderDataset, ResumableSampler, make_loader
from zturbo.data.jpeg_device import EncodedBatch, EncodedImage


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return Image.fromarray((base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8))


@pytest.fixture
def folder(tmp_path):
    _photo(40, 32, 0).save(tmp_path / "a_plain.jpg", quality=90)  # qualifies: shorter side 32
    _photo(32, 32, 1).convert("L").save(tmp_path / "b_grey.jpeg", quality=90)  # qualifies: greyscale
    _photo(40, 32, 2).save(tmp_path / "c_lossless.png")  # not a JPEG
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    _photo(32, 32, 3).save(tmp_path / "d_icc.jpg", quality=90, icc_profile=icc)  # colour management: CPU
    _photo(48, 48, 4).save(tmp_path / "e_big.jpg", quality=90)  # needs a resize: CPU
    exif = Image.Exif()
    exif[0x0112] = 6
    _photo(40, 32, 5).save(tmp_path / "f_rotated.jpg", quality=90, exif=exif.tobytes())  # rotated: CPU
    return sorted(tmp_path.iterdir())


def test_only_jpegs_needing_no_colour_or_geometry_work_stay_encoded(folder):
    dataset = ImageFolderDataset(folder, 32, device_decode=True)
    kinds = [type(dataset[(i, 7)]).__name__ for i in range(len(folder))]
    assert kinds == ["EncodedImage", "EncodedImage", "Tensor", "Tensor", "Tensor", "Tensor"]


def test_decoded_batch_equals_the_cpu_path_crop_for_crop(folder):
    """Without a GPU the batch's JPEGs are decoded by Pillow: the same pixels, so exactly the same tensors."""
    cpu = ImageFolderDataset(folder, 32)
    dev = ImageFolderDataset(folder, 32, device_decode=True)
    for seed in range(4):  # several crops and flips of the 40x32 image
        keys = [(i, seed * 10 + i) for i in range(len(folder))]
        ref = torch.stack([cpu[k] for k in keys])
        batch = EncodedBatch([dev[k] for k in keys], 32)
        torch.testing.assert_close(batch.decode(torch.device("cpu")), ref, rtol=0, atol=0)


def test_loader_collates_encoded_batches(folder):
    dataset = ImageFolderDataset(folder, 32, device_decode=True)
    sampler = ResumableSampler(dataset, seed=3)
    loader = make_loader(dataset, sampler, batch_size=3, num_workers=0, pin_memory=False)
    batches = [b.images for b in loader]  # TrainBatch objects of images alone
    assert len(batches) == 2 and all(isinstance(b, EncodedBatch) for b in batches)
    assert any(isinstance(i, EncodedImage) for b in batches for i in b.items)
    x = batches[0].decode(torch.device("cpu"))
    assert x.shape == (3, 3, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_uint8_crops_scale_to_the_float_path_exactly(folder):
    from zturbo.data.datasets import to_unit_range

    as_float = ImageFolderDataset(folder, 32)
    as_bytes = ImageFolderDataset(folder, 32, as_uint8=True)
    for i in range(len(folder)):
        raw = as_bytes[(i, 5)]
        assert raw.dtype == torch.uint8 and raw.shape == (3, 32, 32)
        assert torch.equal(to_unit_range(raw), as_float[(i, 5)])
    batch = EncodedBatch([as_bytes[(i, 5)] for i in range(2)], 32)  # uint8 pixels inside an encoded batch too
    assert torch.equal(batch.decode(torch.device("cpu")), torch.stack([as_float[(i, 5)] for i in range(2)]))
