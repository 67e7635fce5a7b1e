"""What this machine has: versions, devices, optional backends (for info, bench reports)."""

from __future__ import annotations

import importlib
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from zturbo.version import __version__


def _version_of(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return getattr(mod, "__version__", "installed")


def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except Exception:  # noqa: BLE001
        return []
    return list(ort.get_available_providers())


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "zturbo": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpus": [],
        "git_commit": git_commit(),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            env["gpus"].append(f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})")
        try:
            import ctypes

            lib = ctypes.CDLL("libcuda.so.1")
            ver = ctypes.c_int()
            lib.cuDriverGetVersion(ctypes.byref(ver))
            env["cuda_driver"] = f"{ver.value // 1000}.{(ver.value % 1000) // 10}"
        except OSError:
            env["cuda_driver"] = None
    env["backends"] = {
        "onnx": _version_of("onnx"),
        "onnxruntime": _version_of("onnxruntime"),
        "onnxruntime_providers": ",".join(onnxruntime_providers()) or None,
        "tensorrt": _version_of("tensorrt"),
        "diffusers": _version_of("diffusers"),
        "lpips": _version_of("lpips"),
    }
    return env
