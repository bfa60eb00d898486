"""Static figures of a model for reports: op counts, parameters, MACs, size, versions, interface.

MACs are counted for Conv, ConvTranspose, Gemm and MatMul at batch 1 (a symbolic dim counts as 1) from ONNX shape
inference; other ops are memory-bound and counted as zero MACs, as onnx-tool and Polygraphy do.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from cnnc.ir.weightless import serialized_size, weightless_copy


def _dims(value: onnx.ValueInfoProto) -> list:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def _numel(dims) -> int:
    return int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in dims], dtype=np.int64)) if dims else 1


def parameter_count(model: onnx.ModelProto) -> int:
    count = sum(int(np.prod(init.dims, dtype=np.int64)) for init in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    count += int(np.prod(attr.t.dims, dtype=np.int64))
    return count


def macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of the conv and matrix ops at batch 1."""
    try:
        inferred = onnx.shape_inference.infer_shapes(weightless_copy(model), strict_mode=False, data_prop=True)
    except Exception:  # shape inference can fail on custom ops; count what it could not see as zero
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
        out = shapes.get(node.output[0]) if node.output else None
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            # Conv: each output element costs Cin/g·∏k MACs; ConvTranspose: each input element feeds Cout/g·∏k.
            weight = shapes.get(node.input[1])
            source = out if node.op_type == "Conv" else shapes.get(node.input[0])
            if weight and source:
                total += _numel(source) * _numel(weight[1:])
        elif node.op_type in ("Gemm", "MatMul") and len(node.input) > 1:
            a = shapes.get(node.input[0])
            if a and out:
                trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
                k = a[-2] if trans_a and len(a) >= 2 else a[-1]
                total += _numel(out) * (k if isinstance(k, int) and k > 0 else 1)
    return int(total)


def model_stats(model: onnx.ModelProto) -> dict:
    def interface(values, skip=()):
        return {v.name: _dims(v) for v in values if v.name not in skip}

    initializers = {init.name for init in model.graph.initializer}
    return {
        "ops": dict(sorted(Counter(node.op_type for node in model.graph.node).items())),
        "nodes": len(model.graph.node),
        "parameters": parameter_count(model),
        "macs": macs(model),
        "size_bytes": serialized_size(model),
        "ir_version": model.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "inputs": interface(model.graph.input, skip=initializers),
        "outputs": interface(model.graph.output),
    }
