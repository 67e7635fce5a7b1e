"""Building blocks of the AutoencoderKL architecture.

Module and parameter names follow diffusers exactly (``norm1``, ``conv1``,
``conv_shortcut``, ``to_q``, ``to_out.0``, ...) so state dicts move between the two
with no key mapping. The forward passes are leaner than the reference: no
division by an ``output_scale_factor`` of 1, in-place activations and residual
adds when no gradient is being recorded.
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import register_flop_formula

from zturbo.model.kernels import Kernels, group_norm_silu
from zturbo.model.plan import PlanBuilder

NORM_EPS = 1e-6


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor, recompute: bool = False, choice: str = "auto") -> torch.Tensor:
    """silu(norm(x)). With ``recompute`` (under autograd) only ``x`` is kept for the backward and
    the pair is recomputed there: under CUDA autocast GroupNorm runs in fp32, so its output, kept
    for SiLU's backward, is twice the size of the bf16 tensors around it. ``choice``: the model's
    ``Kernels.group_norm``."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(group_norm_silu, norm, x, True, choice, use_reentrant=False)
    return group_norm_silu(norm, x, silu=True, choice=choice)


def _add(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return x.add_(residual)
    return x + residual


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a (1x1 conv) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32, kernels: Kernels | None = None):
        super().__init__()
        self.kernels = kernels or Kernels()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS, affine=True)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    # Set by VAE.enable_gradient_checkpointing: GroupNorm+SiLU then recompute in the backward.
    checkpoint_norms = False

    def add_to_plan(self, plan: PlanBuilder) -> None:
        plan.add("resnet", self, self.conv1.in_channels, self.conv2.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recompute, choice = self.checkpoint_norms and self.training, self.kernels.group_norm
        h = self.conv1(norm_silu(self.norm1, x, recompute, choice))
        h = self.conv2(norm_silu(self.norm2, h, recompute, choice))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return _add(h, shortcut)


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after asymmetric (0, 1, 0, 1) zero padding, as in latent-diffusion."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def add_to_plan(self, plan: PlanBuilder) -> None:
        plan.add("downsample", self, self.conv.in_channels, self.conv.out_channels, scale=Fraction(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _phase_taps(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a kernel's 3 taps along ``dim`` onto the 2 source pixels each output phase sees.

    Phase 0 (even output rows) sees source rows i-1, i: taps 0 | 1+2. Phase 1 sees i, i+1: taps 0+1 | 2.
    """
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3) -> (4*Cout, Cin, 2, 2): one 2x2 kernel per output phase (a, b), a-major."""
    # Sum the taps in at least fp32 (bf16/fp16 sums would round), never below the weight's own precision.
    rows = _phase_taps(weight.to(torch.promote_types(weight.dtype, torch.float32)), 2)
    return torch.cat([k for r in rows for k in _phase_taps(r, 3)]).to(weight.dtype)


def upsample_conv_subpixel(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, folded: torch.Tensor | None = None
) -> torch.Tensor:
    """conv3x3(nearest_x2(x)) without the upsampled input: a 2x2 conv per output phase.

    ``folded`` is ``subpixel_weight(weight)`` when the caller has it already.
    """
    b, _, h, w = x.shape
    cout = weight.shape[0]
    folded = subpixel_weight(weight) if folded is None else folded
    bias4 = None if bias is None else bias.repeat(4)
    phases = F.conv2d(x, folded, bias4, padding=1)  # (B, 4*Cout, H+1, W+1)
    phases = phases.view(b, 2, 2, cout, h + 1, w + 1)
    if torch.onnx.is_in_onnx_export():
        # Stack + reshape exports as Concat/Reshape (cheap everywhere); strided writes would
        # export as ScatterND.
        rows = [torch.stack([phases[:, a, c, :, a : a + h, c : c + w] for c in (0, 1)], dim=-1) for a in (0, 1)]
        return torch.stack(rows, dim=-3).reshape(b, cout, 2 * h, 2 * w)  # (B, Cout, H, 2, W, 2) -> interleaved
    layout = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else None
    out = torch.empty((b, cout, 2 * h, 2 * w), dtype=phases.dtype, device=x.device,
                      memory_format=layout or torch.contiguous_format)
    # Phase (a, c) of output pixel (i, j) is phases[a, c, :, i + a, j + c]: one strided copy each.
    for a in (0, 1):
        for c in (0, 1):
            out[:, :, a::2, c::2] = phases[:, a, c, :, a : a + h, c : c + w]
    return out


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv (computed per output phase, see ``Kernels``)."""

    def __init__(self, channels: int, kernels: Kernels | None = None):
        super().__init__()
        self.kernels = kernels or Kernels()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self._folded: tuple | None = None  # (weight identity, folded weight), for calls without autograd

    def _folded_weight(self) -> torch.Tensor:
        weight = self.conv.weight
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return subpixel_weight(weight)  # differentiable; compiled graphs fold it themselves
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._folded is None or self._folded[0] != key:
            self._folded = (key, subpixel_weight(weight))
        return self._folded[1]

    def add_to_plan(self, plan: PlanBuilder) -> None:
        plan.add("upsample", self, self.conv.in_channels, self.conv.out_channels, scale=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels.upsample == "subpixel":
            return upsample_conv_subpixel(x, self.conv.weight, self.conv.bias, self._folded_weight())
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@torch.library.custom_op("zturbo::blocked_attention", mutates_args=())
def _blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget_bytes: int = 1 << 30) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, L, D) inputs with score blocks of at most ``budget_bytes``.

    A custom op, so torch.compile runs it as written rather than matching it back to SDPA.
    """
    b, length, d = q.shape
    q = q * d**-0.5
    rows = max(1, budget_bytes // (length * q.element_size()))  # query rows per block
    if rows >= length:  # whole images per block
        per = rows // length
        blocks = [torch.bmm(torch.bmm(q[i : i + per], k[i : i + per].transpose(1, 2)).softmax(-1), v[i : i + per])
                  for i in range(0, b, per)]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    return torch.stack([
        torch.cat([torch.mm(torch.mm(q[i, j : j + rows], k[i].t()).softmax(-1), v[i]) for j in range(0, length, rows)])
        for i in range(b)
    ])


@_blocked_attention.register_fake
def _(q, k, v, budget_bytes=1 << 30):
    return torch.empty_like(q)


@register_flop_formula(torch.ops.zturbo.blocked_attention)
def _blocked_attention_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """What torch's FLOP counter counts for it: the two matmuls, as for SDPA."""
    b, length, d = q_shape
    return 2 * (2 * b * length * k_shape[1] * d)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, choice: str = "auto") -> torch.Tensor:
    """Single-head attention on (B, L, D) tensors; ``choice``: the model's ``Kernels.attention``."""
    if choice == "auto":
        fused_unavailable = q.shape[-1] > 256 and q.dtype in (torch.float16, torch.bfloat16)
        choice = "matmul" if q.is_cuda and fused_unavailable else "sdpa"
    if choice == "matmul" and not torch.is_grad_enabled():  # inference only: no backward is registered
        return _blocked_attention(q, k, v)
    return F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)


class Attention(nn.Module):
    """Single-head spatial self-attention with a residual, diffusers' key layout."""

    def __init__(self, channels: int, groups: int = 32, kernels: Kernels | None = None):
        super().__init__()
        self.kernels = kernels or Kernels()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS, affine=True)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def add_to_plan(self, plan: PlanBuilder) -> None:
        plan.add("attention", self, self.to_q.in_features, self.to_out[0].out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = group_norm_silu(self.group_norm, x, False, self.kernels.group_norm).flatten(2).transpose(1, 2)
        out = _attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), self.kernels.attention)
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)  # a channels-last view
        # The residual goes first so the sum keeps the input's memory layout. With ``out``
        # first, everything after the mid block silently ran channels-last, which on CPU
        # made GroupNorm's backward ~7x slower and a training step ~15% slower.
        if not torch.is_grad_enabled():
            return x.add_(out)  # x is the mid block's own intermediate, never the caller's tensor
        return x + out


