"""TensorRT engines built from the exported ONNX graphs.

TensorRT 10.x and 11.x differ in how precision is chosen. 10.x still has the
``BuilderFlag.FP16`` "weak typing" flag, which lets the builder pick fp16
kernels anywhere, including layers the fp16 guard kept in fp32; 11.x removes it
and every network is strongly typed (each tensor's type comes from the ONNX).
Both are built here the 11.x way: from the guarded mixed-precision ONNX, as a
strongly typed network (the ``STRONGLY_TYPED`` creation flag on 10.x, the
default on 11.x), so the fp32 islands survive in the engine on either version.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from zturbo.errors import DeviceError, MissingDependencyError, ZTurboError
from zturbo.utils import atomic_path, atomic_write_bytes

GPU_HINT = (
    "TensorRT engines need an NVIDIA GPU with a CUDA build of PyTorch and the TensorRT Python package: "
    "pip install 'zturbo[gpu]' on such a machine (or export --format onnx here and build the engine there)"
)


def require_tensorrt():
    """Import tensorrt on a machine that can use it, or fail with what is needed."""
    import torch

    try:
        import tensorrt as trt
    except ImportError:
        err = MissingDependencyError("tensorrt", "building and running TensorRT engines", extra="gpu")
        err.hint = f"{err.hint}; TensorRT also needs an NVIDIA GPU"
        raise err from None
    if not torch.cuda.is_available():
        raise DeviceError("TensorRT needs an NVIDIA GPU, and CUDA is not available on this machine", GPU_HINT)
    return trt


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def _network_flags(trt) -> int:
    if trt_major(trt) >= 11:
        return 0  # strongly typed is the only mode
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def environment(trt) -> dict[str, Any]:
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "tensorrt_version": str(trt.__version__),
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "strongly_typed": True,
    }


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    input_name: str,
    shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
    timing_cache: str | Path | None = None,
    workspace_gb: float = 4.0,
    precision: str = "fp16",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build and write one engine; ``shapes`` is the (min, opt, max) optimisation profile of the input."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ZTurboError(f"TensorRT cannot parse {Path(onnx_path).name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp32":
        # TF32 is on by default and would make an "fp32" engine ~1e-3 off torch's fp32.
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *shapes)
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else None
    blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(
        cache, ignore_mismatch=True
    )  # a cache from another GPU/version is just not reused

    if log:
        log(f"building TensorRT engine {Path(plan_path).name} (profile {shapes[0]} .. {shapes[2]})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ZTurboError(
            f"TensorRT could not build an engine from {Path(onnx_path).name}", "see its log above"
        )
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(memoryview(serialized))
    if cache_path is not None:
        atomic_write_bytes(cache_path, memoryview(config.get_timing_cache().serialize()).tobytes())
    return {"plan": Path(plan_path).name, "profile": {"min": shapes[0], "opt": shapes[1], "max": shapes[2]}}
