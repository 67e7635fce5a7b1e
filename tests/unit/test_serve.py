"""serve-batch: round trip, bad inputs, full disk, reading modes (SIGKILL, torchrun: tests/e2e)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from serve_helpers import TINY, encode_folder, index_entries, shard_latents

from zturbo.backends import create_backend
from zturbo.cli import run
from zturbo.config import ServeConfig
from zturbo.data import demo_images
from zturbo.data.images import open_image, pil_to_tensor, resize_to_bucket
from zturbo.errors import UsageError
from zturbo.model import VAE
from zturbo.serve import (
    Partition,
    compute_streams,
    decode_collection,
    encode_collection,
    load_index,
    merge_outputs,
    reading_mode,
    store,
)
from zturbo.serve.inputs import bucket_sizes, nearest_bucket

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    """A tiny VAE fitted for a few dozen steps to the sample photos at 16 px: enough to reconstruct them."""
    torch.manual_seed(0)
    x = torch.stack([pil_to_tensor(resize_to_bucket(open_image(p, draft_size=16), (16, 16))[0]) for p in demo_images()])
    vae = VAE(**TINY, sample_size=16)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(60):
        loss = (vae(x) - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("trained") / "vae"
    vae.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------


def test_roundtrip_of_sample_photos(trained_model, tmp_path, capsys):
    lat, dec = tmp_path / "lat", tmp_path / "dec"
    assert encode_folder(trained_model, demo_images()[0].parent, lat, "--size", "16", "--resize", "square", "-b", "4") == 0
    index = load_index(lat / "index.json")
    assert index["count"] == len(demo_images()) and index["failed"] == 0
    capsys.readouterr()
    assert run(["serve-batch", "decode", str(trained_model), "-i", str(lat), "-o", str(dec), "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["processed"] == len(demo_images())

    vae = VAE.from_pretrained(trained_model)
    to_model, to_original = [], []
    for path in demo_images():
        crop = np.asarray(resize_to_bucket(open_image(path, draft_size=16), (16, 16))[0])
        out = np.asarray(Image.open(dec / f"{path.stem}.png"))
        assert out.shape == (16, 16, 3)
        with torch.no_grad():
            direct = vae.decode(vae.encode(pil_to_tensor(Image.fromarray(crop))[None]).mean)[0]
        direct = ((direct.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        to_model.append(_psnr(out, direct))
        to_original.append(_psnr(out, crop))
    # The pipeline adds nothing but 8-bit rounding to what the model itself reconstructs...
    assert min(to_model) > 40
    # ...and the fitted model reconstructs the photos recognisably (an unfitted one gives about 6 dB).
    assert np.mean(to_original) > 16, to_original


def test_shard_parts_cover_every_input_exactly_once(tiny_model, photos, tmp_path, capsys):
    outs = [tmp_path / f"part{i}" for i in range(3)]
    for i, out in enumerate(outs):
        assert encode_folder(tiny_model, photos, out, "--size", "32", "--shard", f"{i}/3", "-b", "4") == 0
    parts = [set(index_entries(load_index(o / "index.json"))) for o in outs]
    assert all(parts)  # each machine got work
    assert sum(len(p) for p in parts) == 40 and len(set.union(*parts)) == 40  # disjoint and complete

    capsys.readouterr()
    assert run(["serve-batch", "merge", *map(str, outs), "--index-dir", str(tmp_path / "merged"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 40
    index = load_index(tmp_path / "merged" / "index.json")
    assert index["count"] == 40 and index["duplicates_dropped"] == 0
    assert merge_outputs([outs[0], outs[0]], tmp_path / "twice")["duplicates_dropped"] == len(parts[0])
    assert (tmp_path / "merged" / index["entries"][0]["shard"]).is_file()  # paths relative to the index

    # Rank x shard partitions (torchrun inside each machine) tile the inputs too.
    keys = [f"k{i}" for i in range(500)]
    owners = [[k for k in keys if Partition(i, 3, r, 2).owns(k)] for i in range(3) for r in range(2)]
    assert sorted(k for part in owners for k in part) == sorted(keys)


def test_ranks_share_one_output_and_the_last_merges(tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    cfg = ServeConfig(size=32, batch_size=4)
    r1 = encode_collection(tiny_model, photos, out, cfg, Partition(0, 1, 1, 2))
    r0 = encode_collection(tiny_model, photos, out, cfg, Partition(0, 1, 0, 2))
    assert r0.processed + r1.processed == 40 and r0.processed and r1.processed
    assert r0.index_count == 40


@pytest.mark.parametrize("reading", ["threads", "streams", "phased"])
def test_corrupt_inputs_are_skipped_and_reported(tiny_model, photos, tmp_path, capsys, reading):
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted((photos / "a").iterdir())[:5]:
        (src / p.name).write_bytes(p.read_bytes())
    good = (src / "img001.png").read_bytes()
    (src / "truncated.png").write_bytes(good[: len(good) // 2])
    (src / "text.jpg").write_text("not an image")
    (src / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    assert encode_folder(tiny_model, src, out, "--size", "32", "--reading", reading) == 0
    captured = capsys.readouterr().out
    index = load_index(out / "index.json")
    reasons = {f["source"]: f["reason"] for f in index["failures"]}
    assert set(reasons) == {"truncated.png", "text.jpg", "empty.png"}
    assert reasons["text.jpg"] == "not-an-image" and reasons["truncated.png"] == "corrupt"
    assert index["count"] == 5 and "truncated.png" in captured
    report = json.loads((out / "report.json").read_text())
    assert report["failed"] == 3

    # Fixed on disk: a rerun picks it up and it leaves the failure list.
    (src / "truncated.png").write_bytes(good)
    assert encode_folder(tiny_model, src, out, "--size", "32", "--reading", reading) == 0
    index = load_index(out / "index.json")
    assert index["count"] == 6 and {f["source"] for f in index["failures"]} == {"text.jpg", "empty.png"}


def test_wrong_channel_latents_are_rejected(tiny_model, tmp_path, capsys):
    np.save(tmp_path / "z.npy", np.zeros((2, 3, 8, 8), np.float32))  # the model has 4 latent channels
    assert run(["serve-batch", "decode", str(tiny_model), "-i", str(tmp_path / "z.npy"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "3 channels" in err and "takes 4" in err
    assert not (tmp_path / "o").exists()


def test_decode_npy_and_safetensors_files(tiny_model, tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "batch.npy", np.random.default_rng(0).standard_normal((3, 4, 8, 12)).astype(np.float32))
    save_file({"z": torch.randn(4, 16, 16)}, str(src / "one.safetensors"))
    out = tmp_path / "out"
    assert run(["serve-batch", "decode", str(tiny_model), "-i", str(src), "-o", str(out), "--format", "jpeg",
                "--quiet"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["batch_00000.jpg", "batch_00001.jpg", "batch_00002.jpg", "one.jpg"]
    assert Image.open(out / "batch_00000.jpg").size == (24, 16) and Image.open(out / "one.jpg").size == (32, 32)
    (out / "one.jpg").unlink()  # a rerun writes only what is missing
    report = decode_collection(tiny_model, src, out, ServeConfig(image_format="jpeg"))
    assert report.already_done == 3 and report.processed == 1 and (out / "one.jpg").is_file()


def test_full_disk_stops_cleanly_and_keeps_written_shards(tiny_model, photos, tmp_path, monkeypatch, capsys):
    from safetensors.numpy import save_file as real_save  # fp32 shards are written through it

    calls = {"n": 0}

    def save_then_fill_disk(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] >= 3:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr("safetensors.numpy.save_file", save_then_fill_disk)
    out = tmp_path / "out"
    assert encode_folder(tiny_model, photos, out, "--size", "32", "-b", "4", "--shard-size", "8") == 1
    assert "no space left" in capsys.readouterr().err
    shards = sorted((out / "shards").iterdir())
    assert len(shards) == 2 and all(not p.name.startswith(".") for p in shards)  # no half-written file left
    held = [len(store.read_shard_entries(p)) for p in shards]
    assert all(8 <= n < 8 + 4 for n in held)  # shards end at the first batch boundary at or past --shard-size

    monkeypatch.setattr("safetensors.numpy.save_file", real_save)
    assert encode_folder(tiny_model, photos, out, "--size", "32", "-b", "4", "--shard-size", "8") == 0
    assert load_index(out / "index.json")["count"] == 40


def test_rerun_with_other_settings_is_refused(tiny_model, photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert encode_folder(tiny_model, photos / "a", out, "--size", "32") == 0
    assert encode_folder(tiny_model, photos / "a", out, "--size", "16") == 2
    assert "other settings" in capsys.readouterr().err


def test_manifest_and_sample_mode(tiny_model, photos, tmp_path):
    manifest = tmp_path / "list.txt"
    names = sorted(str(p.relative_to(photos)) for p in (photos / "b").iterdir())[:4]
    manifest.write_text("# four images\n" + "\n".join(str(photos / n) for n in names + names[:1]) + "\n")
    out_a, out_b = tmp_path / "s1", tmp_path / "s2"
    for out in (out_a, out_b):
        assert encode_folder(tiny_model, manifest, out, "--size", "32", "--sample") == 0
    la, lb = shard_latents(out_a), shard_latents(out_b)
    assert len(la) == 4  # the duplicate line is encoded once
    assert all(torch.equal(la[k], lb[k]) for k in la)  # per-image noise is reproducible
    assert encode_folder(tiny_model, manifest, tmp_path / "mean", "--size", "32") == 0
    mean = shard_latents(tmp_path / "mean")
    assert set(mean) == set(la) and not any(torch.allclose(mean[k], la[k]) for k in la)


def test_buckets_keep_aspect_and_divisibility():
    buckets = bucket_sizes(64, 8, "aspect")
    assert all(w % 8 == 0 and h % 8 == 0 for w, h in buckets)
    assert nearest_bucket(1920, 1080, buckets) == (88, 48) and nearest_bucket(1080, 1920, buckets) == (48, 88)
    assert nearest_bucket(100, 100, buckets) == (64, 64)
    assert bucket_sizes(64, 8, "square") == [(64, 64)]


def test_auto_batch_size_on_cpu(tiny_model, photos, tmp_path):
    report = encode_collection(tiny_model, photos / "a", tmp_path / "o", ServeConfig(size=32))
    assert report.batch_size == 8 and report.processed == 20


@pytest.mark.gpu
def test_gpu_encode_matches_cpu(tiny_model, photos, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = ServeConfig(size=32)
    gpu = encode_collection(tiny_model, photos, tmp_path / "gpu", cfg, device="cuda")
    cpu = encode_collection(tiny_model, photos, tmp_path / "cpu", cfg, device="cpu")
    assert gpu.batch_size >= 8 and gpu.processed == cpu.processed == 40
    lg, lc = shard_latents(tmp_path / "gpu"), shard_latents(tmp_path / "cpu")
    # cuDNN may use TF32 for fp32 convolutions: close, not bit-equal.
    assert all(torch.allclose(lg[k], lc[k], atol=2e-2, rtol=2e-2) for k in lc)
    assert max((lg[k] - lc[k]).abs().max().item() for k in lc) < 0.1 * min(lc[k].std().item() for k in lc)


def test_every_reading_mode_gives_the_same_output(tiny_model, photos, tmp_path):
    """Reading beside compute, in compute streams, or between batches: same latents, same shards, same order."""
    results = {}
    threads = torch.get_num_threads()
    for mode in ("threads", "streams", "phased"):
        cfg = ServeConfig(size=32, batch_size=4, reading=mode)
        report = encode_collection(tiny_model, photos, tmp_path / mode, cfg)
        assert report.reading == mode
        assert report.processed == 40 and report.failed == 0
        assert torch.get_num_threads() == threads  # compute streams restore torch's thread count
        index = load_index(tmp_path / mode / "index.json")
        placed = {e["source"]: (e["shard"], e["tensor"]) for e in index["entries"]}
        results[mode] = (index_entries(index), shard_latents(tmp_path / mode), placed)
    for other in ("streams", "phased"):
        assert results["threads"][0] == results[other][0]
        assert results["threads"][2] == results[other][2]  # same shards, same order in them
        for key, latent in results["threads"][1].items():
            torch.testing.assert_close(results[other][1][key], latent)
    # auto resolves to the mode reading_mode picks for this machine.
    report = encode_collection(tiny_model, photos / "a", tmp_path / "auto", ServeConfig(size=32))
    assert report.reading == reading_mode(ServeConfig(), torch.device("cpu"))


def test_auto_reading_follows_the_cores_torch_computes_on():
    cpu, cuda, auto = torch.device("cpu"), torch.device("cuda"), ServeConfig()
    assert reading_mode(auto, cpu, cores=2, torch_threads=2) == "streams"  # a thread on every core
    assert reading_mode(auto, cpu, cores=1, torch_threads=1) == "phased"
    assert reading_mode(ServeConfig(streams=1), cpu, cores=8, torch_threads=8) == "phased"
    assert reading_mode(auto, cpu, cores=64, torch_threads=1) == "threads"  # torch leaves cores free
    assert reading_mode(auto, cuda, cores=16, torch_threads=16) == "threads"
    for mode in ("threads", "streams", "phased"):
        assert reading_mode(ServeConfig(reading=mode), cpu, cores=4, torch_threads=4) == mode
    with pytest.raises(UsageError, match="streams is for models computing on the CPU"):
        reading_mode(ServeConfig(reading="streams"), cuda)


@pytest.mark.parametrize("reading", ["threads", "streams", "phased"])
def test_index_records_displayed_size_of_exif_rotated_images(tiny_model, tmp_path, reading):
    """One size bucket (square): sizes come from the single decode, after EXIF rotation, before JPEG draft."""
    src = tmp_path / "src"
    src.mkdir()
    arr = np.random.default_rng(0).integers(0, 255, (60, 180, 3), dtype=np.uint8)  # stored 180 x 60
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: displayed 60 x 180
    Image.fromarray(arr).save(src / "rotated.jpg", exif=exif.tobytes())
    Image.fromarray(arr).save(src / "plain.jpg")
    cfg = ServeConfig(size=16, batch_size=2, reading=reading, resize="square")
    encode_collection(tiny_model, src, tmp_path / "out", cfg)
    sizes = {e["source"]: (e["width"], e["height"]) for e in load_index(tmp_path / "out" / "index.json")["entries"]}
    assert sizes == {"rotated.jpg": (60, 180), "plain.jpg": (180, 60)}


def test_decode_restores_the_source_resolution_on_request(tiny_model, photos, tmp_path, capsys):
    lat = tmp_path / "lat"
    assert encode_folder(tiny_model, photos / "a", lat, "--size", "32") == 0
    index = load_index(lat / "index.json")
    by_name = {Path(e["source"]).stem: e for e in index["entries"]}
    assert run(["serve-batch", "decode", str(tiny_model), "-i", str(lat), "-o", str(tmp_path / "dec"), "--quiet"]) == 0
    assert run(["serve-batch", "decode", str(tiny_model), "-i", str(lat), "-o", str(tmp_path / "src"), "--quiet",
                "--restore-size"]) == 0
    checked = 0
    for name, e in by_name.items():
        with Image.open(tmp_path / "dec" / f"{name}.png") as im:
            assert im.size == tuple(e["bucket"])  # default: the decoded (bucket) size
        with Image.open(tmp_path / "src" / f"{name}.png") as im:
            w, h, (bw, bh) = e["width"], e["height"], e["bucket"]
            scale = max(bw / w, bh / h)
            assert im.size == (round(min(w, bw / scale)), round(min(h, bh / scale)))
            checked += im.size != (bw, bh)
    assert checked > 0, "no image in the set needed resizing: the test would prove nothing"
    # Square buckets crop: a 48 x 32 source comes back as its 32 x 32 center region, at source scale.
    sq = tmp_path / "sq"
    assert encode_folder(tiny_model, photos / "a", sq, "--size", "16", "--resize", "square") == 0
    assert run(["serve-batch", "decode", str(tiny_model), "-i", str(sq), "-o", str(tmp_path / "sqd"), "--quiet",
                "--restore-size"]) == 0
    sizes = {Image.open(p).size for p in (tmp_path / "sqd").iterdir()}
    assert sizes == {(32, 32), (24, 24)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shards_hold_latents_bit_exact_in_every_dtype(tmp_path, dtype):
    """fp32/fp16 shards go through safetensors' numpy writer, bf16 through its torch one: same file format."""
    from safetensors import safe_open

    tensors = {f"{i:06d}": torch.randn(8, 4, 6).to(dtype) for i in range(5)}
    entries = [{"tensor": k, "source": f"img{k}.png"} for k in tensors]
    path = tmp_path / "shards" / "part-000000.safetensors"
    store.write_shard(path, tensors, entries)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    assert store.read_shard_entries(path) == entries
    with safe_open(str(path), framework="pt") as fh:
        for k, t in tensors.items():
            got = fh.get_tensor(k)
            assert got.dtype == dtype and torch.equal(got, t)


