"""Triton kernels for inference on CUDA: GroupNorm (+ SiLU) over channels-last activations.

PyTorch's eager GroupNorm has no channels-last kernel (it falls back to slow strided
elementwise code), and inductor's generated reduction over a channels-last map at
1024 px is far from memory bandwidth. Here the statistics come from one read of the
tensor and the normalisation (+ SiLU) from one read and one write:

1. ``_gn_partials``: each program sums ``x - x[pixel 0]`` and its square per channel
   over a run of pixels (the shift by the image's first pixel keeps the fp32 sums
   from cancelling when a channel's mean is large next to its spread);
2. a few tiny torch ops merge the partial sums into per-channel means and variances
   and those into per-group ones (law of total variance: exact for equal counts),
   then fold them with the affine weight into one scale and shift per channel;
3. ``_gn_apply``: ``y = x * scale + shift``, optionally ``silu(y)``, in the input dtype.

Both are registered as torch custom ops, so ``torch.compile`` calls them as they are
instead of generating its own reduction. Used only without autograd (inference), for
half-precision channels-last CUDA tensors large enough to matter; everything else
takes ``F.group_norm``. Blocked attention is registered the same way, because inductor
would otherwise pattern-match its matmuls back into the fused kernel it avoids.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

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
#   group_norm "auto": the Triton kernels below for half-precision channels-last CUDA
#             tensors without autograd; "torch": always F.group_norm.
KERNELS = {"upsample": "subpixel", "attention": "auto", "group_norm": "auto"}
_CHOICES = {"upsample": ("subpixel", "nearest"), "attention": ("auto", "sdpa", "matmul"), "group_norm": ("auto", "torch")}


def set_kernels(**choices: str) -> dict[str, str]:
    """Choose how upsampling, attention and GroupNorm are computed; returns the previous choices."""
    previous = dict(KERNELS)
    for name, value in choices.items():
        if name not in _CHOICES or value not in _CHOICES[name]:
            raise ValueError(f"{name}={value!r}: choose {name} from {_CHOICES.get(name, ())}")
        KERNELS[name] = value
    return previous


def kernel_choices() -> dict[str, str]:
    return dict(KERNELS)


MIN_ELEMENTS = 1 << 22  # below this the launch overhead of the small merge ops dominates
ROWS_PER_PROGRAM = 4096  # pixels summed by one partial-sum program


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _gn_partials(x_ptr, part_ptr, HW, C, n_parts, rows_per_prog,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)  # over B * n_parts
        b = pid // n_parts
        p = pid % n_parts
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < C
        base = x_ptr + b.to(tl.int64) * HW * C
        pivot = tl.load(base + cols, mask=cmask, other=0.0).to(tl.float32)  # this image's pixel 0
        acc1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        start = p * rows_per_prog
        end = tl.minimum(start + rows_per_prog, HW)
        for r0 in range(start, end, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            m = (rows < end)[:, None] & cmask[None, :]
            v = tl.load(base + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, v - pivot[None, :], 0.0)
            acc1 += d
            acc2 += d * d
        out = part_ptr + pid.to(tl.int64) * 2 * C
        tl.store(out + cols, tl.sum(acc1, axis=0), mask=cmask)
        tl.store(out + C + cols, tl.sum(acc2, axis=0), mask=cmask)

    @triton.jit
    def _gn_apply(x_ptr, y_ptr, scale_ptr, shift_ptr, HW, C, blocks_per_image,
                  SILU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)  # over B * blocks_per_image
        b = pid // blocks_per_image
        rows = (pid % blocks_per_image) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < C
        m = (rows < HW)[:, None] & cmask[None, :]
        scale = tl.load(scale_ptr + b * C + cols, mask=cmask, other=0.0)
        shift = tl.load(shift_ptr + b * C + cols, mask=cmask, other=0.0)
        offs = b.to(tl.int64) * HW * C + rows.to(tl.int64)[:, None] * C + cols[None, :]
        v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        y = v * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def _blocks(c: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(c)
    return max(1, 4096 // block_c), block_c


@torch.library.custom_op("zturbo::group_norm_silu", mutates_args=())
def group_norm_silu_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                         silu: bool) -> torch.Tensor:
    """GroupNorm (+ SiLU) of a channels-last (B, C, H, W) tensor, by the Triton kernels above."""
    x = x.contiguous(memory_format=torch.channels_last)  # the kernels index (B, H*W, C) memory
    b, c, h, w = x.shape
    hw = h * w
    block_r, block_c = _blocks(c)
    n_parts = triton.cdiv(hw, ROWS_PER_PROGRAM)
    parts = torch.empty((b, n_parts, 2, c), device=x.device, dtype=torch.float32)
    _gn_partials[(b * n_parts,)](x, parts, hw, c, n_parts, ROWS_PER_PROGRAM, BLOCK_R=block_r, BLOCK_C=block_c)
    sums = parts.sum(1)  # (B, 2, C)
    mean_c = sums[:, 0] / hw  # of x - pivot
    var_c = (sums[:, 1] / hw - mean_c * mean_c).clamp_min_(0.0)
    mean_c = mean_c + x[:, :, 0, 0].float()
    mean_c, var_c = mean_c.view(b, groups, -1), var_c.view(b, groups, -1)
    mean_g = mean_c.mean(-1, keepdim=True)
    var_g = (var_c + (mean_c - mean_g) ** 2).mean(-1, keepdim=True)
    scale = (weight.float().view(1, groups, -1) * torch.rsqrt(var_g + eps)).reshape(b, c)
    shift = bias.float().view(1, c) - (mean_g * scale.view(b, groups, -1)).reshape(b, c)
    y = torch.empty_like(x)
    apply_r = max(1, 16384 // block_c)
    per_image = triton.cdiv(hw, apply_r)
    _gn_apply[(b * per_image,)](x, y, scale.contiguous(), shift.contiguous(), hw, c, per_image,
                                SILU=silu, BLOCK_R=apply_r, BLOCK_C=block_c)
    return y


@group_norm_silu_nhwc.register_fake
def _(x, weight, bias, groups, eps, silu):
    return torch.empty_like(x)


_TRITON_FAILED: list[str] = []  # the first error, once the kernels failed to build or launch here


def use_triton_group_norm(x: torch.Tensor) -> bool:
    return (
        triton is not None
        and not _TRITON_FAILED
        and KERNELS["group_norm"] == "auto"
        and x.is_cuda
        and x.dim() == 4
        and x.dtype in (torch.float16, torch.bfloat16)
        and x.numel() >= MIN_ELEMENTS
        and x.is_contiguous(memory_format=torch.channels_last)
        and not torch.is_grad_enabled()
    )


def group_norm_silu(norm: torch.nn.GroupNorm, x: torch.Tensor, silu: bool) -> torch.Tensor:
    """``silu(norm(x))`` (or ``norm(x)``), by the Triton kernels where they apply.

    If they cannot build or launch on this GPU (an architecture Triton does not support,
    say), eager calls warn once and use PyTorch's GroupNorm from then on.
    """
    if norm.affine and use_triton_group_norm(x):
        try:
            return torch.ops.zturbo.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu)
        except Exception as exc:  # Triton's compile and launch errors have no common type
            if torch.compiler.is_compiling():
                raise
            _TRITON_FAILED.append(f"{type(exc).__name__}: {exc}")
            warnings.warn(f"Triton GroupNorm kernels unavailable here, using PyTorch's: {_TRITON_FAILED[0]}",
                          RuntimeWarning, stacklevel=2)
    y = norm(x)  # the module call, so its hooks still run
    if not silu:
        return y
    return F.silu(y, inplace=True) if not torch.is_grad_enabled() else F.silu(y)
