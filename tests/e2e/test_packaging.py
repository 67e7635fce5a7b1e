"""The wheel carries what an installed zturbo needs: profiles, demo photos, attribution."""

import subprocess
import sys
import zipfile

import pytest

pytestmark = pytest.mark.slow


def test_wheel_contains_package_data(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"wheel build tooling missing: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("zturbo-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for profile in ("ultrafast", "fast", "highres", "ultra", "standard", "demo"):
        assert f"zturbo/profiles/{profile}.toml" in names
    demo = [n for n in names if n.startswith("zturbo/data/demo/") and n.endswith((".png", ".jpg"))]
    assert len(demo) == 15 and "zturbo/data/demo/SOURCES.md" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "zturbo = zturbo.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
