"""Static figures of a model for reports: op counts, parameters, MACs, size, versions, interface.

MACs are counted at batch 1 (a symbolic dim counts as 1) from ONNX shape inference, by the counter that the op table
(cnnc.ir.ops, column `macs`) gives Conv, ConvTranspose, Gemm and MatMul; other ops are memory-bound and counted as
zero MACs, as onnx-tool and Polygraphy do.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable

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


def macs(model: onnx.ModelProto, light: onnx.ModelProto | None = None) -> int:
    """Multiply-accumulates of the conv and matrix ops at batch 1; `light`: `weightless_copy(model)`, if made."""
    counted = _mac_nodes(model.graph)
    if counted and not _mac_shapes_known(model.graph, counted):  # known e.g. in cnnc's own output
        try:
            light = weightless_copy(model) if light is None else light
            inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)  # (same nodes)
        except Exception:  # noqa: BLE001 — inference can fail on custom ops; count what it could not see as zero
            inferred = model
    else:  # nothing to count, or shape inference would add nothing these ops read
        inferred = model
    shapes = _Shapes(inferred.graph)
    return int(sum(counter(node, shapes) for node, counter in counted))


def _mac_nodes(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, Callable]]:
    """The nodes with a MAC counter (cnnc.ir.ops, column `macs`), each with its counter; the table is read once per
    op type, not per node."""
    counters = {op: facts(op).macs for op in {node.op_type for node in graph.node}}
    return [(node, counters[node.op_type]) for node in graph.node if counters[node.op_type] is not None]


class _Shapes:
    """The dims of a graph's tensors by name, as the MAC counters read them (`get`): a Constant node's value, else
    an initializer, else the last of the inputs, value_info and outputs that declares the name ([] when its type has
    no shape). Each is converted on first read: the counters read ~2 names a conv, not the whole graph's 2 per node
    (0.6 s of a 100k-node model's stats)."""

    def __init__(self, graph: onnx.GraphProto):
        self._declared = {v.name: v for v in itertools.chain(graph.input, graph.value_info, graph.output)}
        self._dims: dict[str, list] = {init.name: list(init.dims) for init in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self._dims[node.output[0]] = list(attr.t.dims)

    def get(self, name: str, default=None):
        dims = self._dims.get(name)
        if dims is None:
            if name not in self._declared:
                return default
            dims = self._dims[name] = _dims(self._declared[name])
        return dims


def _mac_shapes_known(graph: onnx.GraphProto, counted: list | None = None) -> bool:
    """Whether every tensor a MAC counter reads (the inputs and first output of conv and matrix ops, `counted` by
    `_mac_nodes`) already has a shape in `graph` (value_info, inputs, outputs, initializers), so that shape inference
    (seconds on a 100k-node graph) would not change the count."""
    needed = {name for node, _ in (_mac_nodes(graph) if counted is None else counted)
              for name in [*node.input, *node.output[:1]] if name}
    needed.difference_update(init.name for init in graph.initializer)
    for value in itertools.chain(graph.input, graph.value_info, graph.output):
        if value.name in needed and value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            needed.discard(value.name)
    return not needed


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
    light = weightless_copy(model)  # for the size and the MAC count's shape inference (a copy of the whole graph)
    return {
        "ops": dict(sorted(Counter(node.op_type for node in model.graph.node).items())),
        "nodes": len(model.graph.node),
        "parameters": parameter_count(model),
        "macs": macs(model, light),
        "depth": depth(model),
        "size_bytes": serialized_size(model, light),
        "ir_version": model.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "inputs": interface(model.graph.input, skip=initializers),
        "outputs": interface(model.graph.output),
    }
