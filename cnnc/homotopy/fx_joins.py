"""The residual joins of a torch.fx graph: the fx adapter of `cnnc.ir.residual_joins`.

The rule (identity skip, or a *linear* projection skip that is the shorter path from the block input) is the one
`cnnc.analysis` applies to ONNX graphs, so that a model and its ONNX export have the same joins. This module says
what the rule needs in fx terms: the values are the nodes (parameters, `get_attr`, excluded: a shared weight is no
common input), an add is `+`, `+=`, `torch.add` or `Tensor.add(_)` of two nodes without `alpha`, an operand is an
activation unless it is a parameter, a shape or a number, and each module, function or method is named by the ONNX
op it exports to (`nn.Conv2d` is a `Conv`, `torch.relu` a `Relu`), so that one table of linear ops serves both.
Shapes come from `ShapeProp` where it ran.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from cnnc.ir.residual_joins import Add, classify_joins

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
# Producers of Python numbers or shapes rather than tensors: an add of those is arithmetic, not a join.
_NON_TENSOR_METHODS = ("size", "dim", "numel", "item", "tolist")

# torch modules, functions and methods by the ONNX op they export to (cnnc.ir.residual_joins.LINEAR_OPS is in these
# names). Anything not listed keeps its own name and counts as nonlinear.
_MODULE_KINDS = (
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "Conv"),
    ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), "ConvTranspose"),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), "BatchNormalization"),
    ((nn.Linear,), "Gemm"),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), "AveragePool"),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d), "GlobalAveragePool"),
    ((nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d), "Pad"),
    ((nn.Identity,), "Identity"),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d), "Dropout"),
    ((nn.Flatten,), "Flatten"),
    ((nn.Upsample,), "Resize"),
    ((nn.PixelShuffle,), "DepthToSpace"),
    ((nn.PixelUnshuffle,), "SpaceToDepth"),
    ((nn.ReLU,), "Relu"),
    ((nn.LeakyReLU,), "LeakyRelu"),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), "MaxPool"),
)
_FUNCTION_KINDS = {
    F.conv1d: "Conv", F.conv2d: "Conv", F.conv3d: "Conv", F.conv_transpose1d: "ConvTranspose",
    F.conv_transpose2d: "ConvTranspose", F.conv_transpose3d: "ConvTranspose", F.batch_norm: "BatchNormalization",
    F.linear: "Gemm", F.avg_pool1d: "AveragePool", F.avg_pool2d: "AveragePool", F.avg_pool3d: "AveragePool",
    F.adaptive_avg_pool1d: "GlobalAveragePool", F.adaptive_avg_pool2d: "GlobalAveragePool",
    F.adaptive_avg_pool3d: "GlobalAveragePool", F.pad: "Pad", F.interpolate: "Resize", F.dropout: "Dropout",
    F.pixel_shuffle: "DepthToSpace", F.pixel_unshuffle: "SpaceToDepth", torch.flatten: "Flatten",
    torch.reshape: "Reshape", torch.cat: "Concat", torch.concat: "Concat", torch.transpose: "Transpose",
    torch.permute: "Transpose", torch.squeeze: "Squeeze", torch.unsqueeze: "Unsqueeze", torch.mean: "ReduceMean",
    torch.sum: "ReduceSum", torch.split: "Split", torch.chunk: "Split", operator.getitem: "Slice",
    operator.add: "Add", operator.iadd: "Add", torch.add: "Add", operator.sub: "Sub", torch.sub: "Sub",
    operator.mul: "Mul", operator.imul: "Mul", torch.mul: "Mul", operator.truediv: "Div", torch.div: "Div",
    torch.relu: "Relu", F.relu: "Relu", F.leaky_relu: "LeakyRelu", F.max_pool1d: "MaxPool",
    F.max_pool2d: "MaxPool", F.max_pool3d: "MaxPool",
}
_METHOD_KINDS = {
    "view": "Reshape", "reshape": "Reshape", "flatten": "Flatten", "permute": "Transpose", "transpose": "Transpose",
    "squeeze": "Squeeze", "unsqueeze": "Unsqueeze", "mean": "ReduceMean", "sum": "ReduceSum", "contiguous": "Identity",
    "add": "Add", "add_": "Add", "sub": "Sub", "mul": "Mul", "mul_": "Mul", "div": "Div", "chunk": "Split",
    "split": "Split", "relu": "Relu", "relu_": "Relu",
}


def _is_tensor_add(node: fx.Node) -> bool:
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS)
    if not is_add:
        return False
    if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1 or set(node.kwargs) - {"alpha"}:
        return False
    return all(isinstance(arg, fx.Node) for arg in node.args)


class FxJoinGraph:
    """A torch.fx graph as a `cnnc.ir.residual_joins.JoinGraph`: values are its nodes."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.root = graph.owning_module
        self.nodes = [n for n in graph.nodes if n.op not in ("get_attr", "output")]

    def values(self) -> list[fx.Node]:
        return self.nodes

    def parents(self, node: fx.Node) -> list[fx.Node]:
        return [p for p in node.all_input_nodes if p.op != "get_attr"]

    def op(self, node: fx.Node) -> fx.Node:
        return node

    def op_kind(self, node: fx.Node) -> str:
        if node.op == "call_module":
            module = self.root.get_submodule(node.target) if self.root is not None else None
            kinds = [kind for types, kind in _MODULE_KINDS if isinstance(module, types)]
            return kinds[0] if kinds else type(module).__name__
        if node.op == "call_function":
            try:
                return _FUNCTION_KINDS.get(node.target) or getattr(node.target, "__name__", str(node.target))
            except TypeError:  # an unhashable callable
                return str(node.target)
        if node.op == "call_method":
            return _METHOD_KINDS.get(node.target, str(node.target))
        return node.op

    def is_activation(self, node: fx.Node) -> bool:
        if node.op == "get_attr":  # a parameter or buffer: `x + self.bias` is not a join
            return False
        if node.op == "call_method" and node.target in _NON_TENSOR_METHODS:
            return False
        if node.op == "call_function" and node.target in (getattr, len):
            return False
        value = node.meta.get("tensor_meta")
        return value is None or hasattr(value, "shape")

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def label(self, node: fx.Node) -> str:
        return node.name

    def adds(self) -> Iterator[Add[fx.Node]]:
        for node in self.graph.nodes:
            if _is_tensor_add(node):
                yield Add(node.name, node, *node.args)


@dataclass
class JoinMatch:
    node: fx.Node
    branch: fx.Node
    skip: fx.Node
    kind: str  # "identity" or "projection"


def find_joins(graph: fx.Graph) -> tuple[list[JoinMatch], list[tuple[str, str]]]:
    """Residual adds of an fx graph, and the adds that were not taken with the reason."""
    joins, skipped = classify_joins(FxJoinGraph(graph))
    return [JoinMatch(j.add.node, branch=j.branch, skip=j.skip, kind=j.kind) for j in joins], skipped
