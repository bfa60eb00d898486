"""Dense and elementwise arithmetic: Gemm, MatMul, BatchNormalization (inference), Add, Sub, Mul, Div.

Div of two integer tensors (exporters' shape arithmetic) is C++ integer division, rounding toward zero.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs
import torch

from cnnc.eval.common import Handler, Reason, arg, attr
from cnnc.ir.graph import batch_norm_training_reason


def _gemm(node, args, ctx):
    a, b, c = args[0], args[1], arg(args, 2)
    if int(attr(node, "transA", 0)):
        a = a.transpose(0, 1)
    if int(attr(node, "transB", 0)):
        b = b.transpose(0, 1)
    y = float(attr(node, "alpha", 1.0)) * torch.matmul(a, b)
    if c is not None:
        y = y + float(attr(node, "beta", 1.0)) * c
    return [y]


def _batch_norm(node, args, ctx):
    x, scale, bias, mean, var = args[:5]
    shape = [-1] + [1] * (x.dim() - 2)
    epsilon = float(attr(node, "epsilon", 1e-5))
    y = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + epsilon) * scale.reshape(shape) \
        + bias.reshape(shape)
    return [y]


def _binary(function):
    return lambda node, args, ctx: [function(args[0], args[1])]


def _div(a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")  # C++ integer division
    return a / b



def _batch_norm_reason(node: gs.Node) -> str | None:
    if batch_norm_training_reason(node) is not None:
        return "BatchNormalization in training mode"
    if not int(attr(node, "spatial", 1)):
        return "BatchNormalization with spatial=0"
    return None


HANDLERS: dict[str, Handler] = {
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "BatchNormalization": _batch_norm,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
}
REASONS: dict[str, Reason] = {"BatchNormalization": _batch_norm_reason}
