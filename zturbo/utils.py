"""Small shared helpers: atomic file writes, device resolution, seeding."""

from __future__ import annotations

import os

import torch

from zturbo.errors import DeviceError, UsageError
from zturbo.model.files import (  # noqa: F401 - re-exported
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def resolve_device(name: str = "auto") -> torch.device:
    """Map 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' to a device, failing clearly."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device '{name}' was asked for but CUDA is not available on this machine",
            "use --device cpu, or run on a machine with an NVIDIA GPU and a CUDA build of PyTorch",
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device '{name}' was asked for but MPS is not available", "use --device cpu")
    return device


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(precision: str) -> torch.dtype:
    try:
        return DTYPES[precision]
    except KeyError:
        raise UsageError(f"precision must be one of {', '.join(DTYPES)}, got '{precision}'") from None
