"""Shards against folders, and Ray against the native engine, each side by side in one run.

    python benchmarks/bench_shards.py reader            # WebDataset (and Parquet) reading vs the folder reader
    python benchmarks/bench_shards.py ray               # serve-batch encode --engine ray vs native, same images
    python benchmarks/bench_shards.py memory            # peak RSS training from 1,000 shards vs from 10

* ``reader``: ``--images`` JPEGs of the demo photos (``--size`` px, quality 95), written once
  as files in a folder and once into WebDataset tars (and a Parquet file) of ``--per-shard``
  images. Each pass reads every image the way ``serve-batch encode`` reads it
  (``ImageSource.read``: open, decode, resize to its bucket), on ``--threads`` threads; the
  passes are interleaved (zturbo.bench.timing.time_interleaved) and the figure is the median
  over rounds of each round's ratio, images/s of the shards over images/s of the folder (the
  passes of one round ran back to back, so load from other processes mostly cancels); the
  median images/s of each reader is printed beside it.
* ``ray``: the same images encoded by ``encode_collection`` (native) and ``encode_with_ray``
  (a local Ray instance on every core, started before timing), ``--repeats`` times each in
  turn, into fresh output folders; images/s from each run's report (wall time without the
  Ray instance's start), the ratio of medians.
* ``memory``: ``zturbo train`` in a child process each (tiny model, ``--steps`` steps, no
  loader workers) on the same images as 10 shards and as 1,000 shards; the peak RSS of each
  child (ru_maxrss) and their ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps

from zturbo.bench.timing import time_interleaved
from zturbo.data import demo_images

TINY_TRAIN = """
[model]
block_out_channels = [32, 64]
layers_per_block = 1
latent_channels = 4
mid_block_add_attention = false
sample_size = 32
[data]
image_size = 32
num_workers = 0
val_images = 2
[train]
batch_size = 4
precision = "fp32"
log_every = 1000
sample_every = 100000
checkpoint_every = 100000
[loss]
perceptual_weight = 0.0
disc_weight = 0.0
"""


def jpeg_images(count: int, size: int) -> list[bytes]:
    sources = []
    for path in demo_images():
        with Image.open(path) as im:
            sources.append(ImageOps.exif_transpose(im).convert("RGB"))
    out = []
    for i in range(count):
        im = ImageOps.fit(sources[i % len(sources)], (size, size + 8 * (i % 3)), Image.Resampling.BICUBIC)
        if i // len(sources) % 2:
            im = ImageOps.mirror(im)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def write_inputs(root: Path, images: list[bytes], per_shard: int) -> tuple[Path, str, Path]:
    """The images as a folder of files, as WebDataset tars, and as one Parquet file (row groups of per_shard)."""
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / "folder"
    folder.mkdir(parents=True)
    for i, data in enumerate(images):
        (folder / f"{i:08d}.jpg").write_bytes(data)
    shards = root / "shards"
    shards.mkdir()
    count = 0
    for s in range(0, len(images), per_shard):
        with tarfile.open(shards / f"{count:06d}.tar", "w") as tar:
            for i in range(s, min(s + per_shard, len(images))):
                info = tarfile.TarInfo(f"{i:08d}.jpg")
                info.size = len(images[i])
                tar.addfile(info, io.BytesIO(images[i]))
        count += 1
    parquet = root / "images.parquet"
    pq.write_table(pa.table({"image": [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)]}), parquet,
                   row_group_size=per_shard)
    return folder, f"{shards}/{{000000..{count - 1:06d}}}.tar", parquet


def image_source(spec, size: int):
    """What serve-batch encode reads for ``spec``: its items (every image in the one square bucket) and reader."""
    from zturbo.serve.inputs import Probed, discover_inputs
    from zturbo.serve.readers import ImageSource

    sources = discover_inputs(spec).sources
    return ImageSource([Probed(s, 0, 0, (size, size)) for s in sources], 178_956_970)


def bench_reader(args) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    images = jpeg_images(args.images, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        folder, tars, parquet = write_inputs(Path(tmp), images, args.per_shard)
        readers = {"folder": image_source(folder, args.bucket), "webdataset": image_source(tars, args.bucket),
                   "parquet": image_source(parquet, args.bucket)}
        pool = ThreadPoolExecutor(args.threads)

        def read_all(source):
            def run():
                samples = list(pool.map(source.read, range(len(source.items))))
                assert all(s.array is not None for s in samples)
            return run

        names = list(readers)
        timings = time_interleaved([read_all(readers[n]) for n in names], torch.device("cpu"), warmup=1,
                                   repeats=args.repeats, alternate=True)
        pool.shutdown()
    rates = {n: args.images / (t.median_ms / 1e3) for n, t in zip(names, timings)}
    folder = timings[names.index("folder")].samples_ms

    def ratio(name: str) -> float:
        # Per round (the passes of one round ran back to back), then the median: load from other processes on
        # a shared machine moves whole rounds, not one reader against the other.
        return round(statistics.median(f / s for f, s in zip(folder, timings[names.index(name)].samples_ms)), 3)

    return {"images": args.images, "size": args.size, "bucket": args.bucket, "per_shard": args.per_shard,
            "threads": args.threads, "repeats": args.repeats, "images_per_s": {k: round(v, 1) for k, v in rates.items()},
            "webdataset_vs_folder": ratio("webdataset"), "parquet_vs_folder": ratio("parquet")}


def bench_ray(args) -> dict:
    from zturbo.config import ServeConfig
    from zturbo.model import VAE
    from zturbo.serve import encode_collection
    from zturbo.serve.ray_engine import encode_with_ray, start_ray

    images = jpeg_images(args.images, args.size)
    widths = [int(c) for c in args.channels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, tars, _ = write_inputs(root, images, args.per_shard)
        torch.manual_seed(0)
        model = VAE(block_out_channels=widths, layers_per_block=1, latent_channels=4, sample_size=args.bucket,
                    mid_block_add_attention=False).save_pretrained(root / "model")
        cfg = ServeConfig(size=args.bucket, resize="square", batch_size=args.batch, device="cpu",
                          output_format="webdataset")
        ray = start_ray(None, os.cpu_count(), quiet=True)
        runs: dict[str, list[float]] = {"native": [], "ray": []}
        for r in range(args.repeats + 1):  # the first round warms both up (file cache, Ray workers) and is dropped
            for engine in ("native", "ray") if r % 2 == 0 else ("ray", "native"):
                out = root / f"out-{engine}-{r}"
                if engine == "native":
                    report = encode_collection(model, tars, out, cfg)
                else:
                    report = encode_with_ray(model, tars, out, cfg, quiet=True)
                assert report.processed == args.images, report.to_dict()
                if r:
                    runs[engine].append(report.images_per_second)
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"images": args.images, "size": args.bucket, "channels": widths, "batch": args.batch,
            "cores": os.cpu_count(), "repeats": args.repeats, "images_per_s": {k: [round(x, 2) for x in v]
                                                                             for k, v in runs.items()},
            "ray_vs_native": round(med["ray"] / med["native"], 3)}


def bench_memory(args) -> dict:
    from zturbo.data import demo_images as _demo  # noqa: F401 - the child imports zturbo itself

    images = jpeg_images(args.images, 48)
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "tiny.toml").write_text(TINY_TRAIN)
        for shards in (10, 1000):
            per = -(-len(images) // shards)
            _, spec, _ = write_inputs(root / f"s{shards}", images, per)
            code = ("import resource, sys; from zturbo.cli import run; "
                    f"rc = run(['train', '-c', {str(root / 'tiny.toml')!r}, '--data', {spec!r}, '-o', "
                    f"{str(root / f'run{shards}')!r}, '--max-steps', '{args.steps}', '--quiet']); "
                    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            peaks[shards] = {"peak_rss_mib": round(int(out.stdout.split()[-1]) / 1024, 1),
                             "seconds": round(time.perf_counter() - t0, 1)}
    return {"images": args.images, "steps": args.steps, "runs": peaks,
            "rss_1000_vs_10": round(peaks[1000]["peak_rss_mib"] / peaks[10]["peak_rss_mib"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["reader", "ray", "memory"])
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--size", type=int, default=512, help="side of the JPEGs written")
    parser.add_argument("--bucket", type=int, default=256, help="side the reader resizes to (and encodes at)")
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None,
                        help="reader threads (default: what serve-batch reads with beside compute on this machine)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--channels", default="64,128,128", help="ray: the encoded model's block widths")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="memory: training steps")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    args.images = args.images or {"reader": 400, "ray": 128, "memory": 2000}[args.what]
    if args.threads is None:
        from zturbo.serve.plan import reader_threads

        args.threads = reader_threads()
    result = {"reader": bench_reader, "ray": bench_ray, "memory": bench_memory}[args.what](args)
    result["what"] = args.what
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
