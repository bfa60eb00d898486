"""Detached nodes that describe a replacement before it is computed, for `nodes_cost` to price.

A sketch's weights are zero-stride numpy views (`np.broadcast_to`): they report the real shape and byte count and
take no memory, so a 2048×4096 Gemm can be priced for nothing. Sketch tensors are fresh objects, never the graph's
own, so building a sketch never rewires the graph.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from cnnc import ir
from cnnc.cost.model import Cost, nodes_cost


class Sketch:
    """Builds a chain of detached nodes; `nodes` is what `nodes_cost` prices."""

    def __init__(self, dtype=np.float32):
        self.dtype = dtype
        self.nodes: list[gs.Node] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"sketch_{hint}_{self._count}"

    def tensor(self, shape, hint: str = "t") -> gs.Variable:
        """A detached activation of `shape` (batch first)."""
        return gs.Variable(self._name(hint), dtype=self.dtype, shape=list(shape))

    def weight(self, shape, hint: str = "w") -> gs.Constant:
        return gs.Constant(self._name(hint), np.broadcast_to(np.zeros(1, self.dtype), tuple(shape)))

    def op(self, op: str, inputs, shape, attrs=None) -> gs.Variable:
        out = self.tensor(shape, op.lower())
        self.nodes.append(gs.Node(op, self._name(op.lower()), dict(attrs or {}), list(inputs), [out]))
        return out


def followers(tensors) -> list[gs.Node]:
    """The nodes outside a region that onnxruntime could fuse into the region's last kernel: the sole reader of each
    output tensor. Pricing a region with them, and its replacement with their sketches (`follow`), credits fusions
    the rewrite would break (a Relu after Conv+Add) or keep."""
    return [t.outputs[0] for t in tensors if len(t.outputs) == 1]


def follow(sketch: Sketch, node: gs.Node, replaced: gs.Tensor, source: gs.Tensor) -> None:
    """Add a detached copy of the follower `node` that reads `source` where it read `replaced`. Its other inputs are
    detached copies too (a graph tensor in a sketch would gain a reader: `gs.Node` registers itself)."""
    def copy(tensor: gs.Tensor) -> gs.Tensor:
        if tensor is replaced:
            return source
        if ir.is_constant(tensor):
            return sketch.weight(tensor.shape or [1], "c")
        return sketch.tensor(tensor.shape or [1])
    sketch.op(node.op, [copy(t) for t in node.inputs], node.outputs[0].shape or source.shape, node.attrs)


def _unique(nodes) -> list[gs.Node]:
    seen, out = set(), []
    for node in nodes:
        if id(node) not in seen:
            seen.add(id(node))
            out.append(node)
    return out


def region_cost(nodes, outputs, graph_outputs=()) -> Cost:
    """The cost of a region of graph nodes with the followers of its `outputs` (see `followers`)."""
    nodes = list(nodes)
    members = {id(n) for n in nodes}
    extra = [f for f in _unique(followers(outputs)) if id(f) not in members]
    return nodes_cost(nodes + extra, materialised=graph_outputs)


def replacement_cost(sketch: Sketch, produced: dict, graph_outputs=()) -> Cost:
    """The cost of `sketch` replacing a region whose output tensors map to sketch tensors in `produced`
    ({id(original): (original, sketch tensor)}), with detached copies of the originals' followers."""
    originals = [original for original, _ in produced.values()]
    for follower in _unique(followers(originals)):
        for tensor in follower.inputs:
            if id(tensor) in produced:
                follow(sketch, follower, tensor, produced[id(tensor)][1])
                break
    kept = {id(t) for t in graph_outputs}
    return nodes_cost(sketch.nodes, materialised=[s for o, s in produced.values() if id(o) in kept])


def _batch_one(shape) -> list:
    return [1, *shape[1:]] if shape else [1]


def conv_sketch(source: gs.Tensor, target: gs.Tensor, weight_shape, dtype=np.float32) -> tuple[Sketch, dict]:
    """One Conv (with bias) from `source` to `target`: the collapse conv form, priced from its geometry."""
    sketch = Sketch(dtype)
    x = sketch.tensor(_batch_one(source.shape), "x")
    y = sketch.op("Conv", [x, sketch.weight(weight_shape), sketch.weight(weight_shape[:1])],
                  _batch_one(target.shape), {"kernel_shape": list(weight_shape[2:])})
    return sketch, {id(target): (target, y)}


def gemm_sketch(inputs, outputs, factors=(), dtype=np.float32) -> tuple[Sketch, dict]:
    """Flatten/Concat -> Gemm(s) -> Split/Reshape from `inputs` to `outputs` (per-sample sizes n and m). With
    `factors` (a cut of size r) W = W2·W1 runs as two thin Gemms n -> r -> m."""
    sketch = Sketch(dtype)
    flats = []
    for tensor in inputs:
        x = sketch.tensor(_batch_one(tensor.shape), "x")
        size = math.prod(_batch_one(tensor.shape))
        flats.append(x if len(tensor.shape) == 2 else sketch.op("Flatten", [x], [1, size], {"axis": 1}))
    n = sum(f.shape[1] for f in flats)
    x = flats[0] if len(flats) == 1 else sketch.op("Concat", flats, [1, n], {"axis": 1})
    sizes = [math.prod(_batch_one(t.shape)) for t in outputs]
    m = sum(sizes)
    for width in [*factors, m]:
        x = sketch.op("Gemm", [x, sketch.weight([width, x.shape[1]]), sketch.weight([width])], [1, width],
                      {"transB": 1})
    parts = [x] if len(outputs) == 1 else [sketch.tensor([1, s], "part") for s in sizes]
    if len(outputs) > 1:
        sketch.nodes.append(gs.Node("Split", "sketch_split", {"axis": 1}, [x], parts))
    produced = {}
    for tensor, part in zip(outputs, parts):
        if len(tensor.shape) != 2:
            part = sketch.op("Reshape", [part, sketch.weight([len(tensor.shape)])], _batch_one(tensor.shape))
        produced[id(tensor)] = (tensor, part)
    return sketch, produced


def polyphase_conv_sketch(source: gs.Tensor, target: gs.Tensor, phases_shape, weight_shape, rearrange: str,
                          dtype=np.float32) -> tuple[Sketch, dict]:
    """destride's replacement of one strided conv: the input rearranged into its phases (`rearrange`: "Slice" for
    one phase read directly, else "Transpose", the copy a space-to-depth is), then a stride-1 Conv."""
    sketch = Sketch(dtype)
    x = sketch.op(rearrange, [sketch.tensor(_batch_one(source.shape), "x")], _batch_one(phases_shape))
    y = sketch.op("Conv", [x, sketch.weight(weight_shape), sketch.weight(weight_shape[:1])], _batch_one(target.shape),
                  {"kernel_shape": list(weight_shape[2:])})
    return sketch, {id(target): (target, y)}
