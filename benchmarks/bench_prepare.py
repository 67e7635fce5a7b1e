"""Throughput of `zturbo prepare` against a naive single-process Pillow loop, same run, same machine.

    python benchmarks/bench_prepare.py                 # 200 generated 3000x2000 JPEGs -> 512 px
    python benchmarks/bench_prepare.py --count 40 --json bench-prepare.json

The images are generated in a temp folder (photo content with per-image grain, so
every file is distinct) and deleted afterwards. They are split into chunks; each chunk
is prepared by both methods back to back, alternating which goes first, so machine
noise hits both alike. Reported: images/s of each over all images, their ratio, the
median per-chunk ratio, output bytes, and the PSNR of prepare's output against the
naive output (the draft-decode and reduce fast path must not change the picture).

CPU milliseconds per image (all processes) are printed too: on a shared machine whose
kernel shares CPU per session (sched_autogroup), more worker processes do not buy more
CPU, so the wall-clock gain from parallelism only shows on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zturbo.bench.timing import time_once, time_rounds
from zturbo.utils import usable_cores

_BASES: list[np.ndarray] = []  # filled before the generator pool forks, shared copy-on-write


def make_bases(count: int, width: int, height: int) -> None:
    """Photo content at full size with film-like grain (what camera JPEGs decode to)."""
    from zturbo.data import demo_images

    photos = demo_images()
    for i in range(count):
        with Image.open(photos[i % len(photos)]) as im:
            im = im.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        grain = np.random.default_rng(i).normal(0, 6, (height, width, 1)).astype(np.float32)
        _BASES.append(np.clip(np.asarray(im, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


def make_image(args: tuple[Path, int]) -> None:
    path, index = args
    arr = _BASES[index % len(_BASES)].copy()
    rng = np.random.default_rng(1000 + index)
    y, x = rng.integers(0, arr.shape[0] - 64), rng.integers(0, arr.shape[1] - 64)
    arr[y : y + 64, x : x + 64] = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # every file distinct
    Image.fromarray(arr).save(path, "JPEG", quality=90)


def naive(files: list[Path], out: Path, size: int) -> None:
    """The loop the seed's preprocess step amounts to: full decode, LANCZOS, crop, PNG."""
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        im = Image.open(f).convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im.crop((left, top, left + size, top + size)).save(out / f"{f.stem}.png")


