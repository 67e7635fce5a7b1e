"""FP16 graphs that cannot overflow silently.

The SDXL VAE is the cautionary case: some decoder activations exceed fp16's
largest finite value (65504) and a plain half-precision cast turns them into
inf and then NaN, silently. Here an fp16 graph is made in three steps:

1. calibration: photos run through the fp32 ONNX graph with every intermediate
   tensor exposed, recording each tensor's largest magnitude;
2. a node stays fp32 when any tensor it reads or writes exceeds
   ``65504 / headroom`` on the calibration photos, and normalisation statistics
   and softmax always stay fp32 (their sums of squares and exponentials are
   where fp16 breaks first);
3. everything else is converted by onnxruntime's float16 converter, which puts
   Cast nodes at the fp32/fp16 borders. Inputs and outputs stay fp32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zturbo.errors import require

FP16_MAX = 65504.0
# Normalisation statistics and softmax: always fp32 (what the GroupNorm / attention of a VAE lower to).
ALWAYS_FP32_OPS = (
    "InstanceNormalization",
    "GroupNormalization",
    "LayerNormalization",
    "BatchNormalization",
    "ReduceMean",
    "ReduceSumSquare",
    "ReduceL2",
    "Softmax",
    "Exp",
)


@dataclass
class Fp16Plan:
    """Which nodes keep fp32 and why."""

    threshold: float
    kept_nodes: dict[str, str] = field(default_factory=dict)  # node name -> reason
    kept_layers: list[str] = field(default_factory=list)  # torch module paths of the kept nodes
    max_activation: float = 0.0
    calibration_inputs: int = 0

    def summary(self) -> dict:
        return {
            "threshold": self.threshold,
            "max_activation": self.max_activation,
            "calibration_inputs": self.calibration_inputs,
            "always_fp32_ops": list(ALWAYS_FP32_OPS),
            "kept_fp32_layers": self.kept_layers,
            "kept_fp32_nodes": len(self.kept_nodes),
        }


def activation_ranges(model_path: str | Path, feeds: list[np.ndarray]) -> dict[str, float]:
    """Largest |value| of every float tensor of the graph over ``feeds`` (non-finite counts as inf)."""
    onnx = require("onnx", "fp16 calibration", extra="onnx")
    ort = require("onnxruntime", "fp16 calibration", extra="onnx")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    graph = model.graph
    known = {v.name for v in graph.output}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    for value in graph.value_info:
        if value.name not in known and value.type.tensor_type.elem_type in float_types:
            graph.output.append(value)
            known.add(value.name)
    options = ort.SessionOptions()
    # No fusion: the tensors measured are the graph's own, node by node.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    input_name = session.get_inputs()[0].name
    ranges: dict[str, float] = {}
    for feed in feeds:  # one input at a time: all intermediates of a batch may not fit in memory
        ranges.setdefault(input_name, 0.0)
        ranges[input_name] = max(ranges[input_name], _max_abs(feed))
        for name, value in zip(names, session.run(names, {input_name: feed})):
            ranges[name] = max(ranges.get(name, 0.0), _max_abs(value))
    return ranges


def _max_abs(value: np.ndarray) -> float:
    if value.size == 0:
        return 0.0
    if not np.isfinite(value).all():
        return float("inf")
    return float(np.abs(value).max())


def _module_path(node) -> str | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [s for s in json.loads(prop.value.replace("'", '"')) if s]
            except ValueError:
                return None
            return scopes[-2] if len(scopes) >= 2 else (scopes[0] if scopes else None)
    return None


def plan_fp16(
    model_path: str | Path, ranges: dict[str, float], headroom: float = 4.0, inputs: int = 0
) -> Fp16Plan:
    """Decide which nodes keep fp32 from the calibration ``ranges``."""
    onnx = require("onnx", "fp16 export", extra="onnx")
    model = onnx.load(str(model_path))
    plan = Fp16Plan(threshold=FP16_MAX / headroom, calibration_inputs=inputs)
    plan.max_activation = max(ranges.values(), default=0.0)
    layers: list[str] = []
    for node in model.graph.node:
        if node.op_type in ALWAYS_FP32_OPS:
            continue  # blocked by type; not part of the per-layer report
        seen = [ranges[t] for t in list(node.input) + list(node.output) if t in ranges]
        peak = max(seen, default=0.0)
        if peak > plan.threshold:
            plan.kept_nodes[node.name] = f"|x| reaches {peak:.4g} (> {plan.threshold:.4g})"
            layer = _module_path(node)
            if layer and layer not in layers:
                layers.append(layer)
    plan.kept_layers = layers
    return plan


def convert_to_fp16(src: str | Path, dst: str | Path, plan: Fp16Plan | None) -> Path:
    """Write the fp16 version of ``src`` to ``dst``; ``plan=None`` converts with no range guard."""
    onnx = require("onnx", "fp16 export", extra="onnx")
    require("onnxruntime", "fp16 export", extra="onnx")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=list(ALWAYS_FP32_OPS),
        node_block_list=list(plan.kept_nodes) if plan else [],
    )
    _topological_sort(converted.graph)
    # The converter leaves some intermediate type annotations stale; shape inference rebuilds them.
    del converted.graph.value_info[:]
    converted = _skip_fp16_round_trips(converted)
    onnx.save(converted, str(dst))
    return Path(dst)


def _skip_fp16_round_trips(model):
    """Let fp32 nodes feed fp32 nodes directly.

    The converter wraps every kept node in Casts: fp32 -> fp16 after it and
    fp16 -> fp32 before the next one, so two adjacent kept nodes still pass
    their tensor through fp16, which is exactly the overflow the guard exists to
    avoid. Each Cast(fp16 -> fp32) fed by a Cast(fp32 -> fp16) becomes an
    Identity of the original fp32 tensor; Casts left unused are removed.
    """
    onnx = require("onnx", "fp16 export", extra="onnx")
    from onnx import TensorProto

    typed = onnx.shape_inference.infer_shapes(model)
    elem = {
        v.name: v.type.tensor_type.elem_type for v in list(typed.graph.value_info) + list(typed.graph.input)
    }
    elem.update({t.name: t.data_type for t in model.graph.initializer})
    producer = {o: n for n in model.graph.node for o in n.output}

    def cast_to(node) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    for node in model.graph.node:
        if cast_to(node) != TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if (
            first is None
            or cast_to(first) != TensorProto.FLOAT16
            or elem.get(first.input[0]) != TensorProto.FLOAT
        ):
            continue
        node.op_type = "Identity"
        del node.attribute[:]
        node.input[0] = first.input[0]

    graph_outputs = {o.name for o in model.graph.output}
    while True:
        used = {i for n in model.graph.node for i in n.input} | graph_outputs
        dead = [n for n in model.graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not dead:
            return model
        for n in dead:
            model.graph.node.remove(n)


def _topological_sort(graph) -> None:
    """Reorder nodes so each comes after its inputs' producers (the converter appends its Casts at the end)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError("graph has a cycle or an input nobody produces")
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        for node in ready:
            ordered.append(node)
            available.update(node.output)
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)
