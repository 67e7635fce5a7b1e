"""The Triton GroupNorm(+SiLU) training kernels, run by Triton's CPU interpreter, against float64.

Each check runs in a subprocess with TRITON_INTERPRET=1 (the variable is read when
Triton is imported). Tolerances: fp32 kernels sum at most a few hundred fp32 terms
(unit roundoff 6e-8; a bound of n*u ~ 3e-5 of the largest term), so 1e-4 of the largest
reference value; fp16 outputs and input gradients are rounded once to fp16 at the end
(half an ulp: 2**-11 ~ 4.9e-4 relative), so 2e-3 of the largest reference value.
Weight and bias gradients come back in fp32 either way (1e-4 of their largest value,
5e-4 when the map is fp16 because the output gradient entering them is rounded fp16 too:
the reference sees the same fp16 values, so only fp32 summation separates them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from zturbo.model.group_norm_triton import triton_available

pytestmark = [pytest.mark.skipif(not triton_available(), reason="needs triton (ships with CUDA builds of torch)"),
              pytest.mark.slow]  # the interpreter runs every Triton program in Python: ~15 s each on 2 cores

_PRELUDE = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from zturbo.model import group_norm_triton as gnt, kernels
    gnt.ROWS_PER_PROGRAM = 128  # several partial sums per image: the merge is exercised too
    torch.manual_seed(0)

    def reference(x, weight, bias, groups, silu):
        xd, wd, bd = (t.detach().double().requires_grad_(True) for t in (x, weight, bias))
        y = F.group_norm(xd, groups, wd, bd, 1e-6)
        return (F.silu(y) if silu else y), (xd, wd, bd)

    def close(name, got, ref, tol):
        err = (got.double() - ref).abs().max().item()
        scale = max(1.0, ref.abs().max().item())
        assert err <= tol * scale, (name, err, scale)
""")

_OP_GRADIENTS = _PRELUDE + textwrap.dedent("""
    for b, c, h, w, g, offset, dtype in [(2, 96, 19, 13, 32, 0.0, torch.float32), (1, 12, 5, 3, 4, 40.0, torch.float32),
                                         (2, 64, 24, 20, 32, 0.0, torch.float16)]:
        x = (torch.randn(b, c, h, w) * 2 + offset + torch.linspace(-3, 3, c).view(1, c, 1, 1)).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
        weight = torch.randn(c).requires_grad_(True)
        bias = torch.randn(c).requires_grad_(True)
        dy = torch.randn(b, c, h, w).to(dtype)  # contiguous (NCHW): the backward must take any layout
        half = dtype == torch.float16
        for silu in (False, True):
            y, mean, rstd = torch.ops.zturbo.group_norm_silu_train(x, weight, bias, g, 1e-6, silu)
            assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
            assert mean.shape == rstd.shape == (b, g) and not mean.requires_grad
            grads = torch.autograd.grad(y, (x, weight, bias), dy)
            ref, leaves = reference(x, weight, bias, g, silu)
            ref_grads = torch.autograd.grad(ref, leaves, dy.double())
            close("y", y, ref.detach(), 2e-3 if half else 1e-4)
            close("dx", grads[0], ref_grads[0], 2e-3 if half else 1e-4)
            assert grads[0].dtype == dtype and grads[1].dtype == grads[2].dtype == torch.float32
            close("dweight", grads[1], ref_grads[1], 5e-4 if half else 1e-4)
            close("dbias", grads[2], ref_grads[2], 5e-4 if half else 1e-4)
    print("ok")
""")

_CHECKPOINT_AND_COMPILE = _PRELUDE + textwrap.dedent("""
    from zturbo.model.blocks import norm_silu
    # The CUDA-only gate: here the interpreter runs them on CPU.
    kernels.use_triton_group_norm = lambda x, choice="auto": True
    stats_calls = []
    real_stats = gnt._group_stats
    gnt._group_stats = lambda *a: stats_calls.append(1) or real_stats(*a)

    norm = torch.nn.GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32)); norm.bias.copy_(torch.randn(32))
    x = (torch.randn(2, 32, 9, 7) * 3 + 1).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    dy = torch.randn(2, 32, 9, 7)
    ref, leaves = reference(x, norm.weight, norm.bias, 8, True)
    ref_grads = torch.autograd.grad(ref, leaves, dy.double())
    for recompute in (False, True):
        stats_calls.clear()
        y = norm_silu(norm, x, recompute=recompute)
        grads = torch.autograd.grad(y, (x, norm.weight, norm.bias), dy)
        # Forward once; with recompute the backward runs the Triton forward a second time.
        assert len(stats_calls) == (2 if recompute else 1), (recompute, len(stats_calls))
        close("y", y, ref.detach(), 1e-4)
        for name, a, r in zip(("dx", "dweight", "dbias"), grads, ref_grads):
            close(name, a, r, 1e-4)

    # torch.compile keeps the custom ops whole: one graph, no break, same gradients.
    import torch._dynamo
    torch._dynamo.reset()
    fn = torch.compile(lambda t: norm_silu(norm, t, recompute=False), backend="aot_eager", fullgraph=True)
    y = fn(x)
    grads = torch.autograd.grad(y, (x, norm.weight, norm.bias), dy)
    close("compiled y", y, ref.detach(), 1e-4)
    for name, a, r in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        close("compiled " + name, a, r, 1e-4)
    print("ok")
""")


def _interpret(script: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_training_op_forward_and_gradients_match_float64():
    _interpret(_OP_GRADIENTS)


def test_checkpoint_recompute_and_compiled_graph_use_the_triton_ops():
    _interpret(_CHECKPOINT_AND_COMPILE)
