"""Data movement: Concat, Split, Slice, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, SpaceToDepth,
DepthToSpace, Identity and Dropout (inference: the identity, with an all-true mask).

Every variant of the attribute-versus-input change is read (opset < 10/11/13 attributes, later inputs; Split's
opset 18 `num_outputs`), and shapes come from the torch values, so one function serves any batch size.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs
import torch

from cnnc.eval.common import Handler, Reason, arg, attr, ints, normalize_axis, used
from cnnc.ir import constant_value


def _concat(node, args, ctx):
    values = [a for a in args if a is not None]
    return [torch.cat(values, dim=normalize_axis(int(attr(node, "axis")), values[0].dim()))]


def _split(node, args, ctx):
    x = args[0]
    axis = normalize_axis(int(attr(node, "axis", 0)), x.dim())
    size = int(x.shape[axis])
    split = attr(node, "split")
    if split is None:
        split = ints(arg(args, 1))
    count = len(node.outputs)
    if not split:
        if "num_outputs" in node.attrs:  # opset 18: chunks of ceil(size / n), the last one smaller
            count = int(attr(node, "num_outputs"))
            chunk = -(-size // count)
            split = [chunk] * (count - 1) + [size - chunk * (count - 1)]
        else:
            if size % count:
                raise ValueError(f"Split '{node.name}': axis of {size} into {count} equal parts")
            split = [size // count] * count
    if sum(split) != size or min(split) < 0:
        raise ValueError(f"Split '{node.name}': parts {split} do not add up to {size}")
    return list(torch.split(x, list(split), dim=axis))


def _slice(node, args, ctx):
    x = args[0]
    if "starts" in node.attrs:  # opset < 10
        starts, ends = list(attr(node, "starts")), list(attr(node, "ends"))
        axes, steps = attr(node, "axes"), None
    else:
        starts, ends, axes, steps = ints(args[1]), ints(args[2]), ints(arg(args, 3)), ints(arg(args, 4))
    axes = list(range(len(starts))) if axes is None else list(axes)
    steps = [1] * len(starts) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = normalize_axis(axis, x.dim())
        size = int(x.shape[axis])
        if step == 0:
            raise ValueError(f"Slice '{node.name}': step 0")
        start, end = start + size if start < 0 else start, end + size if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), size), min(max(end, 0), size)
            index = [slice(None)] * axis + [slice(start, max(start, end), step)]
            x = x[tuple(index)]
        else:
            start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
            positions = torch.arange(start, end, step, device=x.device)
            x = torch.index_select(x, axis, positions)
    return [x]


def _reshape(node, args, ctx):
    x, shape = args[0], ints(args[1])
    if not int(attr(node, "allowzero", 0)):
        shape = [int(x.shape[i]) if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _flatten(node, args, ctx):
    x = args[0]
    axis = int(attr(node, "axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


def _transpose(node, args, ctx):
    x = args[0]
    perm = attr(node, "perm")
    return [x.permute(list(perm) if perm is not None else list(reversed(range(x.dim()))))]


def _squeeze(node, args, ctx):
    x = args[0]
    axes = attr(node, "axes")
    if axes is None:
        axes = ints(arg(args, 1))
    if axes is None:
        return [x.squeeze()]
    axes = [normalize_axis(a, x.dim()) for a in axes]
    for axis in axes:
        if x.shape[axis] != 1:
            raise ValueError(f"Squeeze '{node.name}': axis {axis} has size {x.shape[axis]}")
    return [x.squeeze(tuple(axes))] if axes else [x]


def _unsqueeze(node, args, ctx):
    x = args[0]
    axes = attr(node, "axes")
    if axes is None:
        axes = ints(args[1])
    rank = x.dim() + len(axes)
    for axis in sorted(normalize_axis(a, rank) for a in axes):
        x = x.unsqueeze(axis)
    return [x]


def _space_to_depth(node, args, ctx):
    x = args[0]
    b = int(attr(node, "blocksize"))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * b * b, h // b, w // b)]


def _depth_to_space(node, args, ctx):
    x = args[0]
    b = int(attr(node, "blocksize"))
    n, c, h, w = x.shape
    if attr(node, "mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return [y.reshape(n, c // (b * b), h * b, w * b)]


def _dropout(node, args, ctx):
    x = args[0]
    outputs = [x]
    if len(node.outputs) > 1:
        outputs.append(torch.ones(x.shape, dtype=torch.bool, device=x.device))  # inference mask: all kept
    return outputs


def _depth_to_space_reason(node: gs.Node) -> str | None:
    if attr(node, "mode", "DCR") not in ("DCR", "CRD"):
        return f"DepthToSpace mode {attr(node, 'mode')!r}"
    return None


def _dropout_reason(node: gs.Node) -> str | None:
    if "is_test" in node.attrs and not int(attr(node, "is_test")):
        return "Dropout with is_test=0 (training)"
    if len(node.inputs) > 2 and used(node.inputs[2]):
        training = constant_value(node.inputs[2])
        if training is None:
            return "Dropout with a non-constant training_mode"
        if bool(np.asarray(training).reshape(-1)[0]):
            return "Dropout in training mode"
    return None


HANDLERS: dict[str, Handler] = {
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "SpaceToDepth": _space_to_depth,
    "DepthToSpace": _depth_to_space,
    "Identity": lambda node, args, ctx: [args[0]],
    "Dropout": _dropout,
}
REASONS: dict[str, Reason] = {"DepthToSpace": _depth_to_space_reason, "Dropout": _dropout_reason}
