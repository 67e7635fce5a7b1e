"""serve-batch across processes: exactly-once after SIGKILL, torchrun ranks, the serve benchmark script."""

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
from serve_helpers import encode_folder, index_entries, shard_latents

from zturbo.serve import load_index, store

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_compute_thread")]

REPO = Path(__file__).resolve().parents[2]


def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_index(tiny_model, photos, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = ["--size", "32", "-b", "2", "--shard-size", "2"]
    assert encode_folder(tiny_model, photos, full, *args) == 0

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "zturbo", "serve-batch", "encode", str(tiny_model), "-i", str(photos),
           "-o", str(killed), "--quiet", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((killed / "shards").glob("*.safetensors"))) >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    partial = store.scan_shards(killed).sources
    assert 0 < len(partial) < 40 and not (killed / "index.json").exists()

    assert encode_folder(tiny_model, photos, killed, *args, "--json") == 0
    report = json.loads((killed / "report.json").read_text())
    assert report["already_done"] == len(partial) and report["processed"] == 40 - len(partial)

    a, b = load_index(full / "index.json"), load_index(killed / "index.json")
    assert index_entries(a) == index_entries(b) and len(b["entries"]) == 40
    assert [e["source"] for e in b["entries"]] == sorted({e["source"] for e in b["entries"]})  # no duplicates
    la, lb = shard_latents(full), shard_latents(killed)
    assert all(torch.allclose(la[k], lb[k], atol=1e-5) for k in la)
    assert not list((killed / "shards").glob(".*"))  # leftover temp files cleaned


def test_torchrun_ranks_split_the_work_and_rank0_merges(tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "zturbo",
           "serve-batch", "encode", str(tiny_model), "-i", str(photos), "-o", str(out), "--size", "32",
           "--quiet"]
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300, check=False).returncode == 0
    shards = {p.name.split("-")[1] for p in (out / "shards").glob("*.safetensors")}
    assert shards == {"r0of2", "r1of2"}  # both ranks wrote their own part
    index = load_index(out / "index.json")
    assert index["count"] == 40 and len({e["source"] for e in index["entries"]}) == 40


@pytest.mark.parametrize("op", ["encode", "decode"])
def test_serve_benchmark_runs_and_reports_its_ratios(op, tmp_path):
    """benchmarks/bench_serve.py at toy size: every variant runs on the same items and the JSON holds the ratios."""
    out = tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_serve.py"), "--op", op, "--images", "20", "--repeats",
           "1", "--size", "16", "--json", str(out)]  # run as documented: the script's folder on sys.path
    subprocess.run(cmd, env=env, capture_output=True, timeout=300, check=True)
    saved = json.loads(out.read_text())
    assert saved["op"] == op and saved["images"] == 20
    assert len(saved["runs"]["compute"]) == 2 and len(saved["runs"]["end_to_end"]) == 1
    ratio = saved["end_to_end_vs_compute"]
    assert ratio == pytest.approx(saved["runs"]["end_to_end"][0] * 2 / sum(saved["runs"]["compute"]), rel=2e-3)
    assert 0 < ratio < 5 and saved["end_to_end_vs_naive"] > 0
    assert saved["pipeline_seconds"]["compute"] > 0

