"""Shards across processes: exactly-once after SIGKILL for each output format and engine, and training from
shards resuming bit-exact after SIGKILL (the folder kill loop, on tar shards)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from shard_helpers import make_tar_shards
from train_helpers import subprocess_env, train_argv

from zturbo.data.latent_shards import LatentPairDataset, read_latent_index

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_compute_thread")]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance for the module: 2 CPUs, loopback only, no dashboard, no usage statistics. The
    killed and rerun drivers join it with --ray-address, so killing a driver leaves no Ray process behind."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _latents(out: Path) -> dict[str, torch.Tensor]:
    index = read_latent_index(out)
    return {e.source: LatentPairDataset(index, out, [e], 16).latent(e) for e in index.entries}


def _encode_cmd(model, spec, out, *args) -> list[str]:
    return [sys.executable, "-m", "zturbo", "serve-batch", "encode", str(model), "-i", str(spec), "-o", str(out),
            "--quiet", "--size", "32", *args]


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


@pytest.mark.parametrize("engine,fmt", [("native", "webdataset"), ("native", "zturbo"), ("ray", "webdataset"),
                                        ("ray", "zturbo")])
def test_sigkill_then_rerun_gives_every_sample_once_and_the_same_bits(tiny_model, tmp_path, engine, fmt, request):
    make_tar_shards(tmp_path / "in", 8, 6, caption=False)
    spec = tmp_path / "in" / "{000000..000007}.tar"
    args = ["-b", "2", "--shard-size", "4", "--output-format", fmt, "--engine", engine]
    if engine == "ray":
        args += ["--ray-address", request.getfixturevalue("ray_cluster")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert subprocess.run(_encode_cmd(tiny_model, spec, full, *args), env=env, capture_output=True,
                          timeout=300, check=False).returncode == 0

    proc = subprocess.Popen(_encode_cmd(tiny_model, spec, killed, *args), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    pattern = "*.tar" if fmt == "webdataset" else "*.safetensors"
    _kill_when(proc, lambda: len([p for p in (killed / "shards").glob(pattern) if not p.name.startswith(".")]) >= 2)
    partial = len([p for p in (killed / "shards").glob(pattern) if not p.name.startswith(".")])
    assert partial >= 2

    rerun = subprocess.run(_encode_cmd(tiny_model, spec, killed, *args, "--json"), env=env, capture_output=True,
                           text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads((killed / "report.json").read_text())
    assert report["already_done"] > 0 and report["already_done"] + report["processed"] == 48
    a, b = _latents(full), _latents(killed)
    assert len(b) == 48 and a.keys() == b.keys()  # every sample once: read_latent_index lists each entry
    if fmt == "zturbo":
        assert len({e.source for e in read_latent_index(killed).entries}) == len(read_latent_index(killed).entries)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the uninterrupted run
    assert not list((killed / "shards").glob(".*"))  # no temp file left


def test_training_from_shards_resumes_bit_exact_after_sigkill(tiny_config, tmp_path):
    from zturbo.model.diffusers import read_weights

    make_tar_shards(tmp_path / "s", 4, 3, size=(48, 40))
    data = tmp_path / "s" / "{000000..000003}.tar"

    def cmd(output: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "zturbo", *train_argv(tiny_config, data, output), "--max-steps", "14",
                "--checkpoint-every", "3", "--quiet", *extra]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = subprocess_env()
    proc = subprocess.Popen(cmd(killed), env=env, stderr=subprocess.PIPE)
    _kill_when(proc, lambda: (killed / "checkpoints" / "step-3").is_dir())
    assert not (killed / "final").exists()
    ref = subprocess.Popen(cmd(straight), env=env, stderr=subprocess.PIPE)
    resumed = subprocess.run(cmd(killed, "--resume", "auto"), env=env, capture_output=True, text=True, timeout=300,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()
    for part in ("model", "ema"):
        a = read_weights(straight / "checkpoints" / "step-14" / part)
        b = read_weights(killed / "checkpoints" / "step-14" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{part} differs after resume"
