"""Further forms for the differential fuzzer (tests/fuzz_graphs.py): issue 16's structural classes.

- opset 18-21 forms (a case draws its opset from 17..21; IR version 8, 9 from opset 19, 10 from opset 21, as onnx
  pairs them): Reduce{Mean,Max,Sum} with `axes` as an input (ReduceMean/ReduceMax take it as an input only since
  opset 18) as a squeeze-and-excite gate x·tanh(reduce(x)); Split with `num_outputs` (opset 18), every chunk
  processed on its own and concatenated back; Pad with `axes` (opset 18; in GraphBuilder.pad).
- a constant-condition If (the condition an initializer or a Constant node) whose branches each hold a conv
  sub-graph (Conv, maybe BN and an activation) reading the outer tensor, with the weights outside the branches (the
  outer scope, the case of issue 16's defect 2) or inside them;
- inputs shadowed by an initializer (IR >= 4: an input with a default): a float weight, bias or BN parameter is
  also declared as a graph input and the check feeds it a value other than its default, so a pass that bakes the
  default in gives a wrong result, and one that drops the input gives an interface mismatch;
- float16 graphs: every float tensor (weights, inputs, outputs, branch outputs) in float16, except Resize's scales,
  which ONNX types float32 whatever the data. onnxruntime's CPU provider runs each generated op in float16 (checked
  by test_fuzz.py's validity test).

Every function takes the GraphBuilder (duck-typed: `draw`, `rng`, `shapes`, `nodes`, `initializers`, `blocks`,
`fresh`, `constant`, `node`, ...), whose shapes are per sample (batch left out).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.helper as oh

OPSETS = (17, 18, 19, 20, 21)  # the first is the simplest: hypothesis shrinks towards it
SHADOWABLE_HINTS = ("W", "B", "g", "beta", "mu", "var", "t", "Wg", "C")  # float weights; never shapes, pads, axes


def ir_version_for(opset: int) -> int:
    """The IR version onnx released with `opset` (onnx 1.13: 8/18, 1.14: 9/19, 1.15: 9/20, 1.16: 10/21)."""
    return 10 if opset >= 21 else 9 if opset >= 19 else 8


def reduce_gate(b, x: str) -> str:
    """y = x · tanh(Reduce(x, axes)) with keepdims=1 and the axes as an input tensor (opset >= 18)."""
    op = b.draw.choice(["ReduceMean", "ReduceMax", "ReduceSum"])
    axes = b.draw.choice([[2, 3], [-1, -2], [3, 2], [2], [-1]])
    shape = list(b.shapes[x])
    for axis in axes:
        shape[axis % 4 - 1] = 1
    reduced = b.node(op, [x, b.constant("axes", np.array(axes, np.int64))], tuple(shape), keepdims=1)
    if op == "ReduceSum":  # a sum over up to 24·24 values: keep the gate's argument O(1)
        count = int(np.prod(b.shapes[x])) // int(np.prod(shape))
        reduced = b.scale(reduced, 1.0 / count)
    gate = b.node("Tanh", [reduced], b.shapes[reduced])
    b.blocks.append(f"{op} axes={axes} (input) gate")
    return b.node("Mul", [x, gate], b.shapes[x])


def split_block(b, x: str) -> str:
    """Split with `num_outputs` (opset >= 18; an uneven split makes the last chunk smaller), each chunk through an
    activation or a same-size conv, and Concat back along the split axis."""
    axis = b.draw.choice([1, 2, 3, -1])
    dim = axis % 4 - 1
    size = b.shapes[x][dim]
    counts = [n for n in (2, 3) if n <= size and size - math.ceil(size / n) * (n - 1) > 0]
    if not counts:
        return x
    n = b.draw.choice(counts)
    step = math.ceil(size / n)
    sizes = [step] * (n - 1) + [size - step * (n - 1)]
    outputs = [b.fresh("split_") for _ in range(n)]
    b.nodes.append(oh.make_node("Split", [x], outputs, name=b.fresh("n") if b.named else "", axis=axis,
                                num_outputs=n))
    chunks = []
    for name, length in zip(outputs, sizes):
        shape = list(b.shapes[x])
        shape[dim] = length
        b.shapes[name] = tuple(shape)
        if b.draw.flag(0.5):
            chunks.append(b.activation(name))
        elif b.draw.flag(0.5):
            cout = length if dim == 0 else shape[0]  # a channel split keeps its chunk's width: Concat restores it
            chunks.append(b.same_size_conv(name, cout, (1, 1)))
        else:
            chunks.append(name)
    b.blocks.append(f"Split axis={axis} num_outputs={n} sizes={sizes} on {b.shapes[x]}")
    return b.node("Concat", chunks, b.shapes[x], axis=axis)


def if_block(b, x: str) -> str:
    """A constant-condition If whose branches are conv sub-graphs of one output shape reading `x` from the outer
    scope; the weights are outer initializers or the branches' own."""
    cin = b.shapes[x][0]
    cout = b.draw.choice([cin, b.draw.integer(1, 6)])
    outer_nodes, outer_initializers = b.nodes, b.initializers
    inner_weights = b.draw.flag(0.4)
    branches = []
    for branch in ("then", "else"):
        b.nodes = []
        if inner_weights:
            b.initializers = []
        b.blocks.append(f"If {branch} branch:")
        y = b.same_size_conv(x, cout, (1, 1))
        if b.draw.flag(0.6):
            y = b.batch_norm(y)
        if b.draw.flag(0.5):
            y = b.activation(y)
        out = b.fresh(f"{branch}_out")
        b.nodes.append(oh.make_node("Identity", [y], [out]))
        b.shapes[out] = b.shapes[y]
        branches.append(oh.make_graph(b.nodes, f"{branch}_{b.fresh('g')}", [],
                                      [oh.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)],
                                      initializer=b.initializers if inner_weights else []))
    b.nodes, b.initializers = outer_nodes, outer_initializers
    taken = b.draw.flag(0.5)
    if b.draw.flag(0.5):
        condition = b.constant("cond", np.array(taken))
    else:
        condition = b.node("Constant", [], (), value=onnx.numpy_helper.from_array(np.array(taken), "c"))
    b.blocks.append(f"If cond={taken} ({'constant' if condition.startswith('constant') else 'initializer'}), "
                    f"weights {'inside the branches' if inner_weights else 'outside'}")
    return b.node("If", [condition], (cout, *b.shapes[x][1:]), then_branch=branches[0], else_branch=branches[1])