def ours(src: Path, out: Path, size: int, workers: int) -> None:
    from zturbo.config import PrepareConfig
    from zturbo.data.prepare import prepare_dataset

    prepare_dataset(src, out, PrepareConfig(size=size, workers=workers, val_fraction=0.0))


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (prepare's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def counting_cpu(fn, cpu_times: list[float]):
    """``fn`` that also appends the CPU seconds each call took: on a shared machine the CPU
    figure is the steadier measure of work than the wall clock."""

    def call(*args) -> None:
        cpu = cpu_seconds()
        fn(*args)
        cpu_times.append(cpu_seconds() - cpu)

    return call


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.png"))


def main() -> int:
    from zturbo.data.prepare import resolve_workers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--width", type=int, default=3000)
    parser.add_argument("--height", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None, help="prepare's workers (default: all cores)")
    parser.add_argument("--no-single", action="store_true", help="skip the 1-worker prepare run")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    workers = resolve_workers(args.workers)

    tmp = Path(tempfile.mkdtemp(prefix="zturbo-bench-prepare-"))
    try:
        chunks = [tmp / f"in{c}" for c in range(args.chunks)]
        for c in chunks:
            c.mkdir()
        jobs = [(chunks[i % args.chunks] / f"img{i:04d}.jpg", i) for i in range(args.count)]

        def generate() -> None:
            make_bases(min(8, args.count), args.width, args.height)
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                list(pool.map(make_image, jobs, chunksize=4))
            _BASES.clear()

        generate_ms = time_once(generate, torch.device("cpu"))
        src_bytes = sum(p.stat().st_size for p in tmp.rglob("*.jpg"))
        print(
            f"generated {args.count} {args.width}x{args.height} JPEGs ({src_bytes / 1e6:.0f} MB) "
            f"in {generate_ms / 1e3:.1f} s",
            file=sys.stderr,
        )

        files = {c: sorted(src.glob("*.jpg")) for c, src in enumerate(chunks)}
        cpu_times: dict[str, list[float]] = {"naive": [], "ours": [], "ours1": []}
        runners = {
            "naive": lambda c: naive(files[c], tmp / f"naive{c}", args.size),
            "ours": lambda c: ours(chunks[c], tmp / f"ours{c}", args.size, workers),
        }
        if not args.no_single:
            runners["ours1"] = lambda c: ours(chunks[c], tmp / f"ours1_{c}", args.size, 1)
        # Round c prepares chunk c by every method, the order reversed in odd rounds.
        timings = time_rounds(
            [counting_cpu(fn, cpu_times[name]) for name, fn in runners.items()],
            torch.device("cpu"), rounds=args.chunks, alternate=True,
        )
        times = {name: [ms / 1e3 for ms in t.samples_ms] for name, t in zip(runners, timings)}
        times.setdefault("ours1", [])
        print("per chunk: " + "; ".join(f"{k} " + ", ".join(f"{v:.1f}" for v in vs) + " s"
                                        for k, vs in times.items() if vs), file=sys.stderr)

        n = args.count
        naive_ips = n / sum(times["naive"])
        ours_ips = n / sum(times["ours"])
        chunk_ratios = [a / b for a, b in zip(times["naive"], times["ours"])]
        quality = []
        for f in sorted(chunks[0].glob("*.jpg"))[:10]:
            a = np.asarray(Image.open(tmp / "naive0" / f"{f.stem}.png"))
            b = np.asarray(Image.open(tmp / "ours0" / "train" / f"{f.stem}_jpg.png"))
            quality.append(psnr(a, b))
        result = {
            "images": n,
            "source": f"{args.width}x{args.height} JPEG q90",
            "size": args.size,
            "workers": workers,
            "naive_images_per_s": round(naive_ips, 2),
            "prepare_images_per_s": round(ours_ips, 2),
            "speedup": round(ours_ips / naive_ips, 2),
            "speedup_median_chunk": round(statistics.median(chunk_ratios), 2),
            "naive_png_bytes_per_image": round(
                sum(folder_bytes(tmp / f"naive{c}") for c in range(args.chunks)) / n
            ),
            "prepare_png_bytes_per_image": round(
                sum(folder_bytes(tmp / f"ours{c}") for c in range(args.chunks)) / n
            ),
            "psnr_prepare_vs_naive_db": round(statistics.median(quality), 1),
            "naive_cpu_ms_per_image": round(1000 * sum(cpu_times["naive"]) / n, 1),
            "prepare_cpu_ms_per_image": round(1000 * sum(cpu_times["ours"]) / n, 1),
            "load_average_1min": round(os.getloadavg()[0], 2),
        }
        if times["ours1"]:
            ours1_ips = n / sum(times["ours1"])
            result["prepare_1worker_images_per_s"] = round(ours1_ips, 2)
            result["speedup_1worker"] = round(ours1_ips / naive_ips, 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nprepare vs naive Pillow loop: {n} x {result['source']} -> {args.size} px PNG")
    print(f"{'method':<34}{'images/s':>10}{'ratio':>8}")
    print(f"{'naive loop (1 process)':<34}{result['naive_images_per_s']:>10.2f}{1.0:>8.2f}")
    if "prepare_1worker_images_per_s" in result:
        print(
            f"{'zturbo prepare, 1 worker':<34}{result['prepare_1worker_images_per_s']:>10.2f}"
            f"{result['speedup_1worker']:>8.2f}"
        )
    print(
        f"{f'zturbo prepare, {workers} workers':<34}{result['prepare_images_per_s']:>10.2f}{result['speedup']:>8.2f}"
    )
    print(
        f"median per-chunk ratio {result['speedup_median_chunk']:.2f}; PSNR prepare vs naive "
        f"{result['psnr_prepare_vs_naive_db']:.1f} dB; PNG bytes/image naive {result['naive_png_bytes_per_image']} "
        f"vs prepare {result['prepare_png_bytes_per_image']}"
    )
    print(
        f"CPU per image: naive {result['naive_cpu_ms_per_image']} ms, prepare {result['prepare_cpu_ms_per_image']} ms "
        f"(all processes); 1-min load average {result['load_average_1min']} on {usable_cores()} cores"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
