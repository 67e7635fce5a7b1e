"""Image and report helpers shared by the `zturbo prepare` tests in tests/unit and tests/e2e."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from zturbo.cli import run
from zturbo.data.prepare_image import TMP_SUFFIX


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def smooth(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB").resize(
        (w, h), Image.BICUBIC
    )


def write_images(folder: Path, count: int, start: int = 0, size=(64, 48)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        p = folder / f"img{i:03d}.png"
        smooth(*size, seed=i).save(p)
        paths.append(p)
    return paths


def prepare_json(capsys, *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    rc = run(["prepare", *map(str, args), "--json", "--quiet"])
    out = capsys.readouterr().out
    return rc, (json.loads(out) if rc == 0 else {})


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def output_tree(out: Path) -> dict[str, bytes]:
    """Every prepared file and the manifest, by relative path (not the report or the journal)."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and not rel.startswith(".prepare/") and rel != "prepare-report.json":
            files[rel] = p.read_bytes()
    return files


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(TMP_SUFFIX)]