def shadow_inputs(b, rng: np.random.Generator) -> tuple[list[onnx.ValueInfoProto], dict[str, np.ndarray]]:
    """Declare one or two float initializers as graph inputs too (IR >= 4: inputs with a default), and the feeds
    that override them: the default times U(0.5, 1.5) per element (signs kept, BN variances stay positive)."""
    candidates = [t for t in b.initializers if t.name.rstrip("0123456789") in SHADOWABLE_HINTS]
    if not candidates:
        return [], {}
    chosen = [candidates[i] for i in sorted(rng.choice(len(candidates), min(len(candidates),
                                                                            b.draw.integer(1, 2)), replace=False))]
    infos, feeds = [], {}
    for tensor in chosen:
        default = onnx.numpy_helper.to_array(tensor)
        infos.append(oh.make_tensor_value_info(tensor.name, tensor.data_type, list(default.shape)))
        feeds[tensor.name] = (default * rng.uniform(0.5, 1.5, default.shape)).astype(default.dtype)
        b.blocks.append(f"input {tensor.name} {list(default.shape)} shadowed by its initializer")
    return infos, feeds


def to_float16(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    """Every float32 tensor of `model` (and of its If branches) and of `feeds` to float16, in place; Resize's scales
    stay float32 (their type is fixed by the op, not by the data)."""
    _graph_to_float16(model.graph)
    for name, value in feeds.items():
        if value.dtype == np.float32:
            feeds[name] = value.astype(np.float16)


def _graph_to_float16(graph: onnx.GraphProto) -> None:
    scales = {node.input[2] for node in graph.node if node.op_type == "Resize" and len(node.input) > 2}
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == onnx.TensorProto.FLOAT and tensor.name not in scales:
            graph.initializer[index].CopyFrom(onnx.numpy_helper.from_array(
                onnx.numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _graph_to_float16(attribute.g)
