"""One encode/decode interface over every inference engine.

    backend = create_backend("torch", "runs/demo", device="cpu", precision="fp32")
    latents = backend.encode(images)      # (B, 3, H, W) in [-1, 1] -> unscaled latent mean
    images = backend.decode(latents)      # -> (B, 3, H, W) in [-1, 1]

eval, bench and serve-batch use this; a new backend is one module plus one line
in ``_REGISTRY``.
"""

from __future__ import annotations

import importlib
from typing import Any

from zturbo.backends.base import Backend
from zturbo.errors import UsageError

# name -> "module:class"; imported lazily so optional dependencies stay optional.
_REGISTRY: dict[str, str] = {
    "torch": "zturbo.backends.torch_backend:TorchBackend",
    "compile": "zturbo.backends.torch_backend:CompiledTorchBackend",
    "onnx": "zturbo.backends.onnx_backend:OnnxBackend",
    "trt": "zturbo.backends.tensorrt_backend:TensorRTBackend",
}


def available_backends() -> list[str]:
    return list(_REGISTRY)


def create_backend(name: str, model: Any, **options: Any) -> Backend:
    """Build backend ``name`` for ``model`` (a path any loader accepts, or a VAE for torch)."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown backend '{name}'", f"choose one of: {', '.join(_REGISTRY)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls).load(model, **options)


__all__ = ["Backend", "available_backends", "create_backend"]
