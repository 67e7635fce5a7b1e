"""The decoder's alternative kernels compute the same function as the textbook layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zturbo.model import VAE
from zturbo.model.blocks import Upsample2D, _attention, _blocked_attention
from zturbo.model.kernels import Kernels


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_subpixel_upsample_equals_nearest_then_conv_with_gradients(layout):
    torch.manual_seed(0)
    up = Upsample2D(16)
    x = torch.randn(2, 16, 5, 7).contiguous(memory_format=layout).requires_grad_(True)
    ref = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    out = up(x)  # the default kernel: per-phase 2x2 convs
    assert out.shape == (2, 16, 10, 14)
    assert out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, up.conv.weight, up.conv.bias), g)
    grads = torch.autograd.grad(out, (x, up.conv.weight, up.conv.bias), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_subpixel_weight_cache_follows_weight_updates():
    torch.manual_seed(0)
    up = Upsample2D(8)
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        first = up(x)
        up.conv.weight.mul_(-2.0)  # an in-place update bumps the version the cache is keyed on
        second = up(x)
        ref = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(second, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("budget", [1 << 30, 50 * 4 * 7])  # whole images per block; 7 query rows per block
def test_blocked_attention_equals_sdpa(budget):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 50, 40) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(_blocked_attention(q, k, v, budget), ref, rtol=1e-5, atol=1e-5)


def test_forced_matmul_attention_falls_back_to_sdpa_under_autograd():
    q, k, v = (torch.randn(1, 10, 8, requires_grad=True) for _ in range(3))
    _attention(q, k, v, "matmul").sum().backward()  # the custom op has no backward: SDPA must have run
    assert q.grad is not None


@pytest.mark.slow
def test_every_kernel_choice_gives_the_same_decoder():
    torch.manual_seed(0)
    vae = VAE(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4).eval()
    z = torch.randn(2, 4, 8, 8)
    outs = {}
    with torch.inference_mode():
        for up in ("nearest", "subpixel"):
            for attn in ("sdpa", "matmul"):
                vae.set_kernels(upsample=up, attention=attn)
                outs[(up, attn)] = vae.decode(z)
    ref = outs[("nearest", "sdpa")]
    for key, out in outs.items():
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=f"{key}")


def test_unknown_kernel_choice_is_refused():
    vae = VAE(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4)
    with pytest.raises(ValueError, match="upsample"):
        vae.set_kernels(upsample="bilinear")
    assert vae.kernels.upsample == "subpixel"  # nothing changed


def test_kernel_choice_is_the_models_own():
    """Two models in one process compute with their own choices, and every layer follows its model's."""
    torch.manual_seed(0)
    a = VAE(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4).eval()
    b = VAE(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4).eval()
    previous = a.set_kernels(upsample="nearest", attention="sdpa")
    assert previous == Kernels().as_dict()
    assert b.kernels == Kernels()  # the other model is untouched
    layers = [m for m in a.modules() if hasattr(m, "kernels")]
    assert len(layers) > 5 and all(m.kernels is a.kernels for m in layers)
    with a.kernels.using(upsample="subpixel"):
        assert a.decoder.up_blocks[0].upsamplers[0].kernels.upsample == "subpixel"
    assert a.kernels.upsample == "nearest"  # restored on leaving


@pytest.mark.gpu
def test_gpu_kernels_match_the_textbook_decoder():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from zturbo.model import kernels as k

    torch.manual_seed(0)
    x = (torch.randn(2, 96, 256, 256, device="cuda") * 3 + 5).bfloat16().contiguous(memory_format=torch.channels_last)
    norm = torch.nn.GroupNorm(32, 96).cuda().bfloat16()
    with torch.inference_mode():
        assert k.use_triton_group_norm(x)
        y = k.group_norm_silu(norm, x, silu=True)
        ref = F.silu(F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), norm.eps))
    assert (y.float() - ref).abs().max().item() < 0.05
    vae = VAE(block_out_channels=[64, 128, 256, 256], layers_per_block=1, latent_channels=8)
    vae = vae.cuda().bfloat16().eval().to(memory_format=torch.channels_last)
    z = torch.randn(2, 8, 64, 64, device="cuda").bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        vae.set_kernels(upsample="nearest", attention="sdpa", group_norm="torch")
        ref = vae.decode(z).float()
        vae.set_kernels(upsample="subpixel", attention="matmul", group_norm="auto")
        out = vae.decode(z).float()
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_torch_backend_picks_channels_last_only_where_it_measured_faster():
    from zturbo.backends.torch_backend import TorchBackend, default_channels_last

    assert default_channels_last(torch.device("cuda"), torch.bfloat16)
    assert default_channels_last(torch.device("cuda"), torch.float16)
    assert not default_channels_last(torch.device("cuda"), torch.float32)
    assert not default_channels_last(torch.device("cpu"), torch.bfloat16)
    vae = VAE(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4)
    assert TorchBackend(vae, torch.device("cpu"), torch.float32).channels_last is False
    assert TorchBackend(vae, torch.device("cpu"), torch.float32, channels_last=True).channels_last is True


def test_blocked_attention_counts_the_flops_sdpa_counts():
    """The custom op is opaque to torch's FLOP counter unless it carries a formula; MFU relies on it."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        q, k, v = (torch.empty(2, 64, 48) for _ in range(3))
    counts = []
    for fn in (lambda: _blocked_attention(q, k, v),
               lambda: F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))):
        with FlopCounterMode(display=False) as counter:
            fn()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 2 * (2 * 2 * 64 * 64 * 48)


def test_group_norm_falls_back_once_when_the_triton_kernels_fail(monkeypatch):
    """A GPU Triton cannot build for must not break inference: warn once, then PyTorch's GroupNorm."""
    from zturbo.model import kernels as k

    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("no kernel image for this architecture")

    monkeypatch.setattr(k, "use_triton_group_norm", lambda x, choice="auto": not k._TRITON_FAILED)
    monkeypatch.setattr(k, "_TRITON_FAILED", [])
    monkeypatch.setattr(torch.ops.zturbo, "group_norm_silu", broken)
    norm = torch.nn.GroupNorm(4, 8)
    x = torch.randn(2, 8, 5, 5)
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match="no kernel image"):
            first = k.group_norm_silu(norm, x, silu=True)
        second = k.group_norm_silu(norm, x, silu=True)
    ref = F.silu(F.group_norm(x, 4, norm.weight, norm.bias, norm.eps))
    torch.testing.assert_close(first, ref)
    torch.testing.assert_close(second, ref)
    assert len(calls) == 1 and k._TRITON_FAILED
