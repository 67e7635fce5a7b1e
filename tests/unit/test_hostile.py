"""A careful user, then a hostile file: every case ends in work done, or in one line and a clean exit.

Paths read from data stay inside their folder, decode never writes outside --output nor over
an input, non-finite images fail instead of turning black, and bad inputs name the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from train_helpers import TINY as TRAIN_TINY
from train_helpers import write_demo_photos

from zturbo.backends.torch_backend import TorchBackend
from zturbo.cli import run
from zturbo.config import EvalConfig
from zturbo.eval import evaluate
from zturbo.serve import load_index

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_clean_line(err: str, *names: str) -> None:
    """A single error line (plus its hint) that names what is wrong; never a traceback."""
    assert "Traceback" not in err and "unexpected" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for name in names:
        assert name in err, (name, err)


def _digests(root: Path) -> dict[str, str]:
    """Every file under ``root`` by its content's hash (links by their target)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = f"-> {os.readlink(path)}"
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _sources(root: Path) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, fmt in (("a.png", "PNG"), ("b.jpg", "JPEG"), ("c.png", "PNG")):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / name, format=fmt)
    return root


@pytest.fixture(scope="module")
def latents(tiny_model, tmp_path_factory) -> Path:
    """An encode output of three sources."""
    root = tmp_path_factory.mktemp("latents")
    src = _sources(root / "src")
    out = root / "lat"
    assert run(["serve-batch", "encode", str(tiny_model), "-i", str(src), "-o", str(out), "--size", "32", "-q"]) == 0
    return out


# ---------------------------------------------------------------------------------------------------------
# Decode writes inside --output, never over a source


def test_manifest_paths_outside_its_folder_never_touch_the_sources(tiny_model, tmp_path, capsys):
    """The data loss: a manifest listing ../src/a.png made decode overwrite the user's photo with its
    reconstruction. Relative and absolute manifest paths both decode into --output, re-rooted."""
    src = _sources(tmp_path / "src")
    (tmp_path / "man").mkdir()
    manifest = tmp_path / "man" / "list.txt"
    manifest.write_text(f"../src/a.png\n../src/b.jpg\n{(src / 'c.png').resolve()}\n")
    before = _digests(tmp_path)
    code, _, err = _cli(capsys, "serve-batch", "encode", tiny_model, "-i", manifest, "-o", tmp_path / "lat",
                        "--size", "32", "-q")
    assert code == 0, err
    code, _, err = _cli(capsys, "serve-batch", "decode", tiny_model, "-i", tmp_path / "lat", "-o", tmp_path / "dec",
                        "-q")
    assert code == 0, err
    after = _digests(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(("lat/", "dec/"))} == before
    absolute = (src / "c.png").resolve().relative_to("/").with_suffix(".png").as_posix()
    assert sorted(_digests(tmp_path / "dec")) == sorted(["src/a.png", "src/b.png", absolute])