def test_compute_streams_split_the_cores_without_sharing_one():
    for cores in range(1, 97):
        streams, threads = compute_streams(cores)
        assert 1 <= streams <= 4 and streams * threads <= cores  # no core runs two compute threads
        assert cores - streams * threads < streams  # and at most rounding leaves one idle
        assert (streams > 1) == (cores > 1)  # one stream only where there is one core
    assert compute_streams(16, streams=2) == (2, 8)  # --streams
    assert compute_streams(2, streams=8) == (2, 1)  # at most one per core


def test_compute_streams_use_their_thread_share_and_stop_on_the_first_error(tiny_model, photos, tmp_path):
    """Each stream computes with cores/streams torch threads; an error in one stream surfaces in the
    caller with torch's thread count restored, and a rerun completes what it left."""
    backend = create_backend("torch", tiny_model, device="cpu", precision="fp32")
    encode = backend.encode
    seen, calls = set(), []

    def spying(x):
        seen.add(torch.get_num_threads())
        return encode(x)

    def failing_on_the_fourth(x):
        calls.append(len(x))
        if len(calls) == 4:
            raise RuntimeError("boom in batch 4")
        return encode(x)

    saved = torch.get_num_threads()
    torch.set_num_threads(2)  # what the run must restore, and not what a stream computes with
    try:
        cfg = ServeConfig(size=32, batch_size=4, reading="streams", streams=2, shard_size=4)
        backend.encode = spying
        report = encode_collection(tiny_model, photos, tmp_path / "ok", cfg, backend=backend)
        assert report.reading == "streams" and report.processed == 40
        assert seen == {compute_streams(streams=2)[1]} and torch.get_num_threads() == 2

        backend.encode = failing_on_the_fourth
        with pytest.raises(RuntimeError, match="boom in batch 4"):
            encode_collection(tiny_model, photos, tmp_path / "err", cfg, backend=backend)
        assert torch.get_num_threads() == 2
        backend.encode = encode
        report = encode_collection(tiny_model, photos, tmp_path / "err", cfg, backend=backend)
        assert report.already_done + report.processed == 40 and report.index_count == 40
    finally:
        torch.set_num_threads(saved)
