"""Canonical form for passes: exporter shape sub-graphs folded to plain constants, shapes inferred.

Exporters compute op parameters at run time from the input's shape: torch's `F.pad` emits a ConstantOfShape /
Concat / Slice / Reshape chain (folded by graphsurgeon's constant folding), and `F.interpolate(size=...)` with a
dynamic batch emits `Resize(X, sizes=Concat(Shape(X)[0:2], [h, w]))`, which no folding can make constant because N
is symbolic. onnxruntime itself turns such `sizes` into scales `out/in` (float32) and output dims
`int(scale·in)`, so when that product gives back `out` for every static axis, a constant `scales` input is the
same computation bit for bit, and passes see a plain constant.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from cnnc import ir


def _leading_dims_of(tensor: gs.Tensor, data: gs.Tensor) -> int | None:
    """How many leading dims of `data` the tensor `Shape(data)[0:k]` (or `Shape(data)` sliced so) carries, else None."""
    producer = ir.sole_producer(tensor)
    if producer is None or producer.op != "Slice":
        return None
    shape_node = ir.sole_producer(producer.inputs[0])
    if shape_node is None or shape_node.op != "Shape" or shape_node.inputs[0] is not data or shape_node.attrs.get(
            "start", 0) != 0 or "end" in shape_node.attrs:
        return None
    params = [ir.constant_value(t) for t in producer.inputs[1:]]
    if any(p is None for p in params):
        return None
    starts, ends = params[0], params[1]
    axes = params[2] if len(params) > 2 else np.zeros(1)
    steps = params[3] if len(params) > 3 else np.ones(1)
    if starts.size != 1 or int(starts[0]) != 0 or int(axes[0]) != 0 or int(steps[0]) != 1:
        return None
    return int(ends[0])


def resize_sizes_to_scales(graph: gs.Graph) -> int:
    """Rewrite exporter `Resize(X, sizes=Concat(Shape(X)[0:k], const))` with constant scales where exact."""
    rewritten = 0
    for node in graph.nodes:
        if node.op != "Resize" or len(node.inputs) < 4 or ir.is_empty_input(node.inputs[3]):
            continue
        data, sizes = node.inputs[0], node.inputs[3]
        concat = ir.sole_producer(sizes)
        shape = data.shape
        if concat is None or concat.op != "Concat" or len(concat.inputs) != 2 or shape is None:
            continue
        kept = _leading_dims_of(concat.inputs[0], data)
        tail = ir.constant_value(concat.inputs[1])
        policy = node.attrs.get("keep_aspect_ratio_policy", "stretch")
        if kept is None or tail is None or kept + tail.size != len(shape) or node.attrs.get("axes") is not None \
                or (policy.decode() if isinstance(policy, bytes) else policy) != "stretch":
            continue  # (not_larger / not_smaller derive one common scale from `sizes`: not per-axis scales)
        static = shape[kept:]
        if not all(isinstance(d, int) and d > 0 for d in static):
            continue
        scales = [np.float32(1.0)] * kept + [np.float32(out) / np.float32(dim) for out, dim in zip(tail, static)]
        # onnxruntime: output dim = int64(scale * input dim) in float32; only rewrite when that gives `out` back.
        if any(int(np.float32(s) * np.float32(d)) != int(o) for s, d, o in zip(scales[kept:], static, tail)):
            continue
        node.inputs[2] = ir.make_constant(node.name + "_scales", np.array(scales, dtype=np.float32), graph)
        node.inputs.pop()  # drop `sizes`: scales and sizes are mutually exclusive
        rewritten += 1
    return rewritten


# Ops that constant folding may rewrite although an input is not constant: Shape/Size of a static tensor, If with
# a constant condition (flattened), and Constant ops (lowered to constants).
_FOLDABLE_OPS = frozenset({"Shape", "Size", "If", "Constant"})


def may_fold(graph: gs.Graph) -> bool:
    """Whether constant folding could change `graph`: some node reads only constants (or nothing), is one of
    `_FOLDABLE_OPS`, or has a subgraph. Folding starts from constant tensors, so when no node qualifies it has
    nothing to do, and this linear scan spares its cost (graphsurgeon copies and sorts the whole graph: 26 s of a
    100k-node chain's compile)."""
    for node in graph.nodes:
        if node.op in _FOLDABLE_OPS or ir.has_subgraph(node):
            return True
        if all(ir.is_constant(t) or ir.is_empty_input(t) for t in node.inputs):
            return True
    return False


def canonicalize(graph: gs.Graph) -> gs.Graph:
    """Fold constant sub-graphs, make exporter Resize sizes constant, tidy, and infer shapes (once, unless a Resize
    was rewritten)."""
    graph = ir.tidy(graph)
    if may_fold(graph):
        graph = ir.fold_constant_subgraphs(graph)
    graph = ir.refresh_shapes(graph)  # resize_sizes_to_scales reads the static dims of Resize inputs
    if resize_sizes_to_scales(graph):
        graph = ir.refresh_shapes(ir.fold_constant_subgraphs(graph))
    return graph
