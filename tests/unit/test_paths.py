"""Paths from data stay inside their folder: zturbo.paths, and decode's image writer under hostile names."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zturbo.errors import InputError
from zturbo.paths import (
    MAX_COMPONENT_BYTES,
    MAX_NAME_BYTES,
    check_output_folder,
    ensure_output_folder,
    inside,
    publish_new,
    resolve_inside,
    safe_name,
    unique_names,
)
from zturbo.serve.latents import LatentItem, assign_names
from zturbo.serve.writers import ImageWriter


@pytest.mark.parametrize(
    "key, name",
    [
        ("a/b.png", "a/b.png"),
        ("../src/a.png", "src/a.png"),
        ("../../x.png", "x.png"),
        ("/abs/path/b.png", "abs/path/b.png"),
        ("C:\\photos\\..\\c.png", "photos/c.png"),
        ("./a//b/./c", "a/b/c"),
        ("bad\x00name\n.png", "bad_name_.png"),
        ("été/名前.png", "été/名前.png"),
    ],
)
def test_safe_name_re_roots_every_escape(key, name):
    assert safe_name(key) == name


def test_safe_name_of_nothing_and_of_long_names_stays_distinct():
    assert safe_name("..") != safe_name("/") and safe_name("..").startswith("unnamed~")
    long_a, long_b = "a" * 300 + "1", "a" * 300 + "2"
    assert safe_name(long_a) != safe_name(long_b)
    assert all(len(p.encode()) <= MAX_COMPONENT_BYTES for p in safe_name(long_a).split("/"))
    deep = "/".join(["d" * 150] * 20)
    assert len(safe_name(deep).encode()) <= MAX_NAME_BYTES + MAX_COMPONENT_BYTES
    assert len(safe_name("é" * 200).encode()) <= MAX_COMPONENT_BYTES  # cut on a character boundary
    safe_name("é" * 200).encode("utf-8")


def test_unique_names_keep_the_first_and_number_the_rest():
    assert unique_names(["a", "b", "a", "A", "a~2"]) == ["a", "b", "a~3", "A~4", "a~2"]


def test_colliding_latent_names_get_their_extension_then_a_counter(tmp_path):
    items = [LatentItem(key, tmp_path / "f", "t", None, (4, 2, 2), suffix=ext)
             for key, ext in [("a", "jpg"), ("a", "png"), ("../x/p", "png"), ("x/p", "png"), ("b", "png")]]
    names = [it.name for it in assign_names(items)]
    assert names == ["a_jpg", "a_png", "x/p_png", "x/p_png~2", "b"]


def test_resolve_inside_refuses_absolute_parent_and_symlinked_paths(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    assert resolve_inside(root, "sub/x.safetensors", "index") == (root / "sub/x.safetensors").resolve()
    for rel in ("/etc/passwd", "../outside/x", "sub/../../outside/x", "link/x", "", "a\x00b"):
        with pytest.raises(InputError, match="index"):
            resolve_inside(root, rel, "index")


def test_publish_new_never_replaces_what_exists(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"original")
    tmp = tmp_path / ".a.tmp"
    tmp.write_bytes(b"new")
    assert publish_new(tmp, target) is False
    assert target.read_bytes() == b"original" and not tmp.exists()
    link = tmp_path / "dangling.png"
    link.symlink_to(tmp_path / "nowhere.png")
    tmp.write_bytes(b"new")
    assert publish_new(tmp, link) is False and not (tmp_path / "nowhere.png").exists()
    tmp.write_bytes(b"new")
    assert publish_new(tmp, tmp_path / "fresh.png") is True
    assert (tmp_path / "fresh.png").read_bytes() == b"new" and not tmp.exists()


def test_output_folder_checks_name_the_path(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    with pytest.raises(InputError, match=r"--out .*file is a file, not a folder"):
        check_output_folder(tmp_path / "file", "--out")
    with pytest.raises(InputError, match=r"dangling is a symlink to .*missing, which does not exist"):
        ensure_output_folder(tmp_path / "dangling")
    with pytest.raises(InputError, match="is not a folder"):
        ensure_output_folder(tmp_path / "file" / "sub")
    assert ensure_output_folder(tmp_path / "new" / "deep").is_dir()


# ---------------------------------------------------------------------------------------------------------
# The property: whatever the names, decode's writer creates nothing outside the output folder.

_PARTS = st.sampled_from(["..", ".", "", "/", "\\", "C:", "link", "a", "b.png", "été", "名前", "\x00", "\n",
                          "x" * 260, "link/..", "~2"])
_HOSTILE = st.one_of(
    st.lists(_PARTS, min_size=1, max_size=8).map("/".join),
    st.lists(_PARTS, min_size=1, max_size=4).map("\\".join),
    st.text(min_size=0, max_size=80),
    st.builds(lambda a, b: f"/{a}/{b}", st.text(max_size=20), st.text(max_size=20)),
)


def _tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (links not followed): files by content, links by target."""
    found: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = f"-> {os.readlink(path)}"
            elif path.is_file():
                found[rel] = path.read_bytes()
            else:
                found[rel] = "dir"
    return found


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys=st.lists(_HOSTILE, min_size=1, max_size=6))
def test_hostile_names_never_write_outside_the_output_folder(keys):
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = Path(tmp)
        out, outside = sandbox / "out", sandbox / "outside"
        (outside / "a").mkdir(parents=True)
        (outside / "b.png").write_bytes(b"precious")
        out.mkdir()
        (out / "link").symlink_to(outside)  # a symlinked folder inside the output
        before = {k: v for k, v in _tree(sandbox).items() if not k.startswith("out/")}
        items = assign_names([LatentItem(k, sandbox / "f", "t", None, (4, 1, 1), suffix="png") for k in keys])
        writer = ImageWriter(out, "png", 90, 1, items, restore_size=False)
        failures = [writer._save(np.zeros((2, 2, 3), np.uint8), it.name, None) for it in items]
        writer.pool.shutdown()
        after = {k: v for k, v in _tree(sandbox).items() if not k.startswith("out/")}
        assert after == before
        for it, failure in zip(items, failures):
            path = out / f"{it.name}.png"
            if failure is None:
                assert path.is_file() and inside(path, out)
            else:
                assert failure.reason in ("outside-output", "unwritable")