def test_hostile_source_names_in_an_index_or_shard_metadata_stay_inside(tiny_model, latents, tmp_path, capsys):
    work = tmp_path / "work"
    shutil.copytree(latents, work / "lat")
    index = json.loads((work / "lat" / "index.json").read_text())
    index["entries"][0]["source"] = "../../x.png"
    index["entries"][1]["source"] = str(tmp_path / "victim.png")
    (work / "lat" / "index.json").write_text(json.dumps(index))
    (tmp_path / "victim.png").write_bytes(b"precious")
    (work / "dec").mkdir()
    (work / "dec" / "link").symlink_to(tmp_path)  # a symlinked folder inside --output
    index["entries"][2]["source"] = "link/y.png"
    (work / "lat" / "index.json").write_text(json.dumps(index))
    # A standalone shard whose metadata names its sources ../../m.png and /abs/n.png.
    shard = work / "lat" / index["entries"][0]["shard"]
    with safe_open(str(shard), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = json.loads(fh.metadata()["zturbo"])
    meta["entries"][0]["source"], meta["entries"][1]["source"] = "../../m.png", "/abs/n.png"
    (work / "one").mkdir()
    save_file(tensors, str(work / "one" / "shard.safetensors"), metadata={"zturbo": json.dumps(meta)})

    def outside_dec(found: dict) -> dict:
        return {k: v for k, v in found.items() if not k.startswith("work/dec")}

    before = _digests(tmp_path)
    code, out, err = _cli(capsys, "serve-batch", "decode", tiny_model, "-i", work / "lat", "-o", work / "dec",
                          "--json")
    assert outside_dec(_digests(tmp_path)) == outside_dec(before)
    written = sorted(p.relative_to(work / "dec").as_posix() for p in (work / "dec").rglob("*.png"))
    assert written == [str(tmp_path / "victim.png").lstrip("/"), "x.png"]
    report = json.loads(out)
    assert code == 1 and [f["reason"] for f in report["failures"]] == ["outside-output"]  # link/y.png
    assert "1 image(s) failed" in err and "Traceback" not in err

    code, _, err = _cli(capsys, "serve-batch", "decode", tiny_model, "-i", work / "one" / "shard.safetensors",
                        "-o", work / "single", "-q")
    assert code == 0, err
    new = set(outside_dec(_digests(tmp_path))) - set(outside_dec(before))
    assert {"work/single/m.png", "work/single/abs/n.png"} <= new and all(k.startswith("work/single/") for k in new)


def test_hostile_tensor_names_in_a_plain_safetensors_file_stay_inside(tiny_model, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    save_file({"../../escape": torch.randn(4, 4, 4), "/abs": torch.randn(4, 4, 4)}, str(tmp_path / "in" / "z.safetensors"))
    code, _, err = _cli(capsys, "serve-batch", "decode", tiny_model, "-i", tmp_path / "in", "-o", tmp_path / "out", "-q")
    assert code == 0, err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == [
        "out/z/abs.png", "out/z/escape.png"]


def test_sources_differing_only_in_extension_decode_to_distinct_names(tiny_model, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(src / "a.png")
    Image.new("RGB", (32, 32), (10, 200, 10)).save(src / "a.jpg")
    assert _cli(capsys, "serve-batch", "encode", tiny_model, "-i", src, "-o", tmp_path / "lat", "--size", "32",
                "-q")[0] == 0
    (tmp_path / "dec").mkdir()
    (tmp_path / "dec" / "a_png.png").write_bytes(b"already here")  # never replaced: counted as done
    code, out, _ = _cli(capsys, "serve-batch", "decode", tiny_model, "-i", tmp_path / "lat", "-o", tmp_path / "dec",
                        "--json")
    assert code == 0 and json.loads(out)["already_done"] == 1
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == ["a_jpg.png", "a_png.png"]
    assert (tmp_path / "dec" / "a_png.png").read_bytes() == b"already here"


def test_a_full_disk_during_decode_stops_cleanly_and_keeps_whole_images(tiny_model, latents, tmp_path, capsys,
                                                                          monkeypatch):
    import errno

    save = Image.Image.save
    calls = {"n": 0}

    def save_then_fill_disk(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:
            Path(fp).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_fill_disk)
    code, _, err = _cli(capsys, "serve-batch", "decode", tiny_model, "-i", latents, "-o", tmp_path / "dec", "-q",
                        "-b", "1")
    assert code == 1 and "no space left" in err and "Traceback" not in err
    left = sorted(p.name for p in (tmp_path / "dec").iterdir())
    assert len(left) == 1 and not left[0].startswith(".")  # one whole image, no temp file
    monkeypatch.setattr(Image.Image, "save", save)
    assert _cli(capsys, "serve-batch", "decode", tiny_model, "-i", latents, "-o", tmp_path / "dec", "-q")[0] == 0
    assert len(list((tmp_path / "dec").iterdir())) == 3


# ---------------------------------------------------------------------------------------------------------
# Bad latent inputs: one line naming the file, exit 2


def _truncate_first_shard(index: dict, lat: Path) -> None:
    shard = lat / index["entries"][0]["shard"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 40])


@pytest.mark.parametrize("case, change, expect", [
    ("shard-escape", lambda idx, lat: idx["entries"][0].update(shard="../../../../etc/passwd"), "etc/passwd"),
    ("shard-outside", lambda idx, lat: idx["entries"][0].update(shard="../other/x.safetensors"), "points outside"),
    ("shard-absolute", lambda idx, lat: idx["entries"][0].update(shard="/tmp/x.safetensors"), "absolute"),
    ("missing-key", lambda idx, lat: idx["entries"][0].pop("tensor"), "lacks the key 'tensor'"),
    ("bad-shape", lambda idx, lat: idx["entries"][0].update(shape=[4, "x"]), "malformed entry"),
    ("not-a-list", lambda idx, lat: idx.update(entries={"a": 1}), "not a list"),
    ("wrong-tensor", lambda idx, lat: idx["entries"][0].update(tensor="999999"), "'999999'"),
    ("truncated", _truncate_first_shard, "cannot read shard"),
])
def test_bad_latent_inputs_fail_in_one_line(tiny_model, latents, tmp_path, capsys, case, change, expect):
    lat = tmp_path / "lat"
    shutil.copytree(latents, lat)
    index = json.loads((lat / "index.json").read_text())
    change(index, lat)
    (lat / "index.json").write_text(json.dumps(index))
    code, _, err = _cli(capsys, "serve-batch", "decode", tiny_model, "-i", lat, "-o", tmp_path / "dec", "-q")
    assert code == 2
    _one_clean_line(err, expect, str(lat))
    assert not (tmp_path / "dec").exists()


def test_non_finite_latents_and_outputs_fail_and_write_nothing(tiny_model, tmp_path, capsys):
    """NaN, inf and a latent scaled x1e30 decoded to black PNGs with exit 0; now each fails, with its reason."""
    src = tmp_path / "z"
    src.mkdir()
    z = np.random.default_rng(0).standard_normal((4, 8, 8)).astype(np.float32)
    np.save(src / "ok.npy", z)
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        bad = z.copy()
        bad[1, 2, 3] = value
        np.save(src / f"{name}.npy", bad)
    np.save(src / "huge.npy", z * 1e30)
    code, out, err = _cli(capsys, "serve-batch", "decode", tiny_model, "-i", src, "-o", tmp_path / "dec", "--json")
    assert code == 1 and "3 image(s) failed" in err and "Traceback" not in err
    assert [p.name for p in (tmp_path / "dec").iterdir()] == ["ok.png"]
    report = json.loads(out)
    failures = {f["source"]: f for f in report["failures"]}
    assert set(failures) == {"nan", "inf", "huge"} and report["processed"] == 1
    assert all(f["reason"] == "non-finite" for f in failures.values())
    assert "the latent holds 1" in failures["nan"]["detail"] and "decoded image" in failures["huge"]["detail"]


# ---------------------------------------------------------------------------------------------------------
# --output that cannot be a folder: one line naming it, exit 2, before any work


@pytest.mark.parametrize("kind", ["file", "dangling"])
@pytest.mark.parametrize("command", ["train", "eval", "encode", "decode", "prepare"])
def test_an_output_that_is_a_file_or_a_dangling_link_is_refused(tiny_model, latents, tmp_path, capsys, kind, command):
    target = tmp_path / "target"
    if kind == "file":
        target.write_text("keep me")
    else:
        target.symlink_to(tmp_path / "missing" / "dir")
    photos = _sources(tmp_path / "photos")
    (tmp_path / "tiny.toml").write_text(TRAIN_TINY)
    argv = {
        "train": ["train", "-c", tmp_path / "tiny.toml", "--data", write_demo_photos(tmp_path / "data", count=6, size=48),
                  "-o", target],
        "eval": ["eval", tiny_model, "--data", photos, "--out", target, "--metrics", "psnr", "--size", "32"],
        "encode": ["serve-batch", "encode", tiny_model, "-i", photos, "-o", target, "--size", "32"],
        "decode": ["serve-batch", "decode", tiny_model, "-i", latents, "-o", target],
        "prepare": ["prepare", photos, target, "--size", "32"],
    }[command]
    code, _, err = _cli(capsys, *argv, "-q")
    assert code == 2
    _one_clean_line(err, str(target), "is a file, not a folder" if kind == "file" else "which does not exist")
    assert target.is_symlink() or target.read_text() == "keep me"


def test_a_symlink_loop_in_the_input_is_walked_once(tiny_model, tmp_path, capsys):
    src = _sources(tmp_path / "src")
    (src / "loop").symlink_to(".")  # followed to the depth limit, it encoded each image 40 times
    code, out, err = _cli(capsys, "serve-batch", "encode", tiny_model, "-i", src, "-o", tmp_path / "lat",
                          "--size", "32", "--json")
    assert code == 0, err
    assert json.loads(out)["processed"] == 3
    assert sorted(e["source"] for e in load_index(tmp_path / "lat" / "index.json")["entries"]) == [
        "a.png", "b.jpg", "c.png"]


# ---------------------------------------------------------------------------------------------------------
# eval


def test_eval_lists_dangling_links_as_skipped(tiny_model, tmp_path):
    photos = _sources(tmp_path / "photos")
    (photos / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (photos / "self.png").symlink_to("self.png")
    report = evaluate(tiny_model, photos, EvalConfig(size=32, metrics=["psnr"], device="cpu"))
    assert report.data["found"] == 5 and report.data["evaluated"] == 3
    assert {(s["path"], s["reason"]) for s in report.data["skipped"]} == {
        ("gone.png", "missing"), ("self.png", "symlink-loop")}


def test_eval_fails_images_whose_reconstruction_is_not_finite(tiny_model, tmp_path, capsys, monkeypatch):
    """A reconstruction holding NaN was scored as a black image, exit 0; now it is left out, listed, exit 1."""
    photos = _sources(tmp_path / "photos")
    Image.new("RGB", (40, 48), (255, 255, 255)).save(photos / "white.png")
    encode = TorchBackend.encode

    def nan_for_white(self, images):
        latents = encode(self, images)
        white = images.flatten(1).min(1).values > 0.99
        return torch.where(white[:, None, None, None], torch.nan, latents)  # as an overflowing encoder would

    monkeypatch.setattr(TorchBackend, "encode", nan_for_white)
    code, out, err = _cli(capsys, "eval", tiny_model, "--data", photos, "--metrics", "psnr,ssim", "--size", "32",
                          "--out", tmp_path / "report", "--json", "--compare", tiny_model)
    assert code == 1 and "1 image(s) failed" in err and "Traceback" not in err
    report = json.loads(out)
    assert [f["name"] for f in report["data"]["failed"]] == ["white.png"]
    assert report["data"]["evaluated"] == 3 and report["summary"]["model"]["psnr"]["count"] == 3
    csv_rows = (tmp_path / "report" / "per_image.csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[0] for r in csv_rows) == ["a.png", "b.jpg", "c.png"]


# ---------------------------------------------------------------------------------------------------------
# train --teacher and prepare's journal


def test_train_teacher_without_profile_checks_the_batch_before_loading_it(tiny_model, tmp_path, capsys,
                                                                         monkeypatch):
    """It fell back to the 'fast' profile and failed 44 s later, after loading the teacher, for its batch of 24."""
    from zturbo.distill import student

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the teacher was loaded before the data was checked")

    monkeypatch.setattr(student, "load_teacher", no_loading)
    data = write_demo_photos(tmp_path / "data", count=6, size=48)
    code, _, err = _cli(capsys, "train", "--teacher", tiny_model, "--data", data, "-o", tmp_path / "run", "-q")
    assert code == 2
    _one_clean_line(err, "6 training images", "per-process batch of 24", "default profile 'fast'")


def test_prepare_deletes_and_writes_only_inside_its_output(tmp_path, capsys):
    """A journal line naming ../outside/victim.txt made the next prepare delete that file."""
    src = _sources(tmp_path / "src")
    (src / "sub").mkdir()
    shutil.copy(src / "a.png", src / "sub" / "d.png")
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("precious")
    (outside / "victim.png").write_text("precious")
    assert _cli(capsys, "prepare", src, out, "--size", "32", "-q")[0] == 0
    hostile = [
        {"source": "x1.png", "status": "written", "output": "../outside/victim.txt", "split": "train",
         "sha256": "0", "output_bytes": 8},
        {"source": "x2.png", "status": "written", "output": "train/../../outside/victim.png", "split": "train",
         "sha256": "0", "output_bytes": 8},
        {"source": "x3.png", "status": "written", "output": str(outside / "victim.png"), "split": "train",
         "sha256": "0", "output_bytes": 8},
        {"source": "x4.png", "status": "written", "output": "train/sub2/v.png", "split": "train",
         "sha256": "0", "output_bytes": 8},
        {"source": 7}, ["not", "a", "record"], {"source": "x5.png", "status": "written"},
    ]
    with open(out / ".prepare" / "state.jsonl", "a") as fh:
        fh.writelines(json.dumps(rec) + "\n" for rec in hostile)
    for split in ("train", "val"):  # symlinked folders inside OUTPUT lead outside
        shutil.rmtree(out / split / "sub", ignore_errors=True)
        (out / split).mkdir(exist_ok=True)
        (out / split / "sub").symlink_to(outside)
        (out / split / "sub2").symlink_to(outside)
    (outside / "v.png").write_text("precious")
    before = _digests(outside)
    code, stdout, err = _cli(capsys, "prepare", src, out, "--size", "32", "--json")
    assert code == 0, err
    assert _digests(outside) == before
    report = json.loads(stdout)
    assert report["removed"] == 0 and report["skipped"] == {"outside-output": 1}
