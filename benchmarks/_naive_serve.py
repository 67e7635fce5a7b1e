"""The naive loops the pipeline is measured against: load, compute, save, one item at a time."""

from __future__ import annotations

from pathlib import Path

import torch

from zturbo.data.images import open_image, pil_to_tensor, resize_to_bucket, tensor_to_uint8


def naive_encode(backend, paths: list[Path], out_dir: str | Path, size: int) -> list[Path]:
    """What a first script does: no batching, no overlap; one .safetensors per image. Returns the files."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, path in enumerate(paths):
        im, _ = resize_to_bucket(open_image(path), (size, size))
        latent = backend.encode(pil_to_tensor(im)[None].to(backend.device))
        files.append(out_dir / f"{i:06d}.safetensors")
        save_file({"latent": latent[0].to("cpu", torch.float32).contiguous()}, str(files[-1]))
    return files


def naive_decode(backend, latent_files: list[Path], out_dir: str | Path) -> int:
    """The same for decoding: load one latent file, decode it, save a PNG (the pipeline's PNG settings)."""
    from PIL import Image
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(latent_files):
        z = load_file(str(path))["latent"][None].to(backend.device)
        Image.fromarray(tensor_to_uint8(backend.decode(z))[0]).save(out_dir / f"{i:06d}.png", compress_level=1)
    return len(latent_files)
