"""data.decode: where training JPEGs are decoded, how the choice is made, and that the trainer's loader follows it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from zturbo.config import load_settings
from zturbo.data import jpeg_device
from zturbo.data.datasets import to_unit_range
from zturbo.data.jpeg_device import EncodedBatch, decode_on_device
from zturbo.errors import DeviceError, UsageError
from zturbo.train import loop

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object only: nothing here touches a GPU


def _write(folder, count: int, suffix: str, size=(40, 32)) -> list:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            folder / f"{i:02d}{suffix}", quality=90)
    return sorted(folder.iterdir())


@pytest.fixture
def jpegs(tmp_path):
    return _write(tmp_path / "jpegs", 8, ".jpg")  # shorter side 32: decodable as they are at 32 px


def test_decode_setting_defaults_to_auto_and_takes_cpu_and_gpu():
    assert load_settings(None, None, default_profile=None).data.decode == "auto"
    assert load_settings(None, None, {"data": {"decode": "gpu"}}, default_profile=None).data.decode == "gpu"
    with pytest.raises(UsageError, match="data.decode"):
        load_settings(None, None, {"data": {"decode": "nvjpeg"}}, default_profile=None)


def test_auto_decodes_on_the_cpu_here_and_on_cuda_only_for_jpegs_it_can_take(jpegs, tmp_path):
    assert decode_on_device("auto", CPU, jpegs, 32) is False
    assert decode_on_device("auto", CUDA, jpegs, 32) is True
    assert decode_on_device("auto", CUDA, jpegs, 24) is False  # every file would need a resize first
    assert decode_on_device("auto", CUDA, _write(tmp_path / "pngs", 4, ".png"), 32) is False
    assert decode_on_device("cpu", CUDA, jpegs, 32) is False
    assert decode_on_device("gpu", CUDA, jpegs, 32) is True


def test_auto_reads_a_bounded_sample_of_headers(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(jpeg_device, "device_decodable", lambda path, size, max_pixels: seen.append(path))
    paths = [tmp_path / f"{i}.jpg" for i in range(1000)]
    assert decode_on_device("auto", CUDA, paths, 32) is False
    assert seen == paths[:: 1000 // jpeg_device.AUTO_SAMPLE][: jpeg_device.AUTO_SAMPLE]  # spread over the set


def test_gpu_without_cuda_is_a_one_line_error(monkeypatch, jpegs):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available") as info:
        decode_on_device("gpu", CPU, jpegs, 32)
    assert "\n" not in info.value.message and "data.decode" in info.value.hint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, but training asked for the CPU
    with pytest.raises(UsageError, match="needs training on a CUDA device, not cpu"):
        decode_on_device("gpu", CPU, jpegs, 32)


def _settings(tiny_config, data, output, decode: str):
    return load_settings(None, tiny_config, {"data": {"data_dir": data, "decode": decode, "val_images": 0},
                                             "train": {"output_dir": output}}, default_profile=None)


def test_the_trainers_loader_follows_the_choice(monkeypatch, tiny_config, jpegs, tmp_path):
    """The trainer asks decode_on_device; said yes, its loader hands the engine still-encoded JPEGs, and
    the step decodes them (Pillow on the CPU) to exactly the tensors the CPU path gives."""
    calls = []

    def choose(mode, device, paths, image_size):
        calls.append((mode, device, list(paths), image_size))
        return mode == "gpu"

    monkeypatch.setattr(loop, "decode_on_device", choose)
    batches = {}
    for mode in ("cpu", "gpu"):
        trainer = loop.Trainer(_settings(tiny_config, jpegs[0].parent, tmp_path / mode, mode), quiet=True)
        assert calls[-1] == (mode, CPU, jpegs, 32)
        assert trainer.device_decode is (mode == "gpu") and trainer.loader.dataset.device_decode is (mode == "gpu")
        batches[mode] = next(iter(trainer.loader))
        if mode == "gpu":
            result = trainer.engine.step(batches[mode], 0)
            assert not result.skipped and np.isfinite(result.terms["loss"])
    gpu, cpu = batches["gpu"].images, batches["cpu"].images
    assert isinstance(gpu, EncodedBatch) and cpu.dtype == torch.uint8
    assert batches["gpu"].latents is None and batches["cpu"].latents is None
    torch.testing.assert_close(gpu.decode(CPU), to_unit_range(cpu), rtol=0, atol=0)


def test_gpu_decode_on_a_cpu_machine_stops_training_before_the_run_folder(
    monkeypatch, capsys, tiny_config, jpegs, tmp_path
):
    from zturbo.cli import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ZTURBO_DATA__DECODE", "gpu")
    run_dir = tmp_path / "run"
    rc = run(["train", "--config", str(tiny_config), "--data", str(jpegs[0].parent), "--output", str(run_dir),
              "--device", "cpu", "--max-steps", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == DeviceError.exit_code and len(lines) == 2, lines
    assert lines[0].startswith('error: data.decode = "gpu" decodes training JPEGs on a CUDA GPU')
    assert not run_dir.exists()
