"""Encoder and decoder as separate ONNX graphs with dynamic batch, height and width.

Exported with ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript):
in torch 2.14 it is the maintained exporter, it keeps the output sizes symbolic
(``image`` is ``8*latent_height``), and every node carries the module path it came
from, which the fp16 guard uses to name the layers it keeps in fp32. The
TorchScript exporter also handles these shapes but is deprecated.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from zturbo.errors import ZTurboError, require
from zturbo.export.layout import INPUT_NAMES, OUTPUT_NAMES
from zturbo.version import __version__

PARTS = ("encoder", "decoder")


class EncoderGraph(nn.Module):
    """image in [-1, 1] -> posterior mean (optionally ``(mean - shift) * scale``)."""

    def __init__(self, vae, apply_scaling: bool = False):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv
        self.latent_channels = vae.config.latent_channels
        self.apply_scaling = apply_scaling
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.shift_factor)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(image)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean = moments[:, : self.latent_channels]
        if self.apply_scaling:
            mean = (mean - self.shift_factor) * self.scaling_factor
        return mean


class DecoderGraph(nn.Module):
    """latent (scaled when ``apply_scaling``) -> image in about [-1, 1]."""

    def __init__(self, vae, apply_scaling: bool = False):
        super().__init__()
        self.decoder = vae.decoder
        self.post_quant_conv = vae.post_quant_conv
        self.apply_scaling = apply_scaling
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.shift_factor)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if self.apply_scaling:
            latent = latent / self.scaling_factor + self.shift_factor
        if self.post_quant_conv is not None:
            latent = self.post_quant_conv(latent)
        return self.decoder(latent)


def part_graph(vae, part: str, apply_scaling: bool = False) -> nn.Module:
    graph = EncoderGraph(vae, apply_scaling) if part == "encoder" else DecoderGraph(vae, apply_scaling)
    return graph.eval()


def example_input(vae, part: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A small input whose sizes are neither 0 nor 1 and differ, so no axis gets specialised."""
    cfg = vae.config
    f = cfg.downsample_factor
    if part == "encoder":
        return torch.zeros(2, cfg.in_channels, 4 * f, 6 * f, dtype=dtype)
    return torch.zeros(2, cfg.latent_channels, 4, 6, dtype=dtype)


def dynamic_shapes(vae, part: str, max_side: int = 16384) -> dict:
    """Batch, height and width free; image sides tied to latent sides by the downsampling factor."""
    from torch.export import Dim

    f = vae.config.downsample_factor
    batch = Dim("batch", min=1, max=4096)
    height = Dim("latent_height", min=1, max=max(2, max_side // f))
    width = Dim("latent_width", min=1, max=max(2, max_side // f))
    if part == "encoder":
        return {"image": {0: batch, 2: f * height, 3: f * width}}
    return {"latent": {0: batch, 2: height, 3: width}}


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress lines and warnings meant for its developers; keep our stderr clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_part(vae, part: str, path: str | Path, opset: int = 18, apply_scaling: bool = False) -> Path:
    """Write one part of ``vae`` (fp32) to ``path`` as an ONNX graph with dynamic axes, then check it."""
    require("onnxscript", "ONNX export", extra="onnx")
    require("onnx", "ONNX export", extra="onnx")
    path = Path(path)
    vae = vae.float().eval()
    graph = part_graph(vae, part, apply_scaling)
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                graph,
                (example_input(vae, part),),
                input_names=[INPUT_NAMES[part]],
                output_names=[OUTPUT_NAMES[part]],
                opset_version=opset,
                dynamic_shapes=dynamic_shapes(vae, part),
                dynamo=True,
                optimize=True,
                verbose=False,
            )
            program.save(str(path))
    except Exception as exc:  # the exporter raises many types; all mean "this graph did not export"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ZTurboError(
            f"ONNX export of the {part} failed: {first}",
            "rerun with ZTURBO_DEBUG=1 for the exporter's traceback",
        ) from exc
    _describe_graph(path, vae, part, apply_scaling)
    check_onnx(path)
    return path


def _describe_graph(path: Path, vae, part: str, apply_scaling: bool) -> None:
    """Record in the graph itself what it computes, for tools that see the .onnx file alone."""
    import onnx

    model = onnx.load(str(path))
    c = vae.config
    props = {
        "zturbo_version": __version__,
        "zturbo_part": part,
        "zturbo_input": f"{INPUT_NAMES[part]}: " + ("image in [-1, 1]" if part == "encoder" else "latent"),
        "zturbo_output": f"{OUTPUT_NAMES[part]}: "
        + ("latent mean" if part == "encoder" else "image in [-1, 1]"),
        "zturbo_apply_scaling": str(apply_scaling).lower(),
        "zturbo_scaling_factor": repr(float(c.scaling_factor)),
        "zturbo_shift_factor": repr(float(c.shift_factor)),
        "zturbo_downsample_factor": str(c.downsample_factor),
    }
    onnx.helper.set_model_props(model, props)
    model.producer_name = "zturbo"
    onnx.save(model, str(path))


def check_onnx(path: str | Path):
    """``onnx.checker`` (full) and strict shape inference; a failure is an export bug, said plainly."""
    onnx = require("onnx", "ONNX checking", extra="onnx")
    try:
        onnx.checker.check_model(str(path), full_check=True)
        inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    except Exception as exc:  # onnx raises ValidationError / InferenceError
        raise ZTurboError(f"{Path(path).name} fails the ONNX checker: {str(exc).splitlines()[0]}") from exc
    return inferred


def io_shapes(path: str | Path) -> dict[str, list]:
    """Input and output shapes of a graph, symbolic axes as names."""
    onnx = require("onnx", "ONNX checking", extra="onnx")
    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for value in list(model.graph.input) + list(model.graph.output):
        out[value.name] = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    return out
