"""`zturbo prepare` in child processes: exact resume after SIGKILL, and the output lock held by another process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from prepare_helpers import noise, output_tree, temp_files, write_images

from zturbo.cli import run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_resume_after_sigkill_gives_same_outputs_and_manifest_as_clean_run(tmp_path):
    src, out, clean = tmp_path / "in", tmp_path / "out", tmp_path / "clean"
    src.mkdir()
    total = 60  # enough work that the kill lands mid-run even on a fast machine
    for i in range(total):
        noise(640, 480, seed=i).save(src / f"p{i:02d}.jpg", quality=90)
    cmd = [
        sys.executable,
        "-m",
        "zturbo",
        "prepare",
        str(src),
        str(out),
        "--size",
        "48",
        "--workers",
        "2",
        "--val-fraction",
        "0.25",
        "--quiet",
    ]
    journal = out / ".prepare" / "state.jsonl"
    proc = subprocess.Popen(
        cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and journal.read_text().count("\n") >= 3:
                break
            time.sleep(0.005)
    finally:
        proc.kill()  # SIGKILL to the main process only, mid-flight, as the OOM killer would
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    # its orphaned workers notice and exit on their own
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("worker processes outlived the killed prepare")
    assert not (out / "manifest.jsonl").exists(), "the run finished before it could be killed"
    done_before = journal.read_text().count("\n")
    assert 3 <= done_before < total
    for p in (out / "train").rglob("*.png"):  # whatever is in place is a complete image
        Image.open(p).load()

    assert (
        run(["prepare", str(src), str(out), "--size", "48", "--workers", "2", "--val-fraction", "0.25", "-q"])
        == 0
    )
    assert (
        run(
            [
                "prepare",
                str(src),
                str(clean),
                "--size",
                "48",
                "--workers",
                "2",
                "--val-fraction",
                "0.25",
                "-q",
            ]
        )
        == 0
    )
    resumed_report = json.loads((out / "prepare-report.json").read_text())
    assert resumed_report["up_to_date"] == done_before and resumed_report["outputs"] == total
    assert output_tree(out) == output_tree(clean)
    assert (out / "manifest.jsonl").read_bytes() == (clean / "manifest.jsonl").read_bytes()
    assert not temp_files(out) and not temp_files(clean)


def test_a_second_run_on_the_same_output_is_refused(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    write_images(src, 1)
    (out / ".prepare").mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"
            ),
            str(out / ".prepare" / "lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run(["prepare", str(src), str(out), "--size", "32", "--workers", "1"]) == 2
        assert "another zturbo prepare" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert run(["prepare", str(src), str(out), "--size", "32", "--workers", "1", "-q"]) == 0

