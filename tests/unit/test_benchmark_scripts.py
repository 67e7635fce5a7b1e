"""Every benchmark script starts: its imports resolve against the package as it is now.

The scripts are run by hand, not by the suite, so a renamed function would otherwise go
unnoticed until someone reruns a figure. ``--help`` imports everything and parses nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[2] / "benchmarks").glob("bench_*.py"))


@pytest.mark.slow  # one interpreter start (torch import) per script
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_script_imports_and_parses_help(script, tmp_path):
    done = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_every_benchmark_script_is_found():
    assert len(SCRIPTS) >= 10, SCRIPTS
