"""`zturbo prepare`: modes, orientation, bad input, splits, incremental runs (SIGKILL resume: tests/e2e)."""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prepare_helpers import manifest, noise, output_tree, prepare_json, smooth, temp_files, write_images

from zturbo.cli import run
from zturbo.config import PrepareConfig
from zturbo.data.prepare import prepare_dataset, prepared_images
from zturbo.data.prepare_image import TMP_SUFFIX
from zturbo.data.prepare_pool import run_tasks

# ---------------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def shared_tmp():
    """A temp folder every user can reach (pytest's own is private to root when tests run as root)."""
    import shutil

    path = Path(tempfile.mkdtemp(prefix="zturbo-prepare-"))
    os.chmod(path, 0o777)
    try:
        yield path
    finally:
        for p in path.rglob("*"):
            with contextlib.suppress(OSError):
                if not p.is_symlink():
                    os.chmod(p, 0o755)
        shutil.rmtree(path, ignore_errors=True)


_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2  # linux/capability.h
_CAP_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _capabilities(libc, update=None):
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    if update is not None:
        data[0].effective = update
        if libc.capset(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "capset failed")
    return data[0].effective


@contextlib.contextmanager
def unprivileged():
    """Run the body without root's power to ignore file permissions.

    As root, this drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the thread's
    effective capabilities (restored afterwards) rather than switching to another
    user: the process stays the owner of the checkout, so a checkout in a folder no
    one else may read (a mode-700 home) still imports, while files the test makes
    unreadable or unwritable are refused as they would be to a normal user. Forked
    workers inherit the reduced set.
    """
    if os.geteuid() != 0:
        yield
        return
    if sys.platform != "linux":
        pytest.skip("dropping root's file-permission override needs Linux capabilities")
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        saved = _capabilities(libc)
        _capabilities(libc, saved & ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH)))
    except (OSError, AttributeError) as exc:
        pytest.skip(f"cannot drop root's file-permission override here ({exc})")
    try:
        yield
    finally:
        _capabilities(libc, saved)


# ---------------------------------------------------------------------------------------------------------
# pixels: modes, formats, orientation, resizing


def test_every_mode_and_format_becomes_8bit_rgb_at_size(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    base = smooth(80, 60)
    base.convert("1").save(src / "bilevel.png")
    base.convert("L").save(src / "gray.png")
    base.convert("LA").save(src / "gray_alpha.png")
    base.convert("P").save(src / "palette.png")
    transparent_p = base.convert("P")
    transparent_p.info["transparency"] = 0
    transparent_p.save(src / "palette_transparency.png")
    rgba = base.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: must come out white, not black
    rgba.save(src / "rgba.png")
    base.convert("CMYK").save(src / "cmyk.jpg")
    base.convert("CMYK").save(src / "cmyk.tif")
    Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257).save(src / "gray16.png")
    Image.fromarray(np.asarray(base.convert("L"), dtype=np.int32)).save(src / "int32.tif")
    Image.fromarray(np.asarray(base.convert("L"), dtype=np.float32) / 255.0).save(src / "float.tif")
    base.save(src / "plain.bmp")
    base.save(src / "plain.webp", quality=90)
    red, blue = Image.new("RGB", (80, 60), (255, 0, 0)), Image.new("RGB", (80, 60), (0, 0, 255))
    red.save(src / "anim.gif", save_all=True, append_images=[blue])

    rc, report = prepare_json(
        capsys, src, tmp_path / "out", "--size", "32", "--workers", "1", "--val-fraction", "0"
    )
    assert rc == 0
    assert report["outputs"] == 14 and report["skipped"] == {}
    modes = {}
    for line in manifest(tmp_path / "out"):
        with Image.open(tmp_path / "out" / line["output"]) as im:
            assert im.size == (32, 32) and im.mode == "RGB", line
            assert "transparency" not in im.info, line  # a tRNS key would make one colour see-through
            modes[line["source"]] = np.asarray(im)
        assert line["source_size"] == [80, 60]
    assert (modes["rgba.png"] == 255).all()
    first_frame = modes["anim.gif"].reshape(-1, 3).mean(0)
    assert first_frame[0] > 200 and first_frame[2] < 50  # the first frame (red), not the second
    assert modes["float.tif"].std() > 10 and modes["gray16.png"].std() > 10  # scaled, not clipped flat


