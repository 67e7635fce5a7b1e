"""Where the decoder's time goes: a torch.profiler trace summarised by op family.

    python benchmarks/bench_cli_profile.py --device cuda --resolution 1024 --batch 8 --precision bf16 --channels-last

Prints the share of each op family (convolution, GroupNorm, SiLU, upsampling,
attention with its projections, residual adds, padding) and the top kernels by
self CUDA time (top ops by self CPU time on a CPU). Optionally writes the
table as JSON and the raw trace as a Chrome trace.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from _common import is_cuda_event, model_input, profile_calls, profiler_us, summarise_profile

# A family's time is the inclusive time of the outermost op of that family in each call tree
# (a bias add inside a convolution counts as convolution), so the shares add up to 100%;
# kernels under no family op (layout copies, casts) are "other".
FAMILY_ROOTS = {
    "conv": ("aten::convolution",),
    "groupnorm": ("aten::group_norm",),
    "silu": ("aten::silu_", "aten::silu"),
    "upsample": ("aten::upsample_nearest2d",),
    "attention": ("aten::scaled_dot_product_attention", "aten::linear"),
    "add": ("aten::add_", "aten::add"),
    "pad": ("aten::pad", "aten::constant_pad_nd"),
}
_FAMILY_OF = {op: fam for fam, ops in FAMILY_ROOTS.items() for op in ops}


def op_families(prof, use_cuda: bool, steps: int, total_ms: float) -> dict:
    """Time per call by op family (the outermost family op of each call tree, inclusive), and each one's share."""
    inclusive = "device_time_total" if use_cuda else "cpu_time_total"
    families = dict.fromkeys(FAMILY_ROOTS, 0.0)

    def walk(event) -> None:
        fam = _FAMILY_OF.get(event.name)
        if fam is not None:
            families[fam] += profiler_us(event, inclusive) / 1000 / steps
            return
        for child in event.cpu_children:
            walk(child)

    for event in prof.events():
        if event.cpu_parent is None and not is_cuda_event(event):
            walk(event)
    families["other"] = max(total_ms - sum(families.values()), 0.0)
    total_ms = total_ms or 1.0
    return {k: {"ms": v, "share": v / total_ms} for k, v in sorted(families.items(), key=lambda kv: -kv[1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="fast")
    parser.add_argument("--part", choices=("decode", "encode"), default="decode")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=3, help="profiled calls after 2 warm-ups")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--trace", type=Path, help="write a Chrome trace here")
    args = parser.parse_args(argv)

    from zturbo.config import load_settings
    from zturbo.model import VAE
    from zturbo.utils import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True  # as zturbo bench measures
    dtype = resolve_dtype(args.precision)
    cfg = load_settings(args.profile).model
    torch.manual_seed(0)
    vae = VAE(cfg).to(device=device, dtype=dtype).eval()
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    vae = vae.to(memory_format=layout)
    x = model_input(cfg, args.part, args.resolution, args.batch, device, dtype).contiguous(memory_format=layout)
    fn = vae.decode if args.part == "decode" else (lambda t: vae.encode(t).mean)

    use_cuda = device.type == "cuda"
    with torch.inference_mode():
        for _ in range(2):
            fn(x)
        if use_cuda:
            torch.cuda.synchronize()
        prof = profile_calls(lambda: fn(x), args.steps, use_cuda)

    summary = summarise_profile(prof, args.steps, args.top, use_cuda)
    summary["families"] = op_families(prof, use_cuda, args.steps, summary["ms_per_call"])
    clock = "CUDA" if use_cuda else "CPU"
    title = (f"{args.profile} {args.part} {args.resolution}px b{args.batch} {args.precision}"
             f"{' channels_last' if args.channels_last else ''} on {device}: "
             f"{summary['ms_per_call']:.2f} ms of {clock} time per call (profiled)")
    print(title)
    print(f"{'family':<12} {'ms/call':>9} {'share':>7}")
    for fam, v in summary["families"].items():
        print(f"{fam:<12} {v['ms']:>9.2f} {v['share'] * 100:>6.1f}%")
    print(f"\ntop {len(summary['top'])} {'kernels' if use_cuda else 'ops'} by self {clock} time")
    print(f"{'name':<90} {'calls':>6} {'ms/call':>9} {'share':>7}")
    for row in summary["top"]:
        print(f"{row['name'][:90]:<90} {row['calls']:>6} {row['ms']:>9.3f} {row['share'] * 100:>6.1f}%")
    if args.json:
        args.json.write_text(json.dumps({"title": title, "clock": clock, **summary}, indent=2) + "\n")
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
