"""How the upsampling and attention kernels change decode speed, side by side in one run.

    python benchmarks/bench_decoder_variants.py --device cuda                       # fast, 1024 px, b8, bf16
    python benchmarks/bench_decoder_variants.py --device cpu --resolution 256 --batch 1 --precision fp32 --compile none

Variants (see ``zturbo.model.kernels.Kernels``; the function computed is the same):

    baseline     nearest x2 + 3x3 conv, scaled_dot_product_attention, F.group_norm
    subpixel     the upsample conv as a 2x2 conv per output phase (16/36 of the multiply-adds)
    matmul-attn  attention as blocked cuBLAS matmuls + softmax
    triton-gn    GroupNorm (+ SiLU) by the Triton kernels (channels-last CUDA half precision only)
    all          the defaults: all three where they apply

Eager variants are timed interleaved, in NCHW and channels-last. The ``--compile`` variants
are compiled (channels-last) and timed one after another, and the last one compiled is then
profiled: its kernels summed by kind (convolution, fused GroupNorm/SiLU/add, attention, ...).

FLOPs are counted by torch's counter for what each variant executes; ``MFU`` divides that by
time and by a bf16 matmul peak measured in this run. ``baseline-FLOP MFU`` divides the
baseline's FLOPs instead: the same work done, credited at the textbook operation count.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from _common import model_input, profile_calls, summarise_profile

VARIANTS = {
    "baseline": {"upsample": "nearest", "attention": "sdpa", "group_norm": "torch"},
    "subpixel": {"upsample": "subpixel", "attention": "sdpa", "group_norm": "torch"},
    "matmul-attn": {"upsample": "nearest", "attention": "matmul", "group_norm": "torch"},
    "triton-gn": {"upsample": "nearest", "attention": "sdpa", "group_norm": "auto"},
    "all": {"upsample": "subpixel", "attention": "auto", "group_norm": "auto"},
}

# Kernel kinds by name (cuDNN/cuBLAS/CUTLASS/inductor naming); the first match wins.
KINDS = [
    ("attention (fused kernel)", r"fmha|flash|attention|cudnn_.*sdpa"),
    ("groupnorm (+fused)", r"group_norm|RowwiseMoments|groupnorm|native_group|_gn_"),
    ("convolution", r"fprop|dgrad|wgrad|implicit_gemm|xmma_(?!gemm)|cudnn|nhwcAddPadding"),
    ("matmul", r"gemm|nvjet|cutlass|sm90_xmma"),
    ("softmax (+fused)", r"softmax"),
    ("silu/add/copy (fused)", r"triton_|silu"),
    ("upsample", r"upsample"),
    ("elementwise (eager)", r"elementwise|vectorized|copy|CatArray|fill"),
]


def classify(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return kind
    return "other"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", default="fast")
    ap.add_argument("--part", choices=("decode", "encode"), default="decode")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layouts", default="nchw,cl")
    ap.add_argument("--compile", default="baseline,all", help="comma list of variants to compile, or 'none'")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from zturbo.bench.flops import measure_matmul_peak
    from zturbo.bench.timing import synchronize, time_interleaved, time_once
    from zturbo.config import load_settings
    from zturbo.model import VAE
    from zturbo.bench.flops import vae_flops
    from zturbo.model.kernels import Kernels
    from zturbo.utils import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    dtype = resolve_dtype(args.precision)
    cfg = load_settings(args.profile).model
    torch.manual_seed(0)
    vae = VAE(cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)
    x0 = model_input(cfg, args.part, args.resolution, args.batch, device, dtype)
    call = vae.decode if args.part == "decode" else (lambda t: vae.encode(t).mean)

    peak = measure_matmul_peak(device, torch.bfloat16, 8192) if cuda else None
    flops = {}
    for name, kernels in VARIANTS.items():
        flops[name] = vae_flops(cfg, args.resolution, batch=args.batch, kernels=Kernels(**kernels))[args.part]
    # "auto" attention only differs from sdpa in how, not how much: the counter counts both alike.

    def row(name: str, layout: str, backend: str, ms: float) -> dict:
        tflops = flops[name] / (ms / 1e3) / 1e12
        r = {"variant": name, "layout": layout, "backend": backend, "median_ms": round(ms, 3),
             "images_per_s": round(args.batch / (ms / 1e3), 2), "gflop_per_image": round(flops[name] / args.batch / 1e9, 1),
             "tflops": round(tflops, 1)}
        if peak is not None:
            r["mfu"] = round(tflops / peak.tflops, 4)
            r["baseline_flop_mfu"] = round(flops["baseline"] / (ms / 1e3) / 1e12 / peak.tflops, 4)
        return r

    rows: list[dict] = []
    with torch.inference_mode():
        for layout in [lay for lay in args.layouts.split(",") if lay]:
            fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
            vae.to(memory_format=fmt)
            x = x0.contiguous(memory_format=fmt)
            fns, outs = [], {}
            for name, kernels in VARIANTS.items():
                def fn(name=name, kernels=kernels, x=x, outs=outs):
                    vae.set_kernels(**kernels)
                    outs[name] = call(x)
                fns.append(fn)
            timings = time_interleaved(fns, device, warmup=args.warmup, repeats=args.repeats)
            vae.set_kernels(**VARIANTS["all"])
            ref = outs["baseline"].float()
            scale = ref.abs().max().item() or 1.0
            for (name, _), t in zip(VARIANTS.items(), timings):
                r = row(name, layout, "eager", t.median_ms)
                r["max_abs_diff_vs_baseline_rel"] = round((outs[name].float() - ref).abs().max().item() / scale, 5)
                rows.append(r)
                print(json.dumps(r), flush=True)

        compiled_profile = None
        names = [] if args.compile == "none" else [n for n in args.compile.split(",") if n]
        vae.to(memory_format=torch.channels_last)
        x = x0.contiguous(memory_format=torch.channels_last)
        for name in names:
            vae.set_kernels(**VARIANTS[name])
            torch._dynamo.reset()
            fn = torch.compile(call, dynamic=False)
            # Compiling is host work: timed by the host clock, up to the end of the warm-up calls.
            compile_ms = time_once(lambda fn=fn: [fn(x) for _ in range(max(args.warmup, 1))], device,
                                   sync=lambda: synchronize(device))
            (timing,) = time_interleaved([lambda fn=fn: fn(x)], device, warmup=0, repeats=args.repeats)
            r = row(name, "cl", "compile", timing.median_ms)
            r["compile_and_warmup_s"] = round(compile_ms / 1e3, 1)
            rows.append(r)
            print(json.dumps(r), flush=True)
            if cuda and name == names[-1]:
                trace = profile_calls(lambda fn=fn: fn(x), 3, cuda=True)
                compiled_profile = summarise_profile(trace, 3, 12, cuda=True, kind=classify)
        vae.set_kernels(**VARIANTS["all"])

    title = (f"{args.profile} {args.part} {args.resolution}px b{args.batch} {args.precision} on "
             f"{torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}"
             + (f", bf16 matmul peak {peak.tflops:.0f} TFLOP/s (measured)" if peak else ""))
    print("\n" + title)
    print(f"{'variant':<12} {'layout':<6} {'backend':<8} {'ms':>9} {'img/s':>8} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>7} {'base-FLOP MFU':>14}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        bmfu = f"{r['baseline_flop_mfu']:.1%}" if "baseline_flop_mfu" in r else "-"
        print(f"{r['variant']:<12} {r['layout']:<6} {r['backend']:<8} {r['median_ms']:>9.2f} {r['images_per_s']:>8.1f} "
              f"{r['gflop_per_image']:>10.1f} {r['tflops']:>8.1f} {mfu:>7} {bmfu:>14}")
    if compiled_profile:
        print(f"\ncompiled '{names[-1]}' kernels: {compiled_profile['ms_per_call']:.2f} ms of CUDA time per call")
        for kind, v in compiled_profile["kinds"].items():
            print(f"  {kind:<26} {v['ms']:>9.2f} ms {v['share']:>7.1%}")
        for k in compiled_profile["top"]:
            print(f"  {k['ms']:>8.2f} ms x{k['calls']:<3} [{k['kind']}] {k['name'][:110]}")
    if args.json:
        args.json.write_text(json.dumps({"title": title, "peak": peak.to_dict() if peak else None, "rows": rows,
                                         "compiled_profile": compiled_profile}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
