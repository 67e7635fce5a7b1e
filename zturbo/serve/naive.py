"""The naive loop the pipeline is measured against: load, encode, save, one image at a time."""

from __future__ import annotations

from pathlib import Path

import torch

from zturbo.data.images import open_image, pil_to_tensor
from zturbo.serve.inputs import resize_to_bucket


def naive_encode(backend, paths: list[Path], out_dir: str | Path, size: int) -> int:
    """What a first script does: no batching, no overlap; one .safetensors per image. Returns the count."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        im, _ = resize_to_bucket(open_image(path), (size, size))
        latent = backend.encode(pil_to_tensor(im)[None])
        save_file({"latent": latent[0].to("cpu", torch.float32).contiguous()}, str(out_dir / f"{i:06d}.safetensors"))
    return len(paths)
