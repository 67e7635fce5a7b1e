"""Exported backends against torch on the same model and input, timed side by side.

CPU (default): ONNX Runtime (CPU provider) vs torch eager fp32 on a fast-profile
VAE (random weights: speed does not depend on them), interleaved repeats, median.
Target: ONNX Runtime <= 0.85x torch's time on the decoder at 256x256.

--gpu: torch bf16 eager vs every other backend this GPU machine offers (torch.compile
bf16, bf16 channels_last, onnxruntime CUDA / TensorRT providers and TensorRT engines
when installed); the best is reported as a ratio to torch bf16.

    python benchmarks/bench_export.py                     # CPU, decoder at 256
    python benchmarks/bench_export.py --parts encoder,decoder --size 256 --json out.json
    python benchmarks/bench_export.py --gpu --size 1024 --batch 1
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
from _common import model_input

from zturbo.backends import create_backend
from zturbo.bench.timing import synchronize, time_interleaved, time_once
from zturbo.config import ExportConfig, load_settings
from zturbo.export.pipeline import export_model
from zturbo.model import VAE
from zturbo.bench.flops import vae_flops


def _inputs(vae: VAE, part: str, batch: int, size: int, device) -> torch.Tensor:
    return model_input(vae.config, "encode" if part == "encoder" else "decode", size, batch, device)


def _call(backend, part: str, x: torch.Tensor):
    fn = backend.encode if part == "encoder" else backend.decode
    return lambda: fn(x)


def interleaved(calls: dict, device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call; backends alternate within each repeat so load changes hit all alike.

    Timed by the host clock between device-wide synchronisations: ONNX Runtime and TensorRT
    queue their work on their own CUDA streams, which torch's events would not bracket.
    """
    timings = time_interleaved(list(calls.values()), device, warmup=warmup, repeats=repeats,
                               sync=lambda: synchronize(device))
    return {name: t.median_ms / 1e3 for name, t in zip(calls, timings)}


def bench_cpu(
    vae: VAE, parts: list[str], batch: int, size: int, repeats: int, warmup: int, work: Path
) -> list[dict]:
    export_ms = time_once(
        lambda: export_model(_save(vae, work), work / "onnx", ExportConfig(parts=parts, size=(size, size, size))),
        torch.device("cpu"),
    )
    print(f"exported {','.join(parts)} in {export_ms / 1e3:.1f} s", flush=True)
    backends = {
        "torch": create_backend("torch", copy.deepcopy(vae), device="cpu", precision="fp32"),
        "torch-cl": create_backend("torch", copy.deepcopy(vae), device="cpu", precision="fp32", channels_last=True),
        "onnx": create_backend("onnx", work / "onnx", device="cpu"),
    }
    flops = vae_flops(vae.config, size, batch)
    rows = []
    for part in parts:
        x = _inputs(vae, part, batch, size, "cpu")
        times = interleaved({n: _call(b, part, x) for n, b in backends.items()}, torch.device("cpu"), repeats,
                            warmup)
        gflop = flops["encode" if part == "encoder" else "decode"] / 1e9
        rows.append(
            {
                "part": part,
                "batch": batch,
                "size": size,
                "gflop": gflop,
                "torch_ms": times["torch"] * 1e3,
                "torch_cl_ms": times["torch-cl"] * 1e3,
                "onnx_ms": times["onnx"] * 1e3,
                "torch_gflops": gflop / times["torch"],
                "onnx_gflops": gflop / times["onnx"],
                "ratio": times["onnx"] / times["torch"],
                "ratio_vs_channels_last": times["onnx"] / times["torch-cl"],
            }
        )
    return rows


def _save(vae: VAE, work: Path) -> Path:
    path = work / "model"
    if not path.exists():
        vae.save_pretrained(path)
    return path


def gpu_candidates(vae: VAE, parts: list[str], size: int, work: Path) -> dict:
    """Every backend this machine can run, besides the torch bf16 baseline; skipped ones with their reason."""
    out: dict = {}
    skipped: dict[str, str] = {}
    # Each torch backend gets its own copy: they move and re-layout the module in place.
    out["compile-bf16"] = lambda: create_backend(
        "compile", copy.deepcopy(vae), device="cuda", precision="bf16"
    )
    out["torch-bf16-channels_last"] = lambda: create_backend(
        "torch", copy.deepcopy(vae), device="cuda", precision="bf16", channels_last=True
    )
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    if "CUDAExecutionProvider" in providers or "TensorrtExecutionProvider" in providers:
        export_model(_save(vae, work), work / "onnx16", ExportConfig(parts=parts, precision="fp16"))
        if "CUDAExecutionProvider" in providers:
            out["onnx-cuda-fp16"] = lambda: create_backend("onnx", work / "onnx16", device="cuda")
        if "TensorrtExecutionProvider" in providers:
            out["onnx-trt-fp16"] = lambda: create_backend("onnx", work / "onnx16", provider="tensorrt")
    else:
        skipped["onnx-cuda"] = (
            f"onnxruntime has no CUDA provider here ({', '.join(providers) or 'not installed'})"
        )
    try:
        import tensorrt  # noqa: F401

        cfg = ExportConfig(
            format="trt", precision="fp16", parts=parts, batch=(1, 1, 8), size=(256, size, size)
        )
        export_model(_save(vae, work), work / "trt", cfg)
        out["tensorrt-fp16"] = lambda: create_backend("trt", work / "trt", device="cuda")
    except ImportError:
        skipped["tensorrt"] = "tensorrt is not installed"
    except Exception as exc:  # noqa: BLE001 - a failed engine build is reported, not fatal
        skipped["tensorrt"] = f"engine build failed: {str(exc).splitlines()[0]}"
    return {"make": out, "skipped": skipped}


