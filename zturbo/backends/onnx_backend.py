"""ONNX Runtime backend: CPU, CUDA (with IO binding) and TensorRT execution providers."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zturbo.artifacts import ALL_KINDS, Artifact
from zturbo.artifacts import require as require_artifact
from zturbo.backends.base import Backend
from zturbo.config import ExportConfig
from zturbo.errors import MissingDependencyError, UsageError, require
from zturbo.export.layout import META_NAME
from zturbo.export.pipeline import build_files
from zturbo.model import VAE
from zturbo.utils import atomic_write_json, resolve_device, usable_cores

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class ExportedBackend(Backend):
    """Shared parts of backends that run an export folder: metadata, scaling, shape checks."""

    def _init_from_meta(self, root: Path, meta: dict[str, Any]) -> None:
        self.root = root
        self.meta = meta
        self.latent_channels = int(meta["latent_channels"])
        self.downsample_factor = int(meta["downsample_factor"])
        self.apply_scaling = bool(meta["apply_scaling"])
        self.scaling_factor = float(meta["scaling_factor"])
        self.shift_factor = float(meta["shift_factor"])
        self.precision = meta["precision"]
        self.fingerprint = meta.get("encoder_fingerprint")  # None in exports written before it was recorded
        self.dtype = torch.float32  # inputs and outputs; the graph itself may compute in fp16

    def _part(self, part: str) -> dict[str, Any]:
        info = self.meta["parts"].get(part)
        if info is None:
            raise UsageError(f"the export in {self.root} has no {part}", f"export it with --part {part}")
        return info

    def _check_image(self, images: torch.Tensor) -> None:
        f = self.downsample_factor
        if images.dim() != 4 or images.shape[-1] % f or images.shape[-2] % f:
            raise UsageError(
                f"images must be (B, 3, H, W) with H and W multiples of {f}, got {tuple(images.shape)}"
            )

    def _from_graph_latent(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scaling_factor + self.shift_factor if self.apply_scaling else z

    def _to_graph_latent(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift_factor) * self.scaling_factor if self.apply_scaling else z

    def describe(self) -> dict:
        return {**super().describe(), "precision": self.precision, "export": str(self.root)}


def resolve_export(
    model: str | os.PathLike | Artifact | VAE, job: str, **export_options: Any
) -> tuple[Artifact, tempfile.TemporaryDirectory | None]:
    """An export of ``model``: itself when it is one, or an export made now into a temporary folder.

    ``export_options`` are ExportConfig fields (default: fp32 ONNX). Returns the
    export and the object keeping a temporary folder alive (or None).
    """
    if isinstance(model, VAE):
        # A copy on the CPU in fp32: the caller's model stays where and what it is.
        return _export_now(copy.deepcopy(model).float().cpu().eval(), Path("<in-memory>"), export_options)
    artifact = require_artifact(model, ALL_KINDS, job)
    if artifact.is_export:
        return artifact, None
    return _export_now(artifact.load_vae(), artifact.source, export_options)


def _export_now(
    vae: VAE, source: Path, export_options: dict[str, Any]
) -> tuple[Artifact, tempfile.TemporaryDirectory]:
    keep = tempfile.TemporaryDirectory(prefix="zturbo-export-")
    root = Path(keep.name)
    meta = build_files(vae, source, root, root, ExportConfig(**export_options), lambda _: None)
    atomic_write_json(root / META_NAME, meta)
    return require_artifact(root, ALL_KINDS, "a temporary export"), keep


class OnnxBackend(ExportedBackend):
    """Runs ``encoder.onnx`` / ``decoder.onnx`` of an export folder with onnxruntime.

    ``model`` is an export folder, or a checkpoint / VAE that is exported to a
    temporary folder first (fp32; fp16 with ``precision="fp16"``). ``provider`` is 'cpu', 'cuda' or 'tensorrt'
    (default: from ``device``). On CUDA, inputs and outputs stay on the GPU
    through IO binding.
    """

    name = "onnx"

    def __init__(
        self, root: Path, meta: dict, device: torch.device, provider: str, threads: int | None, keep=None
    ):
        ort = require("onnxruntime", "the ONNX Runtime backend", extra="onnx")
        self._init_from_meta(root, meta)
        self._keep = keep
        self.device = device
        self.provider = provider
        available = ort.get_available_providers()
        wanted = _PROVIDERS[provider]
        if wanted[0] not in available:
            raise MissingDependencyError(
                "onnxruntime-gpu",
                f"the ONNX Runtime {provider} provider ({wanted[0]}; this install has "
                f"{', '.join(available)})",
                extra="gpu",
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads or usable_cores()
        options.log_severity_level = 3
        providers: list[Any] = list(wanted)
        if provider == "tensorrt":
            cache = str(root / "ort_trt_cache")
            providers[0] = (
                "TensorrtExecutionProvider",
                {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache},
            )
        self.sessions = {}
        for part, info in meta["parts"].items():
            self.sessions[part] = ort.InferenceSession(str(root / info["onnx"]), options, providers=providers)

    @classmethod
    def load(
        cls,
        model,
        device: str | torch.device = "cpu",
        precision: str | None = None,
        provider: str | None = None,
        threads: int | None = None,
        **_: Any,
    ) -> OnnxBackend:
        ort = require("onnxruntime", "the ONNX Runtime backend", extra="onnx")
        if device == "auto":  # the GPU only when this onnxruntime can use it
            has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
            device = "cuda" if has_cuda and torch.cuda.is_available() else "cpu"
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        provider = provider or ("cuda" if dev.type == "cuda" else "cpu")
        if provider not in _PROVIDERS:
            raise UsageError(
                f"unknown onnxruntime provider '{provider}'", f"choose one of: {', '.join(_PROVIDERS)}"
            )
        if provider != "cpu" and dev.type != "cuda":
            dev = resolve_device("cuda")
        options = {"precision": precision} if precision in ("fp32", "fp16") else {}
        export, keep = resolve_export(model, "the onnx backend", **options)
        return cls(export.root, export.export_meta, dev, provider, threads, keep)

    def _run(self, part: str, x: torch.Tensor) -> torch.Tensor:
        session = self.sessions.get(part) or self._part(part)
        info = self.meta["parts"][part]
        if self.device.type == "cuda":
            return self._run_bound(session, info, x)
        feed = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(session.run([info["output"]], {info["input"]: feed})[0])

    def _run_bound(self, session, info: dict, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32).contiguous()
        b, _, h, w = x.shape
        f = self.downsample_factor
        if info["input"] == "image":
            shape = (b, self.latent_channels, h // f, w // f)
        else:
            shape = (b, int(self.meta["model"]["out_channels"]), h * f, w * f)
        out = torch.empty(shape, dtype=torch.float32, device=self.device)
        index = self.device.index or 0
        torch.cuda.current_stream(self.device).synchronize()  # onnxruntime reads x on its own stream
        binding = session.io_binding()
        binding.bind_input(info["input"], "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(info["output"], "cuda", index, np.float32, shape, out.data_ptr())
        session.run_with_iobinding(binding)
        return out

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check_image(images)
        return self._from_graph_latent(self._run("encoder", images))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run("decoder", self._to_graph_latent(latents))

    def describe(self) -> dict:
        return {**super().describe(), "provider": self.provider}
