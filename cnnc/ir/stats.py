"""Static figures of a model for reports: op counts, parameters, MACs, size, versions, interface.

MACs are counted at batch 1 (a symbolic dim counts as 1) from ONNX shape inference, by the counter that the op table
(cnnc.ir.ops, column `macs`) gives Conv, ConvTranspose, Gemm and MatMul; other ops are memory-bound and counted as
zero MACs, as onnx-tool and Polygraphy do.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx

from cnnc.ir.ops import facts
from cnnc.ir.weightless import serialized_size, weightless_copy


def _dims(value: onnx.ValueInfoProto) -> list:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def parameter_count(model: onnx.ModelProto) -> int:
    count = sum(math.prod(init.dims) for init in model.graph.initializer)  # (math: np.prod costs ~10 µs a call)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    count += int(np.prod(attr.t.dims, dtype=np.int64))
    return count


def macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of the conv and matrix ops at batch 1."""
    if _mac_shapes_known(model.graph):  # e.g. cnnc's own output: shape inference would add nothing these ops read
        inferred = model
    else:
        try:
            inferred = onnx.shape_inference.infer_shapes(weightless_copy(model), strict_mode=False, data_prop=True)
        except Exception:  # noqa: BLE001 — inference can fail on custom ops; count what it could not see as zero
            inferred = model
    graph = inferred.graph
    shapes = {v.name: _dims(v) for v in list(graph.input) + list(graph.value_info) + list(graph.output)}
    shapes.update({init.name: list(init.dims) for init in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(attr.t.dims)
    total = 0
    for node in graph.node:
        counter = facts(node.op_type).macs
        if counter is not None:
            total += counter(node, shapes)
    return int(total)


def _mac_shapes_known(graph: onnx.GraphProto) -> bool:
    """Whether every tensor a MAC counter reads (the inputs and first output of conv and matrix ops) already has a
    shape in `graph` (value_info, inputs, outputs, initializers), so that shape inference (seconds on a 100k-node
    graph) would not change the count."""
    known = {v.name for v in [*graph.input, *graph.value_info, *graph.output] if v.type.HasField("tensor_type")
             and v.type.tensor_type.HasField("shape")}
    known.update(init.name for init in graph.initializer)
    return all(name in known for node in graph.node if facts(node.op_type).macs is not None
               for name in [*node.input, *node.output[:1]] if name)


def depth(model: onnx.ModelProto) -> int:
    """The longest path counted in conv and matrix ops (those with a MAC counter): a network's depth as the train-for-
    collapse report states it (a collapsed chain of k convs counts 1)."""
    weighted = {op for op in {n.op_type for n in model.graph.node} if facts(op).macs is not None}
    at: dict[str, int] = {}  # tensor name -> depth of its producer
    # The nodes of a valid ONNX graph are topologically sorted (the checker insists), so one sweep suffices.
    for node in model.graph.node:
        d = max((at.get(name, 0) for name in node.input), default=0) + (node.op_type in weighted)
        for name in node.output:
            at[name] = d
    return max((at.get(o.name, 0) for o in model.graph.output), default=0)


def model_stats(model: onnx.ModelProto) -> dict:
    def interface(values, skip=()):
        return {v.name: _dims(v) for v in values if v.name not in skip}

    initializers = {init.name for init in model.graph.initializer}
    return {
        "ops": dict(sorted(Counter(node.op_type for node in model.graph.node).items())),
        "nodes": len(model.graph.node),
        "parameters": parameter_count(model),
        "macs": macs(model),
        "depth": depth(model),
        "size_bytes": serialized_size(model),
        "ir_version": model.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "inputs": interface(model.graph.input, skip=initializers),
        "outputs": interface(model.graph.output),
    }
