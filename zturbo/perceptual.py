"""LPIPS loading, shared by the training loss and the eval metric.

The lpips package ships its small linear heads; the backbone (VGG16, AlexNet or
SqueezeNet ImageNet weights) comes from torchvision's download cache. Offline,
a missing backbone is a clear error naming the file and the folder it belongs
in; never a silent fallback to random weights. ``random_backbone=True`` exists
for tests of the gradient path and is labelled as such wherever it is used.
"""

from __future__ import annotations

import contextlib
import socket
import warnings
from pathlib import Path

import torch

from zturbo.errors import ZTurboError, require

BACKBONE_URLS = {
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
}


class MissingWeightsError(ZTurboError):
    """Pretrained backbone weights are not on this machine and could not be downloaded."""


def backbone_weights_path(net: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(BACKBONE_URLS[net]).name


def ensure_backbone_weights(
    net: str,
    allow_download: bool = True,
    timeout_s: float = 30.0,
    without: str = "set the perceptual weight to 0",
) -> Path:
    """Path of ``net``'s backbone weights, downloading them if allowed.

    ``without`` completes the hint: how the caller's user can do without LPIPS.
    """
    if net not in BACKBONE_URLS:
        raise ZTurboError(f"unknown LPIPS network '{net}'", f"choose one of: {', '.join(BACKBONE_URLS)}")
    path = backbone_weights_path(net)
    if path.is_file():
        return path
    hint = (
        f"download {BACKBONE_URLS[net]} and put it at {path} (set TORCH_HOME to use another cache folder), "
        f"or {without}"
    )
    if not allow_download:
        raise MissingWeightsError(f"LPIPS-{net} backbone weights not found: {path}", hint)
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        torch.hub.download_url_to_file(BACKBONE_URLS[net], str(path), progress=False)
    except Exception as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        raise MissingWeightsError(
            f"LPIPS-{net} backbone weights are not at {path} and could not be downloaded ({type(exc).__name__})", hint
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)
    return path


def load_lpips(
    net: str = "vgg",
    device: str | torch.device = "cpu",
    *,
    random_backbone: bool = False,
    allow_download: bool = True,
    without: str = "set the perceptual weight to 0",
):
    """An ``lpips.LPIPS`` module in eval mode with frozen parameters.

    Gradients still flow to its inputs (it is used as a training loss).
    ``random_backbone=True`` uses an untrained backbone: for tests only.
    """
    lpips = require("lpips", "LPIPS")
    if not random_backbone:
        ensure_backbone_weights(net, allow_download=allow_download, without=without)
    # lpips prints a banner and calls torchvision's deprecated 'pretrained' argument.
    with contextlib.redirect_stdout(None), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=random_backbone, verbose=False)
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
