"""What some nodes cost onnxruntime per sample: MACs, weight bytes, activation bytes and kernels, fusions included.

Counting, per node at batch 1 (a symbolic or unknown dim counts as 1):
- MACs: Conv Cout·H'W'·Cin/g·∏k, ConvTranspose Cin·HW·Cout/g·∏k, Gemm/MatMul K per output element, AveragePool ∏k per
  output element, reductions one per input element, any other op one per output element, data movement none;
- weight bytes: every constant input (initializer or Constant node), read once per run whatever the batch;
- activation bytes: every variable input read and every output written, per sample;
- kernels: one per node, except those onnxruntime removes (Identity, Dropout) and those it fuses.

Fusions (onnxruntime's graph transformers at ORT_ENABLE_EXTENDED and above, CPU and CUDA alike): a node F whose
only variable input T is written by a fusion anchor (Conv, Gemm, MatMul) and read by F alone runs inside the
anchor's kernel: Conv + BatchNormalization / Mul / Add by a constant (ConvBNFusion, ConvMulFusion, ConvAddFusion),
Conv + Add of a second activation (the residual input Z of FusedConv), Conv / Gemm + activation
(ConvActivationFusion, GemmActivationFusion), MatMul + Add of a constant (MatMulAddFusion -> Gemm) and
MatMul + BatchNormalization. After the activation nothing more fuses; a Conv takes one residual Add. A fused F adds
no kernel and removes the round trip of T: T is neither written by the anchor nor read by F (−2·bytes(T)).
A tensor that is a graph output or has another reader is materialised, so nothing fuses through it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from cnnc import ir

ANCHORS = ("Conv", "Gemm", "MatMul")
ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid")
REMOVED = ("Identity", "Dropout")  # EliminateIdentity, EliminateDropout
IN_PLACE = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")  # a kernel launch, no copy (the buffer is reused)
REDUCTIONS = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax")


@dataclass(frozen=True)
class Cost:
    """Per-sample (batch 1) figures of some nodes as onnxruntime runs them; `weight_bytes` do not grow with batch."""

    macs: int = 0
    weight_bytes: int = 0
    activation_bytes: int = 0
    kernels: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.macs + other.macs, self.weight_bytes + other.weight_bytes,
                    self.activation_bytes + other.activation_bytes, self.kernels + other.kernels)

    def as_dict(self) -> dict:
        return {"macs": self.macs, "weight_bytes": self.weight_bytes, "activation_bytes": self.activation_bytes,
                "kernels": self.kernels}


def _sample_numel(shape) -> int:
    """Elements of one sample of a tensor (axis 0 is the batch; symbolic or unknown dims count as 1)."""
    if not shape:
        return 1 if shape is not None and len(shape) == 0 else 0
    return math.prod(d if isinstance(d, int) and d > 0 else 1 for d in shape[1:])


def _itemsize(tensor: gs.Tensor) -> int:
    try:
        return np.dtype(tensor.dtype).itemsize if tensor.dtype is not None else 4
    except TypeError:  # an onnx dtype numpy does not know (bfloat16 ...): two bytes is the common case
        return 2


def tensor_bytes(tensor: gs.Tensor) -> int:
    """Bytes of one sample of an activation."""
    return _sample_numel(tensor.shape) * _itemsize(tensor)


def constant_bytes(tensor: gs.Tensor) -> int | None:
    """Bytes of a constant input without loading a lazy initializer; None when `tensor` is not a constant."""
    if isinstance(tensor, gs.Constant):
        return math.prod(tensor.shape) * np.dtype(tensor.dtype).itemsize
    value = ir.constant_value(tensor)
    return None if value is None else int(value.nbytes)


def _kernel_size(node: gs.Node) -> int:
    if node.op in ("Conv", "ConvTranspose") and len(node.inputs) > 1 and node.inputs[1].shape:
        return math.prod(node.inputs[1].shape[1:])
    kernel = node.attrs.get("kernel_shape")
    return math.prod(kernel) if kernel else 1


def node_macs(node: gs.Node) -> int:
    """Per-sample multiply-accumulates of one node (module docstring)."""
    if not node.outputs or node.op in REMOVED + IN_PLACE or node.op in ("Concat", "Split", "Slice", "Transpose"):
        return 0
    out = _sample_numel(node.outputs[0].shape)
    if node.op == "Conv":
        return out * _kernel_size(node)
    if node.op == "ConvTranspose":
        return _sample_numel(node.inputs[0].shape) * _kernel_size(node)
    if node.op in ("Gemm", "MatMul"):
        a = node.inputs[0].shape
        k = a[-2] if a and int(node.attrs.get("transA", 0)) and len(a) >= 2 else (a[-1] if a else 1)
        return out * (k if isinstance(k, int) and k > 0 else 1)
    if node.op in ("AveragePool", "MaxPool"):
        return out * _kernel_size(node)
    if node.op in REDUCTIONS:
        return _sample_numel(node.inputs[0].shape)
    return out


def _variable_inputs(node: gs.Node) -> list[gs.Tensor]:
    return [t for t in node.inputs if not ir.is_empty_input(t) and constant_bytes(t) is None]


def _fusion_kind(anchor_op: str, node: gs.Node, fused_input: gs.Tensor) -> str | None:
    """Which fusion step `node` is when its input `fused_input` comes from a kernel anchored at `anchor_op`."""
    others = [t for t in _variable_inputs(node) if t is not fused_input]
    op = node.op
    if op in ACTIVATIONS and not others:
        return "activation" if anchor_op in ("Conv", "Gemm") else None
    if op == "BatchNormalization" and not others and anchor_op in ("Conv", "MatMul"):
        return "affine"
    if op in ("Mul", "Add") and not others and anchor_op == "Conv":
        return "affine"
    if op == "Add" and not others and anchor_op == "MatMul":
        return "bias"
    if op == "Add" and len(others) == 1 and anchor_op == "Conv":
        return "residual"
    return None


def node_costs(nodes: Iterable[gs.Node], materialised: Iterable[gs.Tensor] = ()) -> list[tuple[gs.Node, Cost]]:
    """Each of `nodes` (in topological order) with its share of their cost as onnxruntime runs them: a fused node
    has no kernel and a negative share of activation bytes (the round trip it saves; module docstring).
    `materialised` are tensors that must be written even when a fusion could skip them (graph outputs)."""
    nodes = list(nodes)
    members = {id(n) for n in nodes}
    kept = {id(t) for t in materialised}
    # id(tensor) -> (anchor op, fusion steps taken) for a tensor written by a kernel that may still absorb a node.
    open_kernels: dict[int, tuple[str, frozenset]] = {}
    seen_weights: set[int] = set()
    shares = []
    for node in nodes:
        if not node.outputs:
            continue
        weights = 0
        for tensor in node.inputs:  # a weight shared by several nodes is read once
            size = None if ir.is_empty_input(tensor) or id(tensor) in seen_weights else constant_bytes(tensor)
            if size is not None:
                seen_weights.add(id(tensor))
                weights += size
        if node.op in REMOVED:
            shares.append((node, Cost(0, weights, 0, 0)))
            continue
        variables = _variable_inputs(node)
        moved = sum(tensor_bytes(t) for t in variables) + sum(tensor_bytes(t) for t in node.outputs)
        fused_into = next((t for t in variables if id(t) in open_kernels), None)
        kind = None
        if fused_into is not None:
            anchor, steps = open_kernels[id(fused_into)]
            kind = _fusion_kind(anchor, node, fused_into)
            if kind is not None and (kind in steps or "activation" in steps):
                kind = None  # one residual, one activation, nothing after the activation
        if kind is not None:
            share = Cost(node_macs(node), weights, moved - 2 * tensor_bytes(fused_into), 0)
            state = ("Gemm" if kind == "bias" else anchor, steps | {kind})  # MatMul + Add became a Gemm
        else:
            share = Cost(node_macs(node), weights, 0 if node.op in IN_PLACE else moved, 1)
            state = (node.op, frozenset()) if node.op in ANCHORS else None
        shares.append((node, share))
        output = node.outputs[0]
        if state is not None and len(node.outputs) == 1 and id(output) not in kept and len(output.outputs) == 1 \
                and id(output.outputs[0]) in members:
            open_kernels[id(output)] = state
    return shares


def nodes_cost(nodes: Iterable[gs.Node], materialised: Iterable[gs.Tensor] = ()) -> Cost:
    """The cost of `nodes` (in topological order) as onnxruntime runs them: fused ops add no kernel and no
    activation round trip (module docstring); `materialised` as in `node_costs`."""
    total = Cost()
    for _, share in node_costs(nodes, materialised):
        total = total + share
    return total
