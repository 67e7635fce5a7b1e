"""The Triton GroupNorm kernels run by Triton's CPU interpreter in a child process (TRITON_INTERPRET=1 is read
when triton is imported, so it cannot be switched on inside the test process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from zturbo.model.group_norm_triton import triton_available

pytestmark = pytest.mark.slow


_INTERPRETED = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from zturbo.model import group_norm_triton
    group_norm_triton.ROWS_PER_PROGRAM = 128  # several partial sums per image (19 x 13 = 247 pixels: two)
    torch.manual_seed(0)
    worst = 0.0
    for b, c, h, w, g, offset, dtype in [(2, 96, 19, 13, 32, 0.0, torch.float32), (1, 12, 5, 3, 4, 40.0, torch.float32),
                                         (1, 64, 24, 20, 32, 0.0, torch.float16)]:
        x = (torch.randn(b, c, h, w) * 2 + offset + torch.linspace(-3, 3, c).view(1, c, 1, 1)).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        weight, bias = torch.randn(c), torch.randn(c)
        for silu in (False, True):
            y = torch.ops.zturbo.group_norm_silu(x, weight, bias, g, 1e-6, silu)
            ref = F.group_norm(x.double(), g, weight.double(), bias.double(), 1e-6)
            ref = F.silu(ref) if silu else ref
            assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
            tol = 1e-4 if dtype == torch.float32 else 5e-3
            err = (y.double() - ref).abs().max().item()
            assert err < tol * max(1.0, ref.abs().max().item()), (b, c, h, w, str(dtype), silu, err)
            worst = max(worst, err)
    print("ok", worst)
""")


@pytest.mark.skipif(not triton_available(), reason="needs triton (ships with CUDA builds of torch)")
def test_triton_group_norm_matches_float64_reference_in_the_interpreter():
    """The Triton GroupNorm kernels, run by Triton's CPU interpreter, against a float64 reference."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")
