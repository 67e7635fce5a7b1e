"""TensorRT backend: runs the ``.plan`` engines of an export folder on the GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from zturbo.artifacts import Kind
from zturbo.backends.onnx_backend import ExportedBackend, resolve_export
from zturbo.errors import CheckpointError, UsageError
from zturbo.export.tensorrt import require_tensorrt
from zturbo.utils import resolve_device


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


class _Engine:
    """One deserialised engine with its execution context and I/O names."""

    def __init__(self, trt, runtime, path: Path, info: dict):
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise CheckpointError(
                f"TensorRT cannot load {path.name}: engines only run with the TensorRT version and GPU they were "
                "built for",
                "rebuild it on this machine: zturbo export CHECKPOINT --trt --out DIR",
            )
        self.engine = engine
        self.context = engine.create_execution_context()
        self.input, self.output = info["input"], info["output"]
        self.in_dtype = _torch_dtype(trt, engine.get_tensor_dtype(self.input))
        self.out_dtype = _torch_dtype(trt, engine.get_tensor_dtype(self.output))
        lo, _, hi = engine.get_tensor_profile_shape(self.input, 0)
        self.min_shape, self.max_shape = tuple(lo), tuple(hi)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        if any(s < lo or s > hi for s, lo, hi in zip(shape, self.min_shape, self.max_shape)):
            raise UsageError(
                f"input {shape} is outside the engine's profile {self.min_shape} .. {self.max_shape}",
                "re-export with a wider --batch / --size range",
            )
        x = x.to(dtype=self.in_dtype).contiguous()
        self.context.set_input_shape(self.input, shape)
        out = torch.empty(
            tuple(self.context.get_tensor_shape(self.output)), dtype=self.out_dtype, device=x.device
        )
        self.context.set_tensor_address(self.input, x.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(x.device).cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return out


class TensorRTBackend(ExportedBackend):
    """Runs an export folder written with ``--format trt`` (engines built for this GPU)."""

    name = "trt"

    def __init__(self, root: Path, meta: dict, device: torch.device, keep=None):
        trt = require_tensorrt()
        self._init_from_meta(root, meta)
        self._keep = keep
        self.device = device
        missing = [p for p, info in meta["parts"].items() if not info.get("plan")]
        if missing:
            raise CheckpointError(
                f"the export in {root} has no TensorRT engine for {', '.join(missing)}",
                "export with --format trt (or --trt) on a machine with an NVIDIA GPU and TensorRT",
            )
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with torch.cuda.device(device):
            self.engines = {
                p: _Engine(trt, runtime, root / info["plan"], info) for p, info in meta["parts"].items()
            }
        self.trt_version = str(trt.__version__)

    @classmethod
    def load(
        cls, model, device: str | torch.device = "cuda", precision: str | None = None, **_: Any
    ) -> TensorRTBackend:
        """``model``: an export folder with engines, or a model path / Artifact / VAE to build engines for now."""
        require_tensorrt()
        dev = (
            device
            if isinstance(device, torch.device)
            else resolve_device("cuda" if device == "auto" else device)
        )
        if dev.type != "cuda":
            raise UsageError("the TensorRT backend runs on CUDA devices only", "use --device cuda")
        # A torch kind or an in-memory VAE: build fp16 (or fp32) engines into a temporary folder first.
        chosen = precision if precision in ("fp32", "fp16") else "fp16"
        export, keep = resolve_export(model, "the trt backend", format="trt", precision=chosen)
        if export.kind is not Kind.TRT:
            raise CheckpointError(
                f"{export.root} is {export.kind.phrase} without TensorRT engines; the trt backend needs a "
                "TensorRT export or a model to build one from",
                "export with --format trt on a machine with an NVIDIA GPU and TensorRT, or use --backend onnx",
            )
        return cls(export.root, export.export_meta, dev, keep)

    def _engine(self, part: str) -> _Engine:
        if part not in self.engines:
            self._part(part)
        return self.engines[part]

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check_image(images)
        z = self._engine("encoder")(images.to(self.device))
        return self._from_graph_latent(z.float())

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._engine("decoder")(self._to_graph_latent(latents.to(self.device, torch.float32))).float()

    def describe(self) -> dict:
        return {**super().describe(), "tensorrt": self.trt_version}
