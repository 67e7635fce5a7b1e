"""Training killed with SIGKILL mid-run resumes to the bit-identical weights, optimizer state and log."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import TINY, subprocess_env, train_argv

pytestmark = pytest.mark.slow


def _train_cmd(config: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "zturbo",
        *train_argv(config, data, output),
        "--max-steps",
        "14",
        "--checkpoint-every",
        "3",
        "--quiet",
        *extra,
    ]


def test_resume_after_sigkill_is_bit_identical(tiny_config, small_data, tmp_path):
    assert_resume_after_sigkill_is_bit_identical(tiny_config, small_data, tmp_path)


TINY_STUDENT = """
[model]
architecture = "tiny"
encoder_block_out_channels = [8, 8, 8, 8]
decoder_block_out_channels = [8, 8, 8, 8]
num_encoder_blocks = [1, 1, 1, 1]
num_decoder_blocks = [1, 1, 1, 1]
""" + "[data]" + TINY.split("[data]", 1)[1]  # the shared training settings, after the KL model section


def test_tiny_distillation_resumes_bit_identically_after_sigkill(small_data, tmp_path):
    """Both coders of a tiny student learning from a teacher on the fly (its encode in every step)."""
    from zturbo.model import VAE, ModelConfig

    torch.manual_seed(0)
    teacher = VAE(ModelConfig(block_out_channels=[8, 8, 8, 8], norm_num_groups=4, layers_per_block=1,
                              latent_channels=4, mid_block_add_attention=False, scaling_factor=0.7,
                              shift_factor=0.05)).save_pretrained(tmp_path / "teacher")
    config = tmp_path / "tiny-student.toml"
    config.write_text(TINY_STUDENT)
    assert_resume_after_sigkill_is_bit_identical(config, small_data, tmp_path, "--teacher", str(teacher),
                                                 "--distill", "both")


def assert_resume_after_sigkill_is_bit_identical(config: Path, data: Path, tmp_path: Path, *extra: str) -> None:
    """A run of ``config`` on ``data`` killed after its step-3 checkpoint and resumed ends bit-identical to an
    uninterrupted one: weights, EMA, optimizer state, position and the metrics log."""
    from zturbo.model.diffusers import read_weights

    tiny_config, small_data = config, data
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = subprocess_env()
    proc = subprocess.Popen(_train_cmd(tiny_config, small_data, killed, *extra), env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-3").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final").exists(), "the run finished before it could be killed"

    # The uninterrupted reference runs meanwhile in another process; then the killed run resumes.
    ref = subprocess.Popen(_train_cmd(tiny_config, small_data, straight, *extra), env=env, stderr=subprocess.PIPE)
    resumed = subprocess.run(
        _train_cmd(tiny_config, small_data, killed, *extra, "--resume", "auto"),
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert ref.wait(timeout=180) == 0, ref.stderr.read().decode()

    for part in ("model", "ema"):
        a = read_weights(straight / "checkpoints" / "step-14" / part)
        b = read_weights(killed / "checkpoints" / "step-14" / part)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{part} weights differ after resume"
    sa = torch.load(straight / "checkpoints" / "step-14" / "trainer_state.pt", weights_only=True)
    sb = torch.load(killed / "checkpoints" / "step-14" / "trainer_state.pt", weights_only=True)
    exp_a = sa["optimizer"]["state"][0]["exp_avg_sq"]
    assert torch.equal(exp_a, sb["optimizer"]["state"][0]["exp_avg_sq"])
    assert sa["position"] == sb["position"]
    rows = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 15))  # lines past the checkpoint were dropped on resume

