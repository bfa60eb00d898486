"""Activations: Relu, LeakyRelu, Sigmoid, Tanh, Clip and Softmax.

Softmax changed meaning at opset 13 (before: over all axes from `axis`, default 1; since: over one axis, default -1),
so it reads the graph's opset from the context and, without one, evaluates only where both meanings agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cnnc.eval.common import Handler, Reason, arg, attr, normalize_axis


def _softmax(node, args, ctx):
    x = args[0]
    rank = x.dim()
    if "axis" in node.attrs:
        axis = normalize_axis(int(attr(node, "axis")), rank)
        legacy_axes = tuple(range(axis, rank))
        modern_axes = (axis,)
    else:
        legacy_axes, modern_axes = tuple(range(min(1, rank - 1), rank)), (rank - 1,)
    if ctx.opset is not None:
        axes = modern_axes if ctx.opset >= 13 else legacy_axes
    else:
        # Before opset 13 Softmax normalises over all axes from `axis` on (default 1); since 13 over one axis
        # (default -1). Without the opset only a tensor on which both agree can be evaluated.
        nontrivial = [a for a in legacy_axes if x.shape[a] != 1]
        if set(nontrivial) - set(modern_axes) or (not nontrivial and modern_axes[0] not in legacy_axes
                                                  and x.shape[modern_axes[0]] != 1):
            raise ValueError(f"Softmax '{node.name}': the result depends on the opset (pass opset=)")
        axes = modern_axes
    if len(axes) == 1:
        return [torch.softmax(x, dim=axes[0])]
    flat = x.reshape(list(x.shape[:axes[0]]) + [-1])
    return [torch.softmax(flat, dim=-1).reshape(x.shape)]


def _clip(node, args, ctx):
    x = args[0]
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        low, high = attr(node, "min"), attr(node, "max")
        low = None if low is None else torch.as_tensor(float(low), dtype=x.dtype)
        high = None if high is None else torch.as_tensor(float(high), dtype=x.dtype)
    else:
        low, high = arg(args, 1), arg(args, 2)
    if low is not None:
        x = torch.maximum(x, low.to(x.dtype))
    if high is not None:
        x = torch.minimum(x, high.to(x.dtype))  # min > max gives max everywhere, as in onnxruntime
    return [x]



HANDLERS: dict[str, Handler] = {
    "Relu": lambda node, args, ctx: [torch.relu(args[0])],
    "LeakyRelu": lambda node, args, ctx: [F.leaky_relu(args[0], float(attr(node, "alpha", 0.01)))],
    "Sigmoid": lambda node, args, ctx: [torch.sigmoid(args[0])],
    "Tanh": lambda node, args, ctx: [torch.tanh(args[0])],
    "Clip": _clip,
    "Softmax": _softmax,
}
REASONS: dict[str, Reason] = {}
