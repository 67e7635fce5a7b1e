"""Reading a VAE from one .safetensors file against reading the same weights from a diffusers folder.

The weights: a FLUX.1-shaped VAE (the ``standard`` profile's architecture, 83.8 M parameters,
random values: reading does not depend on them) in fp32, as BFL ships ``ae.safetensors``
(335 MB). The same tensors are written twice into a temporary folder: as a diffusers folder
(``save_pretrained``: config.json + diffusion_pytorch_model.safetensors) and as one file in
the LDM/BFL layout without zturbo's metadata, as BFL's file is. Each variant is timed from the
path to a VAE in eval mode: ``load_pretrained(folder)`` and ``read_single_file(file, "flux1")``
(the header read, the layout and shapes worked out, the tensors read, renamed and loaded).
Both files sit in the page cache after the warm-up, so the figure compares the work of
reading, not the disk. Interleaved repeats, median; target: single file <= 1.2x the folder.

    python benchmarks/bench_single_file.py
    python benchmarks/bench_single_file.py --repeats 9 --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from zturbo.bench.timing import time_interleaved
from zturbo.config import load_settings
from zturbo.export.single_file import single_file_tensors
from zturbo.model import VAE, load_pretrained
from zturbo.model.single_file import read_single_file

TARGET = 1.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    config = load_settings("standard").model
    torch.manual_seed(0)
    vae = VAE(config).eval()
    with tempfile.TemporaryDirectory(prefix="zturbo-bench-single-") as tmp:
        folder, single = Path(tmp) / "vae", Path(tmp) / "ae.safetensors"
        vae.save_pretrained(folder)
        save_file(single_file_tensors(vae, "ldm"), str(single))  # BFL's layout, no zturbo metadata
        del vae
        sizes = {"folder": sum(p.stat().st_size for p in folder.iterdir()), "single": single.stat().st_size}
        folder_t, single_t = time_interleaved(
            [lambda: load_pretrained(folder), lambda: read_single_file(single, "flux1")],
            torch.device("cpu"), warmup=args.warmup, repeats=args.repeats, alternate=True,
        )
        a, b = read_single_file(single, "flux1").state_dict(), load_pretrained(folder).state_dict()
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ratio = single_t.median_ms / folder_t.median_ms
    result = {
        "parameters": sum(t.numel() for t in a.values() if t.is_floating_point()),
        "folder_bytes": sizes["folder"],
        "single_file_bytes": sizes["single"],
        "folder_median_ms": round(folder_t.median_ms, 1),
        "single_file_median_ms": round(single_t.median_ms, 1),
        "folder_samples_ms": [round(v, 1) for v in folder_t.samples_ms],
        "single_file_samples_ms": [round(v, 1) for v in single_t.samples_ms],
        "ratio_single_over_folder": round(ratio, 3),
        "target": TARGET,
        "same_tensors": same,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"diffusers folder  {sizes['folder'] / 1e6:7.1f} MB  median {folder_t.median_ms:8.1f} ms")
    print(f"single file       {sizes['single'] / 1e6:7.1f} MB  median {single_t.median_ms:8.1f} ms")
    print(f"ratio single/folder {ratio:.3f} (target <= {TARGET}); same tensors: {same}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