class _Block(nn.Module):
    """A container of layers run in ``layers()`` order (the order the plan lists them in)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers():
            x = layer(x)
        return x


class MidBlock(_Block):
    """ResNet -> (optional) attention -> ResNet."""

    def __init__(self, channels: int, groups: int, add_attention: bool = True, kernels: Kernels | None = None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, kernels) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups, kernels)]) if add_attention else None

    def layers(self) -> list[nn.Module]:
        """The layers in call order: the first ResNet, the attentions, the other ResNets."""
        return [self.resnets[0], *(self.attentions or []), *self.resnets[1:]]


class DownEncoderBlock(_Block):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool,
                 kernels: Kernels | None = None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, kernels)
                                      for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def layers(self) -> list[nn.Module]:
        """The layers in call order: the ResNets, then the downsampler."""
        return [*self.resnets, *(self.downsamplers or [])]


class UpDecoderBlock(_Block):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool,
                 kernels: Kernels | None = None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, kernels)
                                      for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, kernels)]) if add_upsample else None

    def layers(self) -> list[nn.Module]:
        """The layers in call order: the ResNets, then the upsampler."""
        return [*self.resnets, *(self.upsamplers or [])]


def add_block(plan: PlanBuilder, block: MidBlock | DownEncoderBlock | UpDecoderBlock) -> None:
    """A block's layers to a coder's plan: each layer module describes itself (``add_to_plan``)."""
    for layer in block.layers():
        if not hasattr(layer, "add_to_plan"):
            raise TypeError(f"{type(layer).__name__} does not describe itself to the layer plan (add_to_plan)")
        layer.add_to_plan(plan)
