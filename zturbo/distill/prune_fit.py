"""Calibrated pruning: refit each pruned convolution so the student follows the teacher on real data.

Keeping a subset of the teacher's channels throws away what the removed channels added
to every layer that reads them, and the student's GroupNorm groups normalise by the
statistics of fewer channels. Left alone, the errors compound through the decoder and the
pruned student starts no better than random weights. ``refit`` corrects this layer by
layer, in forward order (channel pruning by least-squares reconstruction, He et al. 2017,
applied sequentially as in ThiNet / OBC):

for every convolution whose input site lost channels, given the *student's own* input to
it on the calibration data (so the refit absorbs every upstream error, the changed
GroupNorm statistics included), its kept weights and bias are set to the ridge solution

    argmin_W ||X W - Y||^2 + lam ||W - W0||^2,     lam = 1e-2 * mean(diag(X^T X)),

where X are the input patches (plus a constant 1 for the bias), W0 the pruned teacher
weights and Y the teacher's value of the site the layer writes, on the kept channels,
minus the student's residual into that site (the skip or shortcut that a ResNet's second
conv is added to). The ridge term pulls towards the pruned teacher weights where the
calibration data say little (GPTQ's 1% damping of the Hessian's mean diagonal), and since
``W0`` is a candidate the fitted layer, given the same input, is never worse on the
calibration data than the pruned one. The removed channels' mean contribution (bias compensation) is one of the
directions this fit covers.

Convolutions whose input is complete (the first conv, reading the image or latent) keep the
pruned teacher weights: their kept outputs are the teacher's already. Attention's linears
keep the pruned weights; the convs after them are refit on their output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zturbo.model.blocks import Upsample2D
from zturbo.model.vae import Decoder, Encoder

DAMPING = 1e-2  # ridge weight relative to the mean diagonal of X^T X
CHUNK = 16384  # patch positions per float64 product


class _Stop(Exception):
    """Raised by a hook once the layer being fitted has been seen: the rest of the forward is not needed."""


def _conv_input(module: nn.Module, args: tuple) -> torch.Tensor:
    x = args[0]
    if isinstance(module, Upsample2D):  # its conv reads the nearest-upsampled input (whichever kernel runs)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x.detach().clone()


def _modules(coder: nn.Module, name: str) -> tuple[nn.Module, nn.Module]:
    """(the module whose input and output are conv ``name``'s, the module whose output is the site it writes)."""
    mods = dict(coder.named_modules())
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    reader = mods[parent] if isinstance(mods.get(parent), Upsample2D) else mods[name]
    writer = mods[parent] if name.endswith(".conv2") else reader  # a ResNet's sum, skip included
    return reader, writer


@torch.no_grad()
def conv_view(coder: nn.Module, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Conv ``name``'s input, output and the value of the site it writes (after a ResNet's skip add).

    The forward stops there, so one layer's tensors are held at a time.
    """
    reader, writer = _modules(coder, name)
    seen: dict[str, torch.Tensor] = {}

    def read(m, args, y):  # the reader's output is the conv's (an Upsample2D's conv may never be called itself)
        seen["input"], seen["out"] = _conv_input(m, args), y.detach().clone()
        if writer is reader:
            raise _Stop

    def site(_m, _a, y):
        seen["site"] = y.detach().clone()
        raise _Stop

    handles = [reader.register_forward_hook(read)]
    if writer is not reader:
        handles.append(writer.register_forward_hook(site))
    try:
        coder(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return seen["input"], seen["out"], seen.get("site", seen["out"])


def ridge_conv(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor,
               damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias minimising ``||conv(x) - y||^2 + lam ||(W, b) - (W0, b0)||^2`` (the module docstring)."""
    co, ci, kh, kw = conv.weight.shape
    features = ci * kh * kw + 1
    f64 = {"dtype": torch.float64, "device": x.device}
    gram, cross = torch.zeros(features, features, **f64), torch.zeros(features, co, **f64)
    for xi, yi in zip(x.split(1), y.split(1)):  # one image at a time: the patch matrix of one is enough memory
        patches = F.unfold(xi.float(), (kh, kw), padding=conv.padding, stride=conv.stride, dilation=conv.dilation)[0]
        targets = yi.float().flatten(2)[0]
        for start in range(0, patches.shape[1], CHUNK):  # sums in float64, a chunk of positions at a time
            a = patches[:, start:start + CHUNK].double()
            a = torch.cat([a, torch.ones(1, a.shape[1], **f64)])  # (features, positions)
            gram += a @ a.T
            cross += a @ targets[:, start:start + CHUNK].double().T
    theta0 = torch.cat([conv.weight.detach().double().reshape(co, -1), conv.bias.detach().double()[:, None]], 1).T
    lam = damping * gram.diagonal().mean().clamp_min(1e-12)
    theta = torch.linalg.solve(gram + lam * torch.eye(features, **f64), cross + lam * theta0)
    weight, bias = theta[:-1].T.reshape(co, ci, kh, kw), theta[-1]
    return weight.to(conv.weight.dtype), bias.to(conv.bias.dtype)


@torch.no_grad()
def refit(teacher: Encoder | Decoder, student: Encoder | Decoder, layers: dict[str, tuple[int | None, int | None]],
          keep: list[torch.Tensor], narrowed: set[int], x: torch.Tensor) -> list[str]:
    """Refit, in forward order, every conv of ``student`` whose input site is in ``narrowed``; returns their names.

    ``layers`` is the site graph's layer table, ``keep`` the kept teacher channels per site,
    ``x`` the calibration input of the coder (images for an encoder, post-quant latents for
    a decoder).
    """
    mods = dict(student.named_modules())
    names = [n for n, (src, _) in layers.items() if isinstance(mods[n], nn.Conv2d) and src in narrowed]
    keep_out = {n: None if layers[n][1] is None else keep[layers[n][1]] for n in names}
    was_training = student.training
    student.eval()
    try:
        for name in names:
            site = conv_view(teacher, name, x)[2]
            target = site if keep_out[name] is None else site[:, keep_out[name]]
            inp, out, own = conv_view(student, name, x)
            weight, bias = ridge_conv(mods[name], inp, target - (own - out))  # minus the student's residual
            mods[name].weight.copy_(weight)
            mods[name].bias.copy_(bias)
    finally:
        student.train(was_training)
    return names
