"""Shards as input (WebDataset tars, Parquet) and WebDataset latents as output: discovery, damage, order, bad input."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from serve_helpers import encode_folder
from shard_helpers import (
    corrupt_header,
    image_bytes,
    make_parquet,
    make_tar_shards,
    truncate_inside,
    write_tar,
)

from zturbo.data.datasets import ImageFolderDataset, ResumableSampler, shard_blocks, split_data
from zturbo.data.images import open_image
from zturbo.data.latent_shards import read_latent_index
from zturbo.data.latent_webdataset import latent_tars, read_latent_tar
from zturbo.data.shards import find_shards, index_shards
from zturbo.errors import InputError

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def test_a_path_a_glob_and_a_brace_pattern_name_the_same_shards(tmp_path):
    paths = make_tar_shards(tmp_path / "s", 3, 2)
    brace = find_shards(str(tmp_path / "s" / "{000000..000002}.tar"))
    assert brace.files == tuple(paths) and brace.kind == "webdataset"
    assert find_shards(str(tmp_path / "s" / "*.tar")).files == brace.files
    assert find_shards(tmp_path / "s").files == brace.files  # a folder of shards
    assert find_shards(paths[1]).files == (paths[1],)
    index = index_shards(brace)
    assert index.count == 6 and not index.damaged
    sample = index.units[1].samples[0]
    assert (sample.key, sample.source, sample.member) == ("0000010000", "000001/0000010000", "0000010000.png")
    assert sample.read_bytes() == image_bytes(2)
    assert open_image(sample).size == (32, 32)


def test_patterns_that_name_nothing_or_missing_shards_are_input_errors(tmp_path):
    make_tar_shards(tmp_path / "s", 2, 1)
    with pytest.raises(InputError, match="no shards match"):
        find_shards(str(tmp_path / "s" / "{000005..000009}.tar"))
    with pytest.raises(InputError, match="1 of the 3 shards .* missing .*000002.tar"):
        find_shards(str(tmp_path / "s" / "{000000..000002}.tar"))
    assert find_shards(tmp_path / "nothing-here") is None  # not a pattern: the caller says what is missing


def test_a_corrupt_tar_header_is_reported_and_the_members_after_it_are_kept(tmp_path):
    (path,) = make_tar_shards(tmp_path, 1, 4, caption=False)
    corrupt_header(path, "0000000001.png")
    index = index_shards(find_shards(path))
    assert [s.key for s in index.units[0].samples] == ["0000000000", "0000000002", "0000000003"]
    assert len(index.damaged) == 1 and "corrupt tar data" in index.damaged[0] and "after 0000000000" in index.damaged[0]
    assert index.units[0].samples[1].read_bytes() == image_bytes(2)


def test_a_truncated_shard_keeps_the_samples_before_the_cut(tmp_path):
    (path,) = make_tar_shards(tmp_path, 1, 3, caption=False)
    truncate_inside(path, "0000000002.png")
    index = index_shards(find_shards(path))
    assert [s.key for s in index.units[0].samples] == ["0000000000", "0000000001"]
    assert "truncated" in index.damaged[0]


def test_parquet_image_column_is_found_or_named(tmp_path):
    hf = make_parquet(tmp_path / "hf.parquet", 5)  # {"bytes", "path"} struct, row groups of 3
    index = index_shards(find_shards(hf))
    assert index.count == 5 and [s.key for s in index.units[0].samples][:2] == ["000000000", "000000001"]
    assert index.units[0].samples[4].read_bytes() == image_bytes(4)  # second row group
    plain = make_parquet(tmp_path / "p" / "plain.parquet", 2, struct=False, key=True)
    sample = index_shards(find_shards(tmp_path / "p")).units[0].samples[1]
    assert sample.key == "k001" and sample.read_bytes() == image_bytes(1)
    assert index_shards(find_shards(plain), image_column="jpg").count == 2
    with pytest.raises(InputError, match="column 'text' holds no image bytes"):
        index_shards(find_shards(plain), image_column="text")


def test_shard_sampler_order_is_set_by_seed_and_epoch_and_split_across_ranks(tmp_path):
    make_tar_shards(tmp_path, 6, 5, caption=False)
    samples = split_data(tmp_path, 0).train
    dataset = ImageFolderDataset(samples, 32)
    blocks = shard_blocks(samples)
    assert [len(b) for b in blocks] == [5] * 6

    def order(rank, world, epoch, seed=0):
        sampler = ResumableSampler(dataset, world, rank, seed=seed, blocks=blocks, blocks_in_flight=2)
        sampler.set_epoch(epoch)
        return [i for i, _ in sampler]

    assert order(0, 1, 0) == order(0, 1, 0) and sorted(order(0, 1, 0)) == list(range(30))
    assert order(0, 1, 1) != order(0, 1, 0) and order(0, 1, 0, seed=1) != order(0, 1, 0)
    ranks = [order(r, 2, 3) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(30)) and len(ranks[0]) == len(ranks[1]) == 15
    # Two shards in flight: the first 10 samples of an epoch come from two shards.
    assert len({samples[i].shard for i in order(0, 1, 0)[:10]}) == 2
    sampler = ResumableSampler(dataset, 1, 0, blocks=blocks, blocks_in_flight=2)
    sampler.set_epoch(0)
    sampler.skip(7)
    assert [i for i, _ in sampler] == order(0, 1, 0)[7:]  # resume mid-epoch


def test_serve_webdataset_output_has_one_tar_per_input_shard_and_reruns_skip_them(tiny_model, tmp_path):
    make_tar_shards(tmp_path / "in", 3, 4)
    out = tmp_path / "out"
    args = ["-i", str(tmp_path / "in" / "{000000..000002}.tar"), "--size", "32", "--output-format", "webdataset"]
    assert encode_folder(tiny_model, args[1], out, *args[2:]) == 0
    tars = latent_tars(out)
    assert [p.name for p in tars] == ["000000.tar", "000001.tar", "000002.tar"]
    with tarfile.open(tars[1]) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("0000010002.json").read())
    assert "0000010002.latent.safetensors" in names and len(names) == 8
    assert meta["source"] == "000001/0000010002" and meta["bucket"] == [32, 32] and meta["crop"] == [0, 0, 32, 32]
    assert meta["encoder_fingerprint"].startswith("sha256:") and meta["shape"] == [4, 16, 16]
    assert {"scaling_factor", "shift_factor", "latent_channels"} <= meta.keys()
    before = {p: p.stat().st_mtime_ns for p in tars}
    assert encode_folder(tiny_model, args[1], out, *args[2:], "--json") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["already_done"] == 12 and report["processed"] == 0
    assert {p: p.stat().st_mtime_ns for p in latent_tars(out)} == before  # nothing rewritten


def test_zturbo_and_webdataset_outputs_hold_the_same_latents(tiny_model, tmp_path):
    make_parquet(tmp_path / "in" / "a.parquet", 5)
    z, w = tmp_path / "z", tmp_path / "w"
    assert encode_folder(tiny_model, tmp_path / "in", z, "--size", "32", "-b", "4") == 0
    assert encode_folder(tiny_model, tmp_path / "in", w, "--size", "32", "-b", "4", "--output-format", "webdataset",
                         "--latent-file", "npy") == 0
    zi, wi = read_latent_index(z), read_latent_index(w)  # what train --latents reads, for both formats
    from zturbo.data.latent_shards import LatentPairDataset

    za = {e.source: LatentPairDataset(zi, tmp_path, [e], 32).latent(e) for e in zi.entries}
    wa = {e.source: LatentPairDataset(wi, tmp_path, [e], 32).latent(e) for e in wi.entries}
    assert sorted(za) == sorted(wa) == [f"a/{i:09d}" for i in range(5)]
    assert all(torch.equal(za[k], wa[k]) for k in za)
    assert wi.fingerprint == zi.fingerprint and wi.latent_channels == 4


def test_a_hostile_sample_key_cannot_write_outside_the_output(tiny_model, tmp_path):
    write_tar(tmp_path / "in" / "evil.tar", [("../../../escape.png", image_bytes(0)), ("ok.png", image_bytes(1))])
    out = tmp_path / "deep" / "out"
    assert encode_folder(tiny_model, tmp_path / "in" / "evil.tar", out, "--size", "32",
                         "--output-format", "webdataset") == 0
    assert not list(tmp_path.rglob("escape*"))
    stored = read_latent_tar(out / "shards" / "evil.tar")
    assert sorted(s.member for s in stored) == ["escape.latent.safetensors", "ok.latent.safetensors"]
    assert {s.meta["source"] for s in stored} == {"evil/../../../escape", "evil/ok"}


@pytest.mark.parametrize("damage", ["bad-bytes", "corrupt-header", "truncated"])
def test_bad_tar_members_are_named_and_the_rest_is_encoded(tiny_model, tmp_path, capsys, damage):
    make_tar_shards(tmp_path / "in", 2, 3, caption=False)
    path = tmp_path / "in" / "000001.tar"
    if damage == "bad-bytes":
        write_tar(path, [("0000010000.png", image_bytes(3)), ("0000010001.png", b"not an image"),
                         ("0000010002.png", image_bytes(5))])
    elif damage == "corrupt-header":
        corrupt_header(path, "0000010001.png")
    else:
        truncate_inside(path, "0000010002.png")
    out = tmp_path / "out"
    code = encode_folder(tiny_model, tmp_path / "in", out, "--size", "32", "--output-format", "webdataset")
    err = capsys.readouterr().err
    held = {s.meta["source"] for tar in latent_tars(out) for s in read_latent_tar(tar)}
    if damage == "bad-bytes":  # a bad sample: skipped and listed, as a bad file is
        assert code == 0 and "000001/0000010001" in json.loads((out / "report.json").read_text())["failures"][0]["source"]
        assert len(held) == 5
    else:  # a damaged shard: one line, exit 2, everything readable encoded
        assert code == 2 and err.count("error:") == 1 and "000001.tar" in err and "Traceback" not in err
        kept = {"corrupt-header": {"0000010000", "0000010002"}, "truncated": {"0000010000", "0000010001"}}[damage]
        assert held == {f"000000/00000000{i:02d}" for i in range(3)} | {f"000001/{k}" for k in kept}


def test_bad_inputs_exit_2_in_one_line(tiny_model, tmp_path, capsys):
    make_parquet(tmp_path / "text.parquet", 2)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "noimg" / "x.parquet") if (tmp_path / "noimg").mkdir() \
        is None else None
    for spec in (tmp_path / "noimg" / "x.parquet", f"{tmp_path}/s/{{000000..000009}}.tar"):
        assert encode_folder(tiny_model, spec, tmp_path / "out", "--size", "32") == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "Traceback" not in err
        assert ("no image column" in err) if "parquet" in str(spec) else ("no shards match" in err)
    assert not (tmp_path / "out" / "shards").exists()


def test_training_reads_shards_and_refuses_damaged_ones(tmp_path, tiny_config, capsys):
    from train_helpers import train_argv

    from zturbo.cli import run

    make_tar_shards(tmp_path / "s", 3, 2, size=(40, 32))
    assert run(train_argv(tiny_config, tmp_path / "s", tmp_path / "run", "--max-steps", "2", "--quiet")) == 0
    assert (tmp_path / "run" / "final").is_dir()
    truncate_inside(tmp_path / "s" / "000002.tar", "0000020001.png")
    capsys.readouterr()
    assert run(train_argv(tiny_config, f"{tmp_path}/s/*.tar", tmp_path / "run2", "--max-steps", "2", "--quiet")) == 2
    err = capsys.readouterr().err
    assert "damaged shard" in err and "000002.tar" in err and not (tmp_path / "run2" / "checkpoints").exists()


def test_eval_and_prepare_read_shards(tiny_model, tmp_path, capsys):
    from zturbo.cli import run

    make_tar_shards(tmp_path / "s", 2, 2)
    assert run(["eval", str(tiny_model), "--data", f"{tmp_path}/s/*.tar", "--metrics", "psnr", "--size", "32",
                "--quiet", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)["per_image"]
    assert sorted(r["name"] for r in evaluated) == ["000000/0000000000", "000000/0000000001", "000001/0000010000",
                                                      "000001/0000010001"]
    assert run(["prepare", f"{tmp_path}/s/*.tar", str(tmp_path / "prep"), "--size", "16", "--quiet"]) == 0
    outputs = sorted(p.relative_to(tmp_path / "prep").as_posix() for p in (tmp_path / "prep").rglob("*.png"))
    assert len(outputs) == 4 and all("/000000/" in o or "/000001/" in o for o in outputs)
    capsys.readouterr()
    assert run(["prepare", f"{tmp_path}/s/*.tar", str(tmp_path / "prep"), "--size", "16", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 0  # a rerun finds them up to date


def test_train_latents_pairs_webdataset_latents_with_shard_samples(tmp_path):
    """`train --latents` with shards as --data: the teacher's webdataset latents, matched by source key."""
    from zturbo.config import ServeConfig, load_settings
    from zturbo.distill import load_student, student_settings
    from zturbo.model import VAE
    from zturbo.serve import encode_collection

    torch.manual_seed(0)
    teacher = VAE(block_out_channels=[16, 32], norm_num_groups=4, layers_per_block=1, latent_channels=4,
                  sample_size=32).save_pretrained(tmp_path / "teacher")
    make_tar_shards(tmp_path / "s", 2, 2)
    data = f"{tmp_path}/s/*.tar"
    latents = tmp_path / "latents"
    encode_collection(teacher, data, latents, ServeConfig(size=32, device="cpu", batch_size=2, reading="phased",
                                                          output_format="webdataset"))
    s = student_settings(load_settings("demo", None, {
        "data": {"data_dir": data, "image_size": 32, "val_images": 0, "num_workers": 0},
        "train": {"output_dir": tmp_path / "run", "batch_size": 2, "max_steps": 1},
        "distill": {"teacher": teacher, "decoder_channels": [8, 16], "latents_dir": latents,
                    "calibration_images": 0}}))
    train = split_data(data, 0).train
    dataset = load_student(s, torch.device("cpu"), train).dataset(train, Path(data), 32)
    assert len(dataset) == 4
    image, latent = dataset[1]
    expected = [e for e in read_latent_index(latents).entries if e.source == train[1].source][0]
    assert torch.equal(latent, expected.stored.load().float())
    assert torch.equal(image, ImageFolderDataset([train[1]], 32, random_crop=False, random_flip=False)[0])
