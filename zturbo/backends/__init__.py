"""One encode/decode interface over every inference engine.

    backend = open_backend("runs/demo", device="cpu")          # picks the engine the artifact needs
    backend = open_backend("out/onnx", job="serve-batch")      # an ONNX export: onnxruntime
    backend = create_backend("torch", "runs/demo", device="cpu", precision="fp32")
    latents = backend.encode(images)      # (B, 3, H, W) in [-1, 1] -> unscaled latent mean
    images = backend.decode(latents)      # -> (B, 3, H, W) in [-1, 1]

eval, bench and serve-batch use this; a new backend is one module plus one line
in ``_REGISTRY``. The backend modules import their optional packages (onnxruntime,
tensorrt) only when a backend is built, so every name here imports everywhere.
"""

from __future__ import annotations

import os
from typing import Any

from zturbo.artifacts import ALL_KINDS, TORCH_KINDS, Artifact, Kind, phrase, require
from zturbo.backends.base import Backend
from zturbo.backends.onnx_backend import OnnxBackend
from zturbo.backends.tensorrt_backend import TensorRTBackend
from zturbo.backends.torch_backend import CompiledTorchBackend, TorchBackend
from zturbo.errors import CheckpointError, UsageError
from zturbo.model import Autoencoder

AUTO = "auto"
_REGISTRY: dict[str, type[Backend]] = {
    "torch": TorchBackend,
    "compile": CompiledTorchBackend,
    "onnx": OnnxBackend,
    "trt": TensorRTBackend,
}
# What each backend can run: the torch engines need weights; onnx and trt also export a torch kind on the fly.
_RUNS = {
    "torch": TORCH_KINDS,
    "compile": TORCH_KINDS,
    "onnx": ALL_KINDS,
    "trt": TORCH_KINDS + (Kind.TRT,),
}


def available_backends() -> list[str]:
    return list(_REGISTRY)


def create_backend(name: str, model: Any, **options: Any) -> Backend:
    """Build backend ``name`` for ``model``: a path, an Artifact or a VAE; ``auto`` picks by the artifact."""
    if name == AUTO:
        return open_backend(model, **options)
    try:
        cls = _REGISTRY[name]
    except KeyError:
        choices = ", ".join([AUTO, *_REGISTRY])
        raise UsageError(f"unknown backend '{name}'", f"choose one of: {choices}") from None
    return cls.load(model, **options)


def open_backend(
    model: str | os.PathLike | Artifact | Autoencoder, backend: str = AUTO, *, job: str = "a backend", **options: Any
) -> Backend:
    """The backend for ``model``: the one its kind needs with ``backend="auto"``, else the one named.

    A model path is resolved once (``zturbo.artifacts``); a kind the named backend
    cannot run is refused in one line naming both (``job`` says who asked, e.g.
    ``"eval"``). ``options`` go to the backend (device, precision, ...).
    """
    if isinstance(model, Autoencoder):
        return create_backend("torch" if backend == AUTO else backend, model, **options)
    artifact = require(model, ALL_KINDS, job)
    name = artifact.backend if backend == AUTO else backend
    check_backend(artifact, name, job)
    if options.get("tile") is not None and name != "torch":
        raise UsageError(
            f"--tile runs the model layer by layer in torch; the {name} backend runs whole images",
            "give the model's weights (not an export) with --backend torch or auto",
        )
    return create_backend(name, artifact, **options)


def check_backend(artifact: Artifact, name: str, job: str) -> None:
    """Refuse, in one line naming both kinds, an artifact that backend ``name`` cannot run."""
    if name not in _REGISTRY:
        raise UsageError(f"unknown backend '{name}'", f"choose one of: {', '.join([AUTO, *_REGISTRY])}")
    if artifact.kind not in _RUNS[name]:
        raise CheckpointError(
            f"{artifact.root} is {artifact.kind.phrase}; "
            f"{job} with the {name} backend needs {phrase(_RUNS[name])}"
        )


__all__ = ["AUTO", "Backend", "available_backends", "check_backend", "create_backend", "open_backend"]