def test_embedded_icc_profile_is_converted_to_srgb(tmp_path, capsys):
    import io as _io

    from PIL import ImageCms

    from zturbo.data import demo_dir

    adobe_icc = Image.open(demo_dir() / "rocket.jpg").info["icc_profile"]  # Adobe RGB (1998)
    src = tmp_path / "in"
    src.mkdir()
    color = (60, 140, 200)
    Image.new("RGB", (48, 48), color).save(src / "adobe.png", icc_profile=adobe_icc)
    expected = ImageCms.profileToProfile(
        Image.new("RGB", (1, 1), color),
        ImageCms.ImageCmsProfile(_io.BytesIO(adobe_icc)),
        ImageCms.createProfile("sRGB"),
        outputMode="RGB",
    ).getpixel((0, 0))
    assert max(abs(a - b) for a, b in zip(expected, color)) > 10  # the profile matters for this colour

    rc, _ = prepare_json(
        capsys, src, tmp_path / "out", "--size", "32", "--workers", "1", "--val-fraction", "0"
    )
    assert rc == 0
    out = Image.open(next((tmp_path / "out" / "train").iterdir()))
    assert max(abs(a - b) for a, b in zip(out.getpixel((16, 16)), expected)) <= 2
    assert "icc_profile" not in out.info  # pixels are sRGB now; nothing left to reinterpret


