"""Triton GroupNorm (+ SiLU) over channels-last (B, C, H, W) maps, forward and backward.

PyTorch's eager GroupNorm has no channels-last kernel (it falls back to slow strided
elementwise code, in the backward too), and inductor's generated reduction over a
channels-last map at 1024 px is far from memory bandwidth. Here every pass reads the
(B, H*W, C) memory in row blocks with all channels of a pixel side by side:

forward
1. ``_gn_partials``: each program sums ``x - x[pixel 0]`` and its square per channel
   over a run of pixels (the shift by the image's first pixel keeps the fp32 sums
   from cancelling when a channel's mean is large next to its spread);
2. a few tiny torch ops merge the partial sums into per-channel means and variances
   and those into per-group ones (law of total variance: exact for equal counts),
   then fold them with the affine weight into one scale and shift per channel;
3. ``_gn_apply``: ``y = x * scale + shift``, optionally ``silu(y)``, in the input dtype.

backward (``g`` is the gradient at the normalised output before SiLU, ``xhat`` the
normalised input, both recomputed from ``x`` and the saved per-group mean and 1/std,
so nothing the size of the map is saved besides ``x`` itself)
1. ``_gn_bwd_partials``: per channel, ``A = sum g`` and ``B = sum g * xhat`` over runs of pixels;
2. tiny torch ops: ``dbias = sum_b A``, ``dweight = sum_b B`` and the group means
   ``mA = sum_c w A / N``, ``mB = sum_c w B / N`` (N = channels per group x pixels);
3. ``_gn_bwd_dx``: ``dx = rstd * (w * g - mA - xhat * mB)``, the textbook GroupNorm input gradient.

Three custom ops: ``zturbo::group_norm_silu`` (inference, output only),
``zturbo::group_norm_silu_train`` (output, mean, 1/std; differentiable through
``register_autograd``) and ``zturbo::group_norm_silu_backward``. As custom ops
``torch.compile`` keeps them whole, with no graph break, instead of generating its own
reductions; the gradient-checkpointing recompute simply calls the training op again.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

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

    @triton.jit
    def _grad_at_norm(x, dy, mean, rstd, w, bias, SILU: tl.constexpr):
        """(g, xhat): the gradient at the affine output (through SiLU when fused) and the normalised x."""
        xhat = (x - mean[None, :]) * rstd[None, :]
        if SILU:
            y = xhat * w[None, :] + bias[None, :]
            s = tl.sigmoid(y)
            dy = dy * (s * (1.0 + y * (1.0 - s)))  # d silu(y) / dy
        return dy, xhat

    @triton.jit
    def _gn_bwd_partials(x_ptr, dy_ptr, part_ptr, mean_ptr, rstd_ptr, w_ptr, bias_ptr, HW, C, n_parts,
                         rows_per_prog, SILU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)  # over B * n_parts
        b = pid // n_parts
        p = pid % n_parts
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < C
        mean = tl.load(mean_ptr + b * C + cols, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + b * C + cols, mask=cmask, other=0.0)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        base = b.to(tl.int64) * HW * C
        acc1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        start = p * rows_per_prog
        end = tl.minimum(start + rows_per_prog, HW)
        for r0 in range(start, end, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            m = (rows < end)[:, None] & cmask[None, :]
            offs = base + rows.to(tl.int64)[:, None] * C + cols[None, :]
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
            g, xhat = _grad_at_norm(x, dy, mean, rstd, w, bias, SILU)
            g = tl.where(m, g, 0.0)
            acc1 += g
            acc2 += g * xhat
        out = part_ptr + pid.to(tl.int64) * 2 * C
        tl.store(out + cols, tl.sum(acc1, axis=0), mask=cmask)
        tl.store(out + C + cols, tl.sum(acc2, axis=0), mask=cmask)

    @triton.jit
    def _gn_bwd_dx(x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, bias_ptr, ma_ptr, mb_ptr, HW, C,
                   blocks_per_image, SILU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)  # over B * blocks_per_image
        b = pid // blocks_per_image
        rows = (pid % blocks_per_image) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        cmask = cols < C
        m = (rows < HW)[:, None] & cmask[None, :]
        mean = tl.load(mean_ptr + b * C + cols, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + b * C + cols, mask=cmask, other=0.0)
        ma = tl.load(ma_ptr + b * C + cols, mask=cmask, other=0.0)
        mb = tl.load(mb_ptr + b * C + cols, mask=cmask, other=0.0)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        offs = b.to(tl.int64) * HW * C + rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        g, xhat = _grad_at_norm(x, dy, mean, rstd, w, bias, SILU)
        dx = rstd[None, :] * (w[None, :] * g - ma[None, :] - xhat * mb[None, :])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


def _blocks(c: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(c)
    return max(1, 4096 // block_c), block_c


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)  # the kernels index (B, H*W, C) memory


def _group_stats(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(image, group) mean and 1/sqrt(var + eps) of a channels-last map, both (B, G) fp32."""
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
    mean_g = mean_c.mean(-1)
    var_g = (var_c + (mean_c - mean_g.unsqueeze(-1)) ** 2).mean(-1)
    return mean_g, torch.rsqrt(var_g + eps)


