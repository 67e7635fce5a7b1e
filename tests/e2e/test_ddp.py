"""Two-process gloo DDP training through torchrun writes a checkpoint that loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from train_helpers import subprocess_env, train_argv

pytestmark = pytest.mark.slow


def test_two_process_gloo_ddp_writes_a_loadable_checkpoint(tiny_config, small_data, tmp_path):
    from zturbo import load_vae

    run_dir = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "zturbo",
        *train_argv(tiny_config, small_data, run_dir),
        "--max-steps",
        "2",
        "--checkpoint-every",
        "2",
        "--disc-weight",
        "0.5",
        "--disc-start",
        "1",
        "--json",
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # rank 0 alone prints
    assert out["world_size"] == 2 and out["steps"] == 2
    state = json.loads((run_dir / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    vae = load_vae(run_dir / "checkpoints" / "step-2")
    assert vae(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    assert (run_dir / "checkpoints" / "step-2" / "discriminator.safetensors").is_file()

