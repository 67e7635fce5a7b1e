"""Training input pipeline: images/s decoding prepared JPEGs at the training size.

    python benchmarks/bench_input.py                        # 1024 px, one core, then the loader with 1..N workers
    python benchmarks/bench_input.py --size 512 --workers 1,2,4,8,16
    python benchmarks/bench_input.py --gpu                  # also nvJPEG on CUDA, batch by batch

Writes ``--images`` JPEGs (the demo photos cut and scaled to ``--size`` squares, quality 95,
as ``zturbo prepare --format jpeg`` writes them) to a temporary folder, then measures:

- one core: ``ImageFolderDataset[i]`` in this process (decode, crop, flip, to float): the
  per-core rate; a host's figure is at most cores x this (the loader's overhead aside);
- the DataLoader the trainer builds, with N worker processes and batches of ``--batch``,
  moving float crops and uint8 crops (``as_uint8``: a quarter of the bytes);
- with ``--gpu``: the same batches read encoded by the workers and decoded on the GPU
  (``EncodedBatch.decode``), and nvJPEG alone on a batch already in memory; and what the
  trainer's ``data.decode = "auto"`` picks for these files on CUDA (``decode_auto``).

Each figure is the median of ``--repeats`` passes over the images (zturbo.bench.timing).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageOps

from zturbo.bench.timing import time_once
from zturbo.data import demo_images
from zturbo.data.datasets import ImageFolderDataset, ResumableSampler, make_loader, to_unit_range
from zturbo.data.jpeg_device import EncodedBatch, decode_on_device


def write_jpegs(folder: Path, count: int, size: int) -> list[Path]:
    sources = []
    for path in demo_images():
        with Image.open(path) as im:
            sources.append(ImageOps.exif_transpose(im).convert("RGB"))
    paths = []
    for i in range(count):
        im = ImageOps.fit(sources[i % len(sources)], (size, size), Image.Resampling.BICUBIC)
        if i // len(sources) % 2:
            im = ImageOps.mirror(im)
        path = folder / f"{i:05d}.jpg"
        im.save(path, quality=95)
        paths.append(path)
    return paths


def median_rate(fn, images: int, repeats: int, device: torch.device | None = None) -> float:
    device = device or torch.device("cpu")
    fn()  # warm-up (file cache, worker start-up, nvJPEG handles)
    times = sorted(time_once(fn, device) for _ in range(repeats))
    return images / (times[len(times) // 2] / 1e3)


def one_core(paths: list[Path], size: int, repeats: int) -> float:
    dataset = ImageFolderDataset(paths, size)
    torch.set_num_threads(1)

    def run():
        for i in range(len(dataset)):
            dataset[(i, i)]

    return median_rate(run, len(paths), repeats)


def loader_rate(paths: list[Path], size: int, batch: int, workers: int, repeats: int, device_decode: bool,
                device: torch.device, as_uint8: bool = False) -> float:
    dataset = ImageFolderDataset(paths, size, device_decode=device_decode, as_uint8=as_uint8)
    sampler = ResumableSampler(dataset, seed=0)
    loader = make_loader(dataset, sampler, batch, workers, pin_memory=device.type == "cuda")
    used = (len(paths) // batch) * batch

    def run():
        for batch in loader:
            b = batch.images
            x = b.decode(device) if isinstance(b, EncodedBatch) else to_unit_range(b.to(device, non_blocking=True))
            del x

    return median_rate(run, used, repeats, device)


def nvjpeg_only(paths: list[Path], batch: int, repeats: int) -> float:
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths[:batch]]
    return median_rate(lambda: decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda"), len(data), repeats,
                       torch.device("cuda"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", default=None, help="comma list (default: 1 up to the usable cores)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="also decode on CUDA (nvJPEG)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    workers = [int(w) for w in args.workers.split(",")] if args.workers else sorted({1, max(1, cores // 2), cores})
    out: dict = {"size": args.size, "images": args.images, "batch": args.batch, "cores": cores,
                 "cpu": os.uname().machine, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images, args.size)
        out["jpeg_kib_mean"] = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        out["one_core_images_per_s"] = one_core(paths, args.size, args.repeats)
        print(f"one core: {out['one_core_images_per_s']:.1f} images/s", flush=True)
        out["loader"], out["loader_uint8"] = {}, {}
        for w in workers:  # float crops (what the trainer used to move) and uint8 crops, back to back
            for key, as_uint8 in (("loader", False), ("loader_uint8", True)):
                rate = loader_rate(paths, args.size, args.batch, w, args.repeats, False, torch.device("cpu"), as_uint8)
                out[key][w] = {"images_per_s": rate, "per_worker": rate / w}
                print(f"{key}, {w} worker(s): {rate:.1f} images/s ({rate / w:.1f} per worker)", flush=True)
        if args.gpu:
            cuda = torch.device("cuda")
            out["gpu_device"] = torch.cuda.get_device_name(cuda)
            out["decode_auto"] = "gpu" if decode_on_device("auto", cuda, paths, args.size) else "cpu"
            print(f"data.decode = auto on CUDA decodes these files on the {out['decode_auto']}", flush=True)
            out["nvjpeg_batch_images_per_s"] = nvjpeg_only(paths, args.batch, args.repeats)
            print(f"nvJPEG alone, batch {args.batch}: {out['nvjpeg_batch_images_per_s']:.1f} images/s", flush=True)
            out["loader_gpu_decode"], out["loader_uint8_cuda"] = {}, {}
            for w in workers:
                rate = loader_rate(paths, args.size, args.batch, w, args.repeats, False, cuda, True)
                out["loader_uint8_cuda"][w] = {"images_per_s": rate, "per_worker": rate / w}
                print(f"loader uint8 -> CUDA, {w} worker(s): {rate:.1f} images/s", flush=True)
                rate = loader_rate(paths, args.size, args.batch, w, args.repeats, True, cuda, True)
                out["loader_gpu_decode"][w] = {"images_per_s": rate, "per_worker": rate / w}
                print(f"loader + GPU decode, {w} worker(s): {rate:.1f} images/s", flush=True)
    print(f"\n| input, {args.size} px JPEG q95 (~{out['jpeg_kib_mean']:.0f} KiB) | images/s |\n| --- | --- |")
    print(f"| one core, decode + crop + float | {out['one_core_images_per_s']:.1f} |")
    for w, r in out["loader"].items():
        u = out["loader_uint8"][w]
        print(f"| loader, {w} worker(s) of {cores} cores, float / uint8 crops | {r['images_per_s']:.1f} / "
              f"{u['images_per_s']:.1f} ({u['per_worker']:.1f} per worker, uint8) |")
    if args.gpu:
        print(f"| nvJPEG alone, batch {args.batch} ({out['gpu_device']}); data.decode = auto picks "
              f"{out['decode_auto']} | {out['nvjpeg_batch_images_per_s']:.1f} |")
        for w, r in out["loader_gpu_decode"].items():
            print(f"| loader to CUDA, {w} worker(s): uint8 crops / GPU decode | "
                  f"{out['loader_uint8_cuda'][w]['images_per_s']:.1f} / {r['images_per_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
