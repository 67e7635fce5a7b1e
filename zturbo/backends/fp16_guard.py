"""fp16 on the torch backend without silent overflow: the ONNX export's guard (``zturbo.export.fp16``), per layer.

Some VAEs' activations exceed fp16's largest finite value (65504): a plain half cast
turns them into inf, then NaN, and the image comes out black. As for an fp16 ONNX
export, the model first runs in fp32 on the bundled photos with every module's inputs
and outputs measured; a layer whose largest ``|x|`` there, or inside it, exceeds
``65504 / headroom`` then runs in fp32 and everything else in fp16.

A layer is one step of the network's walk: each ResNet, attention, down- or upsampler
of a block (``block.layers()``), and the encoder's and decoder's own convs and output
norm, and the quant convs. A kept layer holds fp32 weights, casts what comes in to
fp32, and hands its output on in fp16 when that fits (measured), else in fp32, so the
next layer, whose input then exceeds the threshold too, is kept as well. Every other
layer casts what comes in to fp16. GroupNorm statistics accumulate in fp32 in torch's
kernels whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from zturbo.config import ExportConfig
from zturbo.export.fp16 import FP16_MAX
from zturbo.export.verify import sample_images
from zturbo.model import VAE

# The ONNX export's defaults: headroom, and how many bundled photos at what size measure the ranges
# (activations are local, so their range hardly depends on the image size).
_EXPORT = ExportConfig.model_fields
HEADROOM = _EXPORT["fp16_headroom"].default
CALIBRATION_IMAGES = _EXPORT["calibration_images"].default
CALIBRATION_SIZE = _EXPORT["calibration_size"].default
CALIBRATION_BATCH = 4


@dataclass
class Fp16Guard:
    """Which layers of a VAE run in fp32 under ``--precision fp16``, and why."""

    threshold: float
    max_activation: float = 0.0
    max_at: str = ""
    calibration_inputs: int = 0
    kept: dict[str, float] = field(default_factory=dict)  # layer name -> its largest |x| on the photos
    _handles: list = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {
            "threshold": self.threshold,
            "max_activation": self.max_activation,
            "max_at": self.max_at,
            "calibration_inputs": self.calibration_inputs,
            "kept_fp32_layers": list(self.kept),
        }

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def guard_layers(vae: VAE) -> dict[str, nn.Module]:
    """The layers the guard keeps or converts as a whole, by module name, in the walk's order."""
    chosen = {id(child) for owner in (vae, vae.encoder, vae.decoder) for child in owner.children()
              if isinstance(child, (nn.Conv2d, nn.GroupNorm))}
    chosen |= {id(layer) for module in vae.modules() if callable(getattr(module, "layers", None))
               for layer in module.layers()}
    return {name: module for name, module in vae.named_modules() if id(module) in chosen}


def _max_abs(values) -> float:
    peak = 0.0
    for v in values if isinstance(values, (tuple, list)) else (values,):
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel():
            finite = torch.isfinite(v).all()
            peak = max(peak, float(v.detach().abs().max()) if finite else float("inf"))
    return peak


@torch.inference_mode()
def measure_ranges(vae: VAE, images: torch.Tensor) -> dict[str, tuple[float, float]]:
    """(largest |input|, largest |output|) of every module called while ``vae`` (fp32) encodes
    ``images`` and decodes their posterior means."""
    ranges: dict[str, tuple[float, float]] = {}

    def record(name: str):
        def hook(_module, args, output):
            seen_in, seen_out = ranges.get(name, (0.0, 0.0))
            ranges[name] = (max(seen_in, _max_abs(args)), max(seen_out, _max_abs(output)))

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in vae.named_modules() if n]
    try:
        for batch in images.split(CALIBRATION_BATCH):
            vae.decode(vae.encode(batch).mean)
    finally:
        for handle in handles:
            handle.remove()
    return ranges


def plan_guard(vae: VAE, ranges: dict[str, tuple[float, float]], headroom: float = HEADROOM,
               inputs: int = 0) -> Fp16Guard:
    """The layers to keep in fp32: those whose own, or any inner module's, input or output exceeds
    ``65504 / headroom`` in ``ranges``. A GroupNorm layer is judged by its input alone: it may be
    applied by a fused kernel that takes the dtype it is given."""
    guard = Fp16Guard(threshold=FP16_MAX / headroom, calibration_inputs=inputs)
    if ranges:
        guard.max_at, (peak_in, peak_out) = max(ranges.items(), key=lambda kv: max(kv[1]))
        guard.max_activation = max(peak_in, peak_out)
    for name, layer in guard_layers(vae).items():
        peak = ranges.get(name, (0.0, 0.0))[0] if isinstance(layer, nn.GroupNorm) else _peak_within(name, ranges)
        if peak > guard.threshold:
            guard.kept[name] = peak
    return guard


def _peak_within(name: str, ranges: dict[str, tuple[float, float]]) -> float:
    """The largest |x| into or out of the module ``name`` or any module inside it."""
    return max((max(r) for n, r in ranges.items() if n == name or n.startswith(f"{name}.")), default=0.0)


def _cast_inputs(dtype: torch.dtype):
    def hook(_module, args):
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    return hook


def _output_to(dtype: torch.dtype):
    def hook(_module, _args, output):
        return output.to(dtype) if isinstance(output, torch.Tensor) else output

    return hook


def apply_guard(vae: VAE, guard: Fp16Guard, ranges: dict[str, tuple[float, float]]) -> None:
    """Make an fp16 ``vae`` run ``guard.kept`` in fp32 (weights and compute), in place, with module hooks."""
    guard.remove()
    if not guard.kept:
        return
    for name, layer in guard_layers(vae).items():
        if name in guard.kept:
            layer.float()
            guard._handles.append(layer.register_forward_pre_hook(_cast_inputs(torch.float32)))
            if ranges.get(name, (0.0, 0.0))[1] <= guard.threshold:
                guard._handles.append(layer.register_forward_hook(_output_to(torch.float16)))
        else:
            guard._handles.append(layer.register_forward_pre_hook(_cast_inputs(torch.float16)))


def guard_fp16(vae: VAE, device: torch.device, headroom: float = HEADROOM) -> Fp16Guard:
    """Measure ``vae`` (fp32, on ``device``) on the bundled photos, cast it to fp16 with the layers
    that overflow kept in fp32, and return the plan (``guard.remove()`` takes its hooks off)."""
    factor = vae.config.downsample_factor
    side = min(CALIBRATION_SIZE, vae.config.sample_size)  # never above the size the model was made for
    images = sample_images(max(factor, side // factor * factor), CALIBRATION_IMAGES).to(device)
    vae = vae.to(device=device, dtype=torch.float32).eval()
    ranges = measure_ranges(vae, images)
    guard = plan_guard(vae, ranges, headroom, inputs=len(images))
    vae.half()
    apply_guard(vae, guard, ranges)
    return guard