def test_exif_rotated_image_comes_out_upright(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    # Stored landscape: left half red, right half blue. Orientation 6 = rotate 90 degrees clockwise
    # to display, so the upright picture is red on top and blue below.
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[:, :32] = (255, 0, 0)
    stored[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(src / "phone.jpg", exif=exif.tobytes(), quality=95)

    rc, _ = prepare_json(
        capsys, src, tmp_path / "out", "--size", "32", "--workers", "1", "--val-fraction", "0"
    )
    assert rc == 0
    (line,) = manifest(tmp_path / "out")
    assert line["source_size"] == [48, 64]  # upright width x height
    arr = np.asarray(Image.open(tmp_path / "out" / line["output"])).astype(int)
    top_right, bottom_left = arr[1, 30], arr[30, 1]
    assert top_right[0] > 200 and top_right[2] < 60, top_right
    assert bottom_left[2] > 200 and bottom_left[0] < 60, bottom_left


@pytest.mark.parametrize("kind", ["jpeg-exif", "png-exif", "png-xmp", "tiff-tag", "webp-exif", "plain-jpeg", "plain-png"])
def test_orientation_is_applied_wherever_pillow_finds_it(tmp_path, kind):
    """open_image skips EXIF parsing only for images with nowhere to hold an orientation; every
    place Pillow reads one from (EXIF in JPEG/PNG/WebP, PNG XMP, TIFF tags) must still rotate."""
    from PIL import ImageOps

    from zturbo.data.images import open_image_sized

    stored = np.zeros((20, 30, 3), np.uint8)
    stored[:, :15] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / {"jpeg": "a.jpg", "png": "a.png", "tiff": "a.tif", "webp": "a.webp"}[kind.split("-")[-1] if kind.startswith("plain") else kind.split("-")[0]]
    im = Image.fromarray(stored)
    if kind in ("jpeg-exif", "png-exif", "webp-exif"):
        im.save(path, exif=exif.tobytes(), **({"lossless": True} if kind == "webp-exif" else {}))
    elif kind == "png-xmp":
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
        im.save(path, pnginfo=info)
    elif kind == "tiff-tag":
        im.save(path, tiffinfo={0x0112: 6})
    else:
        im.save(path)
    got, size = open_image_sized(path)
    with Image.open(path) as ref:
        ref.load()
        expected = ImageOps.exif_transpose(ref).convert("RGB")
    assert got.size == expected.size == size
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    assert got.size == ((30, 20) if kind.startswith("plain") else (20, 30))


def test_large_jpeg_fast_path_matches_full_decode_reference(tmp_path):
    """Draft (reduced DCT) decode + Image.reduce must not alias: compare with full decode + LANCZOS."""
    src = tmp_path / "in"
    src.mkdir()
    big = smooth(1600, 1200, seed=3)
    big.save(src / "big.jpg", quality=95)
    report = prepare_dataset(src, tmp_path / "out", PrepareConfig(size=96, workers=1, val_fraction=0))
    assert report.outputs == 1
    fast = np.asarray(Image.open(next((tmp_path / "out" / "train").iterdir()))).astype(float)
    with Image.open(src / "big.jpg") as im:
        im = im.convert("RGB")
        reference = im.resize((128, 96), Image.LANCZOS).crop((16, 0, 112, 96))
    mse = ((fast - np.asarray(reference).astype(float)) ** 2).mean()
    assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 35


def test_pad_mode_keeps_whole_image_with_black_bars(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (64, 32), (255, 255, 255)).save(src / "wide.png")
    Image.new("L", (32, 64), 255).save(src / "tall_gray.png")
    rc, _ = prepare_json(capsys, src, tmp_path / "out", "--size", "32", "--resize", "pad", "--workers", "1")
    assert rc == 0
    arr = np.asarray(Image.open(next((tmp_path / "out").rglob("wide_png.png"))))
    assert arr.shape == (32, 32, 3)
    assert (arr[:7] == 0).all() and (arr[-7:] == 0).all()  # bars above and below
    assert (arr[10:22] == 255).all()  # the whole width of the picture in the middle
    tall = np.asarray(Image.open(next((tmp_path / "out").rglob("tall_gray_png.png"))))
    assert tall.shape == (32, 32, 3)
    assert (tall[:, :7] == 0).all() and (tall[:, -7:] == 0).all() and (tall[:, 10:22] == 255).all()


def test_too_small_images_are_skipped_not_upscaled(tmp_path, capsys):
    src = tmp_path / "in"
    write_images(src, 1, size=(40, 40))
    write_images(src, 1, start=1, size=(12, 40))
    rc, report = prepare_json(capsys, src, tmp_path / "out", "--size", "32", "--workers", "1")
    assert rc == 0
    assert report["outputs"] == 1 and report["skipped"] == {"too-small": 1}
    assert report["skipped_files"][0]["source"] == "img001.png"


# ---------------------------------------------------------------------------------------------------------
# bad input never stops the run


def test_every_bad_input_is_skipped_counted_and_listed(shared_tmp, capsys):
    base = shared_tmp
    src = base / "in"
    good = write_images(src / "good", 3)
    sub = src / "bad"
    sub.mkdir()
    os.chmod(src, 0o755)
    os.chmod(sub, 0o755)
    os.chmod(src / "good", 0o755)
    jpeg = io.BytesIO()
    noise(64, 64).save(jpeg, "JPEG", quality=90)
    (sub / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    png = io.BytesIO()
    noise(64, 64).save(png, "PNG")
    damaged = bytearray(png.getvalue())
    damaged[200:600] = os.urandom(400)  # valid header, broken compressed pixels
    (sub / "damaged.png").write_bytes(bytes(damaged))
    (sub / "empty.jpg").write_bytes(b"")
    (sub / "notes.jpg").write_text("this is a text file with an image extension\n")
    noise(300, 300).save(sub / "bomb.png")  # over --max-pixels below
    secret = sub / "secret.png"
    smooth(64, 64).save(secret)
    os.chmod(secret, 0o000)
    (sub / "dangling.png").symlink_to(sub / "does-not-exist.png")
    (sub / "self.jpg").symlink_to(sub / "self.jpg")
    (sub / "up").symlink_to(src)  # a folder loop
    (src / "good" / "again.png").symlink_to(good[0])  # a valid symlink: read through it
    (src / "README.txt").write_text("not an image, ignored\n")

    out = base / "out"
    capsys.readouterr()
    with unprivileged():
        rc = run(
            [
                "prepare",
                str(src),
                str(out),
                "--size",
                "32",
                "--workers",
                "1",
                "--max-pixels",
                "20000",
                "--json",
            ]
        )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    assert report["skipped"] == {
        "broken-symlink": 1,
        "corrupt": 2,
        "empty": 1,
        "not-an-image": 1,
        "symlink-loop": 2,
        "too-large": 1,
        "unreadable": 1,
    }
    by_source = {s["source"]: s["reason"] for s in report["skipped_files"]}
    assert by_source["bad/truncated.jpg"] == "corrupt" and by_source["bad/secret.png"] == "unreadable"
    assert by_source["bad/up"] == "symlink-loop" and by_source["bad/self.jpg"] == "symlink-loop"
    assert report["outputs"] == 4 and report["seen"] == 13 and report["duplicates"] == 1
    assert "skipped 9 of 13 files" in captured.err and "warning" in captured.err
    on_disk = json.loads((out / "prepare-report.json").read_text())
    assert on_disk["skipped_files"] == report["skipped_files"]
    assert not temp_files(out)


def test_decompression_bomb_is_refused_from_its_header(tmp_path, capsys):
    """A 100k x 100k PNG in a few hundred bytes: refused at the default limit before any decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )
    src = tmp_path / "in"
    write_images(src, 1)
    (src / "bomb.png").write_bytes(bomb)
    rc, report = prepare_json(capsys, src, tmp_path / "out", "--size", "32", "--workers", "1")
    assert rc == 0 and report["skipped"] == {"too-large": 1} and report["outputs"] == 1


def test_worker_crash_is_isolated_to_its_file(tmp_path):
    tasks = [(str(i), f"file{i}.png") for i in range(6)]
    results = []
    run_tasks(tasks, 2, 10**8, results.append, fn=_crash_on_three)
    by_source = {r["source"]: r for r in results}
    assert len(results) == 6
    assert by_source["file3.png"]["reason"] == "worker-crash"
    assert all(by_source[f"file{i}.png"]["status"] == "written" for i in (0, 1, 2, 4, 5))


def _crash_on_three(path: str, rel: str) -> dict:
    if path == "3":
        os._exit(1)  # what a segfaulting decoder looks like to the pool
    return {"source": rel, "status": "written"}


# ---------------------------------------------------------------------------------------------------------
# refusals: the few cases that stop the run


def test_missing_input_output_inside_input_and_nothing_usable_fail_clearly(tmp_path, capsys):
    assert run(["prepare", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err

    src = tmp_path / "in"
    write_images(src, 1)
    assert run(["prepare", str(src), str(src / "prepared"), "--size", "32"]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert not (src / "prepared").exists()

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_text("no")
    assert run(["prepare", str(junk), str(tmp_path / "out2"), "--size", "32", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no usable images" in err and "1 not-an-image" in err
    assert json.loads((tmp_path / "out2" / "prepare-report.json").read_text())["skipped"] == {
        "not-an-image": 1
    }

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(["prepare", str(empty), str(tmp_path / "out3"), "--size", "32"]) == 2
    assert "no image files found" in capsys.readouterr().err


def test_unwritable_output_fails_clearly(shared_tmp, capsys):
    base = shared_tmp
    src = base / "in"
    write_images(src, 1)
    locked = base / "locked"
    locked.mkdir(mode=0o555)
    os.chmod(src, 0o755)
    with unprivileged():
        rc = run(["prepare", str(src), str(locked / "out"), "--size", "32"])
    assert rc == 2
    assert "cannot create output folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# splits, incremental runs, dedupe


def test_split_is_stable_when_images_are_added_and_reruns_skip_done_work(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    write_images(src, 24)
    rc, first = prepare_json(capsys, src, out, "--size", "32", "--val-fraction", "0.3", "--workers", "1")
    assert rc == 0 and first["written"] == 24 and 0 < first["val"] < 24
    before = {m["source"]: (m["split"], m["output"]) for m in manifest(out)}
    assert all(out.joinpath(o).is_file() and o.startswith(f"{s}/") for s, o in before.values())

    write_images(src, 12, start=24)
    rc, second = prepare_json(capsys, src, out, "--size", "32", "--val-fraction", "0.3", "--workers", "1")
    assert rc == 0 and second["written"] == 12 and second["up_to_date"] == 24
    after = {m["source"]: (m["split"], m["output"]) for m in manifest(out)}
    assert {k: after[k] for k in before} == before
    assert len(after) == 36 and second["val"] > first["val"]

    rc, third = prepare_json(capsys, src, out, "--size", "32", "--val-fraction", "0.3", "--workers", "1")
    assert third["written"] == 0 and third["up_to_date"] == 36

    val = prepared_images(out, "val")
    assert len(val) == third["val"] and all(p.is_file() and p.parent.name == "val" for p in val)
    assert len(prepared_images(out)) == third["train"]


def test_changes_in_input_and_settings_converge_to_a_clean_run(tmp_path, capsys):
    src, out, clean = tmp_path / "in", tmp_path / "out", tmp_path / "clean"
    paths = write_images(src / "a", 6)
    args = ["--size", "32", "--val-fraction", "0.3", "--workers", "1"]
    assert prepare_json(capsys, src, out, *args)[0] == 0
    paths[0].unlink()  # a source disappears
    smooth(64, 48, seed=99).save(paths[1])  # a source changes in place
    os.utime(paths[1], ns=(time.time_ns(), time.time_ns() + 10**9))
    rc, report = prepare_json(capsys, src, out, *args, "--format", "webp", "--val-fraction", "0.5")
    assert rc == 0 and report["written"] == 5 and report["removed"] == 6
    assert prepare_json(capsys, src, clean, *args, "--format", "webp", "--val-fraction", "0.5")[0] == 0
    assert output_tree(out) == output_tree(clean)

    rc, report = prepare_json(capsys, src, out, *args)  # back to png, split moves without re-encoding...
    assert rc == 0 and report["written"] == 5
    rc, report = prepare_json(capsys, src, out, "--size", "32", "--val-fraction", "0.0", "--workers", "1")
    assert rc == 0 and report["written"] == 0 and report["val"] == 0  # ...only renames


def test_dedupe_drops_exact_duplicates_by_content(tmp_path, capsys):
    src = tmp_path / "in"
    paths = write_images(src, 3)
    (src / "copies").mkdir()
    (src / "copies" / "dup.png").write_bytes(paths[1].read_bytes())
    (src / "zz_dup.png").write_bytes(paths[1].read_bytes())
    rc, kept = prepare_json(capsys, src, tmp_path / "keep", "--size", "32", "--workers", "1")
    assert rc == 0 and kept["outputs"] == 5 and kept["duplicates"] == 2
    rc, dropped = prepare_json(capsys, src, tmp_path / "dd", "--size", "32", "--workers", "1", "--dedupe")
    assert rc == 0 and dropped["outputs"] == 3 and dropped["duplicates"] == 2
    # the first source in path order owns the content
    assert {d["source"]: d["of"] for d in dropped["duplicate_files"]} == {
        "img001.png": "copies/dup.png",
        "zz_dup.png": "copies/dup.png",
    }
    assert sorted(m["source"] for m in manifest(tmp_path / "dd")) == [
        "copies/dup.png",
        "img000.png",
        "img002.png",
    ]
    # dropping the owner hands its role to the next copy on the next run
    (src / "copies" / "dup.png").unlink()
    rc, again = prepare_json(capsys, src, tmp_path / "dd", "--size", "32", "--workers", "1", "--dedupe")
    assert rc == 0 and again["outputs"] == 3 and again["written"] == 1
    assert "img001.png" in {m["source"] for m in manifest(tmp_path / "dd")}


# ---------------------------------------------------------------------------------------------------------
# leftovers


def test_leftover_temp_files_are_removed(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    write_images(src, 2)
    (out / "train").mkdir(parents=True)
    stale = out / "train" / f".img000_png.png.abc123{TMP_SUFFIX}"
    stale.write_bytes(b"half an image")
    assert prepare_json(capsys, src, out, "--size", "32", "--workers", "1")[0] == 0
    assert not stale.exists() and not temp_files(out)


# ---------------------------------------------------------------------------------------------------------
# CLI: seed spellings, demo, parallel


def test_seed_spellings_and_parallel_workers(tmp_path, capsys):
    src, out = tmp_path / "raw", tmp_path / "train"
    write_images(src, 6)
    capsys.readouterr()
    rc = run(
        [
            "prepare",
            "--mode",
            "preprocess",
            "--input_dir",
            str(src),
            "--output_dir",
            str(out),
            "--target_size",
            "32",
            "--workers",
            "2",
        ]
    )
    assert rc == 0
    summary = capsys.readouterr().out
    assert "written this run" in summary
    outs = sorted((out / "train").glob("*.png")) + sorted((out / "val").glob("*.png"))
    assert len(outs) == 6 and all(Image.open(p).size == (32, 32) for p in outs)


def test_demo_prepares_the_bundled_photos(tmp_path, capsys):
    from zturbo.data import demo_images

    rc, report = prepare_json(capsys, "--demo", tmp_path / "demo", "--size", "32", "--workers", "1")
    assert rc == 0 and report["outputs"] == len(demo_images()) and report["skipped"] == {}
    assert (tmp_path / "demo" / "SOURCES.md").is_file()
    rc, report = prepare_json(capsys, "--demo", tmp_path / "demo128", "--workers", "1")
    assert rc == 0 and report["size"] == 128  # the demo profile's image size