def bench_gpu(
    vae: VAE, parts: list[str], batch: int, size: int, repeats: int, warmup: int, work: Path
) -> dict:
    baseline = create_backend("torch", copy.deepcopy(vae), device="cuda", precision="bf16")
    found = gpu_candidates(vae, parts, size, work)
    rows, failed = [], dict(found["skipped"])
    for part in parts:
        x = _inputs(vae, part, batch, size, "cuda")
        calls = {"torch-bf16": _call(baseline, part, x)}
        for name, make in found["make"].items():
            try:
                call = _call(make(), part, x)
                call()  # compile / first run outside the timing
                calls[name] = call
            except Exception as exc:  # noqa: BLE001 - report and go on with the others
                failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        times = interleaved(calls, torch.device("cuda"), repeats, warmup)
        best = min((n for n in times if n != "torch-bf16"), key=times.get, default="torch-bf16")
        rows.append(
            {
                "part": part,
                "batch": batch,
                "size": size,
                **{f"{n}_ms": t * 1e3 for n, t in times.items()},
                "best": best,
                "best_ratio": times[best] / times["torch-bf16"],
            }
        )
    return {"rows": rows, "skipped": failed, "gpu": torch.cuda.get_device_name()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="fast")
    ap.add_argument("--parts", default="decoder")
    ap.add_argument("--size", type=int, default=None, help="default 256 on CPU, 1024 with --gpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="default 5 on CPU, 10 with --gpu")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    parts = [p for p in args.parts.split(",") if p]
    size = args.size or (1024 if args.gpu else 256)
    repeats = args.repeats or (10 if args.gpu else 5)
    torch.manual_seed(0)
    vae = VAE(load_settings(args.profile).model).eval()
    device_info = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="zturbo-bench-export-") as tmp:
        if args.gpu:
            if not torch.cuda.is_available():
                raise SystemExit("--gpu needs CUDA")
            result = bench_gpu(vae, parts, args.batch, size, repeats, args.warmup, Path(tmp))
            print(
                f"\n{args.profile} profile on {result['gpu']}: torch bf16 eager vs the other backends (median ms)"
            )
            for r in result["rows"]:
                cols = "  ".join(f"{k[:-3]} {v:.2f}" for k, v in r.items() if k.endswith("_ms"))
                print(
                    f"{r['part']:8s} {r['batch']}x{r['size']}  {cols}  best {r['best']} {r['best_ratio']:.2f}x"
                )
            for name, why in result["skipped"].items():
                print(f"  skipped {name}: {why}")
        else:
            import onnxruntime

            rows = bench_cpu(vae, parts, args.batch, size, repeats, args.warmup, Path(tmp))
            device_info["onnxruntime"] = onnxruntime.__version__
            result = {"rows": rows}
            print(
                f"\n{args.profile} profile, CPU, {torch.get_num_threads()} torch threads, median of {repeats}"
            )
            print(
                f"{'part':8s} {'input':>8s} {'GFLOP':>7s} {'torch ms':>9s} {'onnx ms':>9s} "
                f"{'torch GFLOP/s':>13s} {'onnx GFLOP/s':>12s} {'onnx/torch':>10s} "
                f"{'torch-cl ms':>11s} {'onnx/torch-cl':>13s}"
            )
            for r in rows:
                inp = f"{r['batch']}x{r['size']}"
                print(
                    f"{r['part']:8s} {inp:>8s} {r['gflop']:7.1f} {r['torch_ms']:9.1f} {r['onnx_ms']:9.1f} "
                    f"{r['torch_gflops']:13.1f} {r['onnx_gflops']:12.1f} {r['ratio']:10.2f}x "
                    f"{r['torch_cl_ms']:11.1f} {r['ratio_vs_channels_last']:12.2f}x"
                )
    result.update(profile=args.profile, repeats=repeats, **device_info)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