def _per_channel(t: torch.Tensor, c: int) -> torch.Tensor:
    """(B, G) -> (B, C), each group's value repeated over its channels."""
    return t.repeat_interleave(c // t.shape[1], dim=1).contiguous()


def _normalise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
               silu: bool) -> torch.Tensor:
    b, c, h, w = x.shape
    scale = weight.float().view(1, c) * _per_channel(rstd, c)
    shift = bias.float().view(1, c) - _per_channel(mean, c) * scale
    y = torch.empty_like(x)
    _, block_c = _blocks(c)
    apply_r = max(1, 16384 // block_c)
    per_image = triton.cdiv(h * w, apply_r)
    _gn_apply[(b * per_image,)](x, y, scale.contiguous(), shift.contiguous(), h * w, c, per_image,
                                SILU=silu, BLOCK_R=apply_r, BLOCK_C=block_c)
    return y


@torch.library.custom_op("zturbo::group_norm_silu", mutates_args=())
def group_norm_silu_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                         silu: bool) -> torch.Tensor:
    """GroupNorm (+ SiLU) of a channels-last (B, C, H, W) tensor, without autograd (inference)."""
    x = _channels_last(x)
    mean, rstd = _group_stats(x, groups, eps)
    return _normalise(x, weight, bias, mean, rstd, silu)


@group_norm_silu_nhwc.register_fake
def _(x, weight, bias, groups, eps, silu):
    return torch.empty_like(x, memory_format=torch.channels_last)


@torch.library.custom_op("zturbo::group_norm_silu_train", mutates_args=())
def group_norm_silu_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                          silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm (+ SiLU) for training: (output, per-group mean, per-group 1/std), differentiable in x, weight, bias."""
    x = _channels_last(x)
    mean, rstd = _group_stats(x, groups, eps)
    return _normalise(x, weight, bias, mean, rstd, silu), mean, rstd


@group_norm_silu_train.register_fake
def _(x, weight, bias, groups, eps, silu):
    stats = x.new_empty((x.shape[0], groups), dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.channels_last), stats, torch.empty_like(stats)


@torch.library.custom_op("zturbo::group_norm_silu_backward", mutates_args=())
def group_norm_silu_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             mean: torch.Tensor, rstd: torch.Tensor, silu: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``group_norm_silu_train``'s output with respect to x, weight and bias."""
    x, dy = _channels_last(x), _channels_last(dy)
    b, c, h, w = x.shape
    hw = h * w
    mean_c, rstd_c = _per_channel(mean, c), _per_channel(rstd, c)
    block_r, block_c = _blocks(c)
    n_parts = triton.cdiv(hw, ROWS_PER_PROGRAM)
    parts = torch.empty((b, n_parts, 2, c), device=x.device, dtype=torch.float32)
    _gn_bwd_partials[(b * n_parts,)](x, dy, parts, mean_c, rstd_c, weight, bias, hw, c, n_parts, ROWS_PER_PROGRAM,
                                     SILU=silu, BLOCK_R=block_r, BLOCK_C=block_c)
    sums = parts.sum(1)  # (B, 2, C): A = sum g, B = sum g * xhat per image and channel
    groups = mean.shape[1]
    n = (c // groups) * hw
    weighted = (sums * weight.float().view(1, 1, c)).view(b, 2, groups, -1).sum(-1) / n  # (B, 2, G)
    ma, mb = _per_channel(weighted[:, 0], c), _per_channel(weighted[:, 1], c)
    dx = torch.empty_like(x)
    apply_r = max(1, 8192 // block_c)
    per_image = triton.cdiv(hw, apply_r)
    _gn_bwd_dx[(b * per_image,)](x, dy, dx, mean_c, rstd_c, weight, bias, ma, mb, hw, c, per_image,
                                 SILU=silu, BLOCK_R=apply_r, BLOCK_C=block_c)
    return dx, sums[:, 1].sum(0).to(weight.dtype), sums[:, 0].sum(0).to(bias.dtype)


@group_norm_silu_backward.register_fake
def _(dy, x, weight, bias, mean, rstd, silu):
    return torch.empty_like(x, memory_format=torch.channels_last), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _groups, _eps, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.silu = silu
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.zturbo.group_norm_silu_backward(dy, x, weight, bias, mean, rstd, ctx.silu)
    return dx, dweight, dbias, None, None, None


group_norm_silu_train.register_autograd(_backward, setup_context=_setup_context)
