"""serve-batch throughput: end-to-end pipeline vs the backend's compute alone vs a naive loop.

    python benchmarks/bench_serve.py                 # CPU: ultrafast channels at 32 px, 200 small images, ~1 minute
    python benchmarks/bench_serve.py --gpu           # GPU: fast-profile model at 512 px, 512 images, ~1 minute
    python benchmarks/bench_serve.py --op decode     # decoding: latent shards to PNG images, same sizes
    python benchmarks/bench_serve.py --json out.json

All three run in one process on the same images, model and batch size, interleaved
(compute, end to end, naive; repeated; one more compute at the end). Each end-to-end run
is compared with the compute-only runs just before and after it (their mean), the naive
run with the end-to-end run before it, and the ratios reported are the medians over the
repeats, so a machine that gets busier or quieter during the run cancels out:

* compute only: the backend's ``encode`` on batches already decoded, resized and on
  the device (the ceiling for any pipeline); for ``--op decode``, its ``decode`` on
  latent batches already on the device. Run the way the pipeline runs it: where the
  pipeline uses CPU compute streams, in the same streams with the same thread split
  (and the backend's plain loop with every thread is reported beside it);
* end to end: ``encode_collection`` from image files to shards on disk (reading,
  compute and writing overlapped as the pipeline chooses), into a fresh folder; for
  decode, ``decode_collection`` from those shards to PNG files;
* naive: load, compute and save one item at a time (``_naive_serve.py`` beside this script).

Targets: end to end >= 90% of compute only, and >= 1.5x the naive loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from _naive_serve import naive_decode, naive_encode
from PIL import Image

from zturbo.backends import create_backend
from zturbo.bench.timing import time_once
from zturbo.config import ServeConfig
from zturbo.data.images import open_image
from zturbo.model import VAE
from zturbo.bench.flops import vae_flops
from zturbo.serve import compute_streams, decode_collection, encode_collection
from zturbo.data.images import resize_to_bucket
from zturbo.serve.latents import LatentReader, enumerate_latents

CPU = {
    # Ultrafast-profile channels at 32 px: small enough for 2 cores, and a size where batching pays on a CPU.
    "model": {"block_out_channels": [64, 128, 256, 256], "layers_per_block": 1, "latent_channels": 8},
    "size": 32, "images": 200, "source": (40, 56), "batch": 16, "repeats": 7, "naive_images": 32,
}
GPU = {
    "model": {"block_out_channels": [96, 192, 384, 384], "layers_per_block": 2, "latent_channels": 8},
    "size": 512, "images": 512, "source": (560, 720), "batch": 32, "repeats": 3, "naive_images": 48,
}


def _make_image(job) -> Path:
    folder, i, sides = job
    rng = np.random.default_rng(i)
    w, h = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h) + i % 128], -1)
    arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    path = folder / f"img{i:05d}.{'jpg' if i % 2 else 'png'}"
    Image.fromarray(arr).save(path, quality=92) if path.suffix == ".jpg" else Image.fromarray(arr).save(path)
    return path


def make_images(folder: Path, count: int, sides: tuple[int, int]) -> list[Path]:
    """Photo-like test images (smooth gradients plus noise), half JPEG, half PNG, sides in ``sides``."""
    folder.mkdir(parents=True, exist_ok=True)
    return _parallel_map(_make_image, [(folder, i, sides) for i in range(count)])


def _crop(job) -> np.ndarray:
    path, size = job
    return np.array(resize_to_bucket(open_image(path), (size, size))[0])


def _parallel_map(fn, jobs: list) -> list:
    if len(jobs) < 200:
        return [fn(j) for j in jobs]
    import multiprocessing as mp

    with mp.get_context("fork").Pool() as pool:
        return pool.map(fn, jobs, chunksize=16)


def compute_only(compute, backend, batches: list[torch.Tensor], streams: int = 1, threads: int = 0) -> float:
    """Seconds for the backend to encode (or decode) batches already on the device.

    With ``streams`` > 1, as the pipeline's CPU compute streams run them: that many threads
    each take the next batch not yet taken, each with ``threads`` of torch's threads.
    """
    if streams <= 1:
        def run_loop() -> None:
            for x in batches:
                compute(x)

        return time_once(run_loop, backend.device) / 1000.0
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        todo = iter(batches)
        lock = threading.Lock()

        def stream() -> None:
            while True:
                with lock:
                    x = next(todo, None)
                if x is None:
                    return
                compute(x)

        def run_streams() -> None:
            workers = [threading.Thread(target=stream) for _ in range(streams)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()

        return time_once(run_streams, backend.device) / 1000.0
    finally:
        torch.set_num_threads(saved)


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def _bracketing_mean(runs: list[float]) -> list[float]:
    """For repeat r, the mean of the runs at r and r + 1: the ones just before and after the run it is compared with."""
    return [(runs[r] + runs[r + 1]) / 2 for r in range(len(runs) - 1)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU configuration (needs CUDA)")
    ap.add_argument("--op", default="encode", choices=["encode", "decode"],
                    help="decode: latents (shards from an encode run) to PNG images")
    ap.add_argument("--images", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--reading", default="auto", choices=["auto", "threads", "streams", "phased"])
    ap.add_argument("--streams", type=int, help="CPU compute streams (default: the pipeline's choice)")
    ap.add_argument("--source", help="MIN,MAX side of the generated source images")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    preset = dict(GPU if args.gpu else CPU)
    for key in ("images", "size", "repeats"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if args.source:
        preset["source"] = tuple(int(v) for v in args.source.split(","))
    batch = args.batch_size or preset["batch"]
    size = preset["size"]
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA GPU")
    device = "cuda" if args.gpu else "cpu"

    torch.manual_seed(0)
    vae = VAE(**preset["model"], sample_size=size)
    backend = create_backend("torch", vae, device=device, precision=args.precision)
    flops = vae_flops(vae.config, size)[args.op]

    with tempfile.TemporaryDirectory(prefix="zturbo-bench-serve-") as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "images", preset["images"], preset["source"])
        n = len(paths)
        cfg = ServeConfig(size=size, batch_size=batch, resize="square", precision=args.precision,
                          reading=args.reading, streams=args.streams, shard_size=1000,
                          image_format="png")
        naive_paths = paths[: preset["naive_images"]]
        if args.op == "encode":
            # The exact tensors the pipeline computes on: same crop, resize and normalisation.
            crops = torch.from_numpy(np.stack(_parallel_map(_crop, [(p, size) for p in paths])))
            dev_batches = [
                crops[i : i + batch].to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1).contiguous()
                for i in range(0, n, batch)
            ]
            compute = backend.encode

            def end_to_end(out: Path):
                return encode_collection(None, tmp / "images", out, cfg, backend=backend)

            def naive(out: Path):
                naive_encode(backend, naive_paths, out, size)
        else:
            # Decode what an encode run wrote: its shards for the pipeline, one file per latent for the naive loop.
            encode_collection(None, tmp / "images", tmp / "latents", cfg, backend=backend)
            naive_files = naive_encode(backend, naive_paths, tmp / "naive-latents", size)
            reader = LatentReader()
            latents = torch.stack([reader.load(it) for it in enumerate_latents(tmp / "latents")])
            dev_batches = [latents[i : i + batch].to(device) for i in range(0, n, batch)]
            compute = backend.decode

            def end_to_end(out: Path):
                return decode_collection(None, tmp / "latents", out, cfg, backend=backend)

            def naive(out: Path):
                naive_decode(backend, naive_files, out)

        compute_only(compute, backend, dev_batches[:2])  # warm-up: kernels, allocator
        naive(tmp / "warm-naive")
        if args.op == "encode":  # the pipeline's code paths and kernels, on two batches
            warm = tmp / "warm.txt"
            warm.write_text("\n".join(str(p) for p in paths[: 2 * batch]) + "\n")
            warm_report = encode_collection(None, warm, tmp / "warm", cfg, backend=backend)
        else:
            warm_report = end_to_end(tmp / "warm")

        # Compute only, run the way the pipeline runs it: in its CPU compute streams when it uses them
        # ("compute"); the backend's plain one-batch-at-a-time loop as well then ("compute_one_stream").
        streams, threads = compute_streams(streams=args.streams) if warm_report.reading == "streams" else (1, 0)
        compute_only(compute, backend, dev_batches[:2 * streams], streams, threads)
        runs = {"compute": [], "end_to_end": [], "naive": []}
        if streams > 1:
            runs["compute_one_stream"] = []
        reports = []
        for r in range(preset["repeats"]):
            if streams > 1:
                runs["compute_one_stream"].append(n / compute_only(compute, backend, dev_batches))
            runs["compute"].append(n / compute_only(compute, backend, dev_batches, streams, threads))
            report = end_to_end(tmp / f"e2e-{r}")
            assert report.processed == n and report.failed == 0
            runs["end_to_end"].append(n / report.wall_seconds)
            reports.append(report)
            seconds = time_once(lambda out=tmp / f"naive-{r}": naive(out), backend.device) / 1000.0
            runs["naive"].append(len(naive_paths) / seconds)
        runs["compute"].append(n / compute_only(compute, backend, dev_batches, streams, threads))

    med = {k: statistics.median(v) for k, v in runs.items()}
    last = reports[len(reports) // 2]
    result = {
        "device": torch.cuda.get_device_name() if args.gpu else "cpu",
        "op": args.op,
        "torch_threads": torch.get_num_threads(),
        "model": preset["model"],
        "size": size,
        "images": n,
        "batch_size": batch,
        "precision": args.precision,
        "reader_threads": last.reader_threads,
        "reading": last.reading,
        "gflop_per_image": round(flops / 1e9, 3),
        "images_per_second": {k: round(v, 2) for k, v in med.items()},
        "runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "end_to_end_vs_compute": round(_median_ratio(runs["end_to_end"], _bracketing_mean(runs["compute"])), 3),
        "end_to_end_vs_naive": round(_median_ratio(runs["end_to_end"], runs["naive"]), 3),
        "compute_streams": {"streams": streams, "threads_per_stream": threads} if streams > 1 else None,
        # Inside the end-to-end run: the share of its wall time the device spent computing
        # (1.0 = reading and writing fully hidden; below the compute-only ratio = CPU contention).
        "compute_share_of_end_to_end": round(last.compute_seconds / last.wall_seconds, 3),
        "pipeline_seconds": {
            "wall": round(last.wall_seconds, 3), "read_cpu_summed": round(last.read_seconds, 3),
            "wait_for_input": round(last.wait_seconds, 3), "compute": round(last.compute_seconds, 3),
            "write": round(last.write_seconds, 3),
        },
        "targets": {"end_to_end_vs_compute": 0.9, "end_to_end_vs_naive": 1.5},
    }
    print(f"serve-batch {args.op} on {result['device']}: {n} images at {size}x{size}, batch {batch}, "
          f"{args.precision}, {result['gflop_per_image']} GFLOP/image, reading {result['reading']} ({result['reader_threads']} reader threads)")
    print(f"{'variant':<19}{'images/s':>10}  runs")
    for k, values in runs.items():
        print(f"{k:<19}{med[k]:>10.1f}  {values}")
    if streams > 1:
        one = _median_ratio(runs["end_to_end"], runs["compute_one_stream"])
        result["end_to_end_vs_compute_one_stream"] = round(one, 3)
        print(f"compute streams: {streams} x {threads} torch threads; compute_one_stream is the backend's "
              f"plain loop with all {torch.get_num_threads()} threads (end to end / it = {one:.3f})")
    print(f"end-to-end / compute-only = {result['end_to_end_vs_compute']:.3f}  (target >= 0.90)")
    print(f"end-to-end / naive loop   = {result['end_to_end_vs_naive']:.2f}x  (target >= 1.5x)")
    print(f"compute share of the end-to-end wall time = {result['compute_share_of_end_to_end']:.3f}")
    print("pipeline time split (median run): " + ", ".join(f"{k} {v}s" for k, v in result["pipeline_seconds"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
