"""Kernel choices for the decoder and the GroupNorm (+ SiLU) dispatch.

GroupNorm (+ SiLU) over half-precision channels-last CUDA maps runs the Triton kernels
of ``zturbo.model.group_norm_triton`` (forward for inference; forward and backward,
differentiable custom ops, under autograd, including the recompute of gradient
checkpointing); everything else takes ``F.group_norm``. Blocked attention is a custom
op too (``zturbo.model.blocks``), because inductor would otherwise pattern-match its
matmuls back into the fused kernel it avoids.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from zturbo.model.group_norm_triton import triton_available

# How three layers are computed (the function is the same either way; tests check it):
#   upsample  "subpixel": nearest x2 then 3x3 conv computed as one 2x2 conv on the low-resolution
#             input with 4x the output channels, then the four phases interleaved. Each output
#             pixel of a 3x3 conv over a nearest-upsampled map sees only a 2x2 window of the
#             source, so this does 16/36 of the multiply-adds and never builds the upsampled
#             input. "nearest": the textbook interpolate + conv.
#   attention "auto": on CUDA, in half precision, without autograd, and for head sizes the
#             fused kernels do not take (> 256, e.g. 384), plain matmuls + softmax in blocks
#             (cuBLAS runs them near the matmul peak; the memory-efficient kernel, the only
#             fused one for such heads, does not). Otherwise scaled_dot_product_attention.
#             "sdpa" always uses it, "matmul" the blocked matmuls whenever autograd is off.
#   group_norm "auto": the Triton kernels (zturbo.model.group_norm_triton) for half-precision
#             channels-last CUDA tensors, with or without autograd; "torch": always F.group_norm.
CHOICES = {"upsample": ("subpixel", "nearest"), "attention": ("auto", "sdpa", "matmul"), "group_norm": ("auto", "torch")}


@dataclass
class Kernels:
    """How one model computes its upsampling, attention and GroupNorm: state of the model, shared by its
    layers (``VAE.kernels``), never of the process. ``set`` changes it in place; ``using`` for a while."""

    upsample: str = "subpixel"
    attention: str = "auto"
    group_norm: str = "auto"

    def set(self, **choices: str) -> dict[str, str]:
        """Change the named choices; returns the previous ones (all three)."""
        for name, value in choices.items():
            if name not in CHOICES or value not in CHOICES[name]:
                raise ValueError(f"{name}={value!r}: choose {name} from {CHOICES.get(name, ())}")
        previous = self.as_dict()
        for name, value in choices.items():
            setattr(self, name, value)
        return previous

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    @contextmanager
    def using(self, **choices: str) -> Iterator[Kernels]:
        previous = self.set(**choices)
        try:
            yield self
        finally:
            self.set(**previous)


MIN_ELEMENTS = 1 << 22  # below this the launch overhead of the small merge ops dominates

_TRITON_FAILED: list[str] = []  # the first error, once the kernels failed to build or launch here
# Non-reentrant checkpointing stops a recompute early by raising this through the forward:
# control flow, not a kernel failure.
_CHECKPOINT_STOP = getattr(torch.utils.checkpoint, "_StopRecomputationError", ())


def use_triton_group_norm(x: torch.Tensor, choice: str = "auto") -> bool:
    return (
        choice == "auto"
        and triton_available()
        and not _TRITON_FAILED
        and x.is_cuda
        and x.dim() == 4
        and x.dtype in (torch.float16, torch.bfloat16)
        and x.numel() >= MIN_ELEMENTS
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def _note_failure(exc: Exception) -> None:
    _TRITON_FAILED.append(f"{type(exc).__name__}: {exc}")
    warnings.warn(f"Triton GroupNorm kernels unavailable here, using PyTorch's: {_TRITON_FAILED[0]}",
                  RuntimeWarning, stacklevel=3)


def probe_triton_group_norm(device: torch.device, dtype: torch.dtype = torch.bfloat16, choice: str = "auto") -> bool:
    """Build and run the kernels once on a small map, eagerly; on failure fall back for good.

    Returns whether the Triton kernels will be used on ``device``.

    Call it before ``torch.compile`` traces the model: a compiled graph cannot fall back
    on its own, and a GPU Triton does not support should train with PyTorch's GroupNorm.
    """
    if not triton_available() or device.type != "cuda" or choice != "auto" or _TRITON_FAILED:
        return False
    x = torch.randn(1, 32, 8, 8, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.ones(32, device=device, requires_grad=True)
    bias = torch.zeros(32, device=device, requires_grad=True)
    try:
        y = torch.ops.zturbo.group_norm_silu_train(x.requires_grad_(True), weight, bias, 8, 1e-6, True)[0]
        y.float().sum().backward()
        torch.ops.zturbo.group_norm_silu(x.detach(), weight.detach(), bias.detach(), 8, 1e-6, True)
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - Triton's compile and launch errors have no common type
        _note_failure(exc)
        return False
    return True


def group_norm_silu(norm: torch.nn.GroupNorm, x: torch.Tensor, silu: bool, choice: str = "auto") -> torch.Tensor:
    """``silu(norm(x))`` (or ``norm(x)``), by the Triton kernels where they apply (``choice`` "auto").

    Under autograd the differentiable training op runs (Triton backward too); without,
    the inference op. If the kernels cannot build or launch on this GPU (an architecture
    Triton does not support, say), eager calls warn once and use PyTorch's GroupNorm from
    then on.
    """
    if norm.affine and use_triton_group_norm(x, choice):
        args = (x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu)
        try:
            if torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad):
                return torch.ops.zturbo.group_norm_silu_train(*args)[0]
            return torch.ops.zturbo.group_norm_silu(*args)
        except _CHECKPOINT_STOP:
            raise
        except Exception as exc:  # Triton's compile and launch errors have no common type
            if torch.compiler.is_compiling():
                raise
            _note_failure(exc)
    y = norm(x)  # the module call, so its hooks still run
    if not silu:
        return y
    return F.silu(y, inplace=True) if not torch.is_grad_enabled() else F.silu(y)
