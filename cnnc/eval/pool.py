"""Pooling (AveragePool, GlobalAveragePool, MaxPool; 1-D to 3-D) and the reductions ReduceMean and ReduceSum.

- Pooling `ceil_mode`: out = ceil((in + pads − dilated_k)/s) + 1, minus one when the last window would start in the
  end padding (PyTorch's rule, which onnxruntime follows). AveragePool's divisor counts the window's overlap with the
  input (count_include_pad=0) or with input and explicit pads (=1), never the overhang that ceil_mode adds.
- `auto_pad=SAME_*` follows Conv's rule (cnnc.eval.conv.same_pads) and refuses a stride above the kernel.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F

from cnnc.eval.common import Handler, Reason, arg, attr, ints, normalize_axis, pad_nd, trunc_div, used
from cnnc.eval.conv import CONV, auto_pad_reason, same_pads

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _pool_geometry(node: gs.Node, in_sizes: Sequence[int]):
    """Per spatial axis: (kernel, stride, dilation, pad_head, pad_tail, out) with onnxruntime's rules."""
    kernel = list(attr(node, "kernel_shape"))
    rank = len(kernel)
    strides = list(attr(node, "strides", [1] * rank))
    dilations = list(attr(node, "dilations", [1] * rank))
    ceil_mode = int(attr(node, "ceil_mode", 0))
    auto_pad = attr(node, "auto_pad", "NOTSET")
    explicit = list(attr(node, "pads", [0] * (2 * rank)))
    axes = []
    for i in range(rank):
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            head, tail = same_pads(in_sizes[i], strides[i], kernel[i], auto_pad, pooling=True)
        elif auto_pad == "VALID":
            head, tail = 0, 0
        else:
            head, tail = explicit[i], explicit[rank + i]
        span = in_sizes[i] + head + tail - dilations[i] * (kernel[i] - 1) - 1
        if ceil_mode:
            out = -(-span // strides[i]) + 1
            if (out - 1) * strides[i] >= in_sizes[i] + head:  # the last window would start in the end padding
                out -= 1
        else:
            out = trunc_div(span, strides[i]) + 1
        if out <= 0:
            raise ValueError(f"{node.op} '{node.name}': output size {out} along spatial axis {i}")
        axes.append((kernel[i], strides[i], dilations[i], head, tail, out))
    return axes


def _pool_frame(x: torch.Tensor, geometry, fill: float) -> torch.Tensor:
    """Pad (or crop) x so that the windows of a padding-free pooling are exactly the ONNX windows."""
    begins, ends = [], []
    for (kernel, stride, dilation, head, _, out), size in zip(geometry, x.shape[-len(geometry):]):
        extent = (out - 1) * stride + (kernel - 1) * dilation + 1
        begins.append(head)
        ends.append(extent - size - head)
    return pad_nd(x, begins, ends, fill)


@functools.lru_cache(maxsize=256)
def _average_pool_divisor(in_sizes: tuple, geometry: tuple, count_include_pad: bool) -> np.ndarray:
    """The number of counted elements in each window: a product over axes of 1-D window overlaps."""
    divisor = np.ones((), dtype=np.float64)
    for size, (kernel, stride, dilation, head, tail, out) in zip(in_sizes, geometry):
        extent = (out - 1) * stride + (kernel - 1) * dilation + 1
        counted = np.zeros(extent)
        lo, hi = (0, head + size + tail) if count_include_pad else (head, head + size)
        counted[max(lo, 0):max(min(hi, extent), 0)] = 1.0
        taps = np.arange(kernel) * dilation
        per_axis = np.array([counted[o * stride + taps].sum() for o in range(out)])
        divisor = np.multiply.outer(divisor, per_axis)
    return divisor


def _average_pool(node, args, ctx):
    x = args[0]
    rank = len(attr(node, "kernel_shape"))
    geometry = tuple(_pool_geometry(node, list(x.shape[2:])))
    framed = _pool_frame(x, geometry, 0.0)
    kernel, strides, dilations = [g[0] for g in geometry], [g[1] for g in geometry], [g[2] for g in geometry]
    if all(d == 1 for d in dilations):  # window sums by avg_pool with divisor 1 (avg_pool1d has no divisor_override)
        if rank == 1:
            sums = F.avg_pool2d(framed.unsqueeze(-2), [1] + kernel, [1] + strides, divisor_override=1).squeeze(-2)
        else:
            sums = (F.avg_pool2d if rank == 2 else F.avg_pool3d)(framed, kernel, strides, divisor_override=1)
    else:  # torch's avg_pool has no dilation: a depthwise all-ones convolution sums each dilated window
        channels = framed.shape[1]
        ones = torch.ones([channels, 1] + kernel, dtype=x.dtype, device=x.device)
        sums = CONV[rank](framed, ones, None, stride=strides, dilation=dilations, groups=channels)
    divisor = _average_pool_divisor(tuple(x.shape[2:]), geometry, bool(int(attr(node, "count_include_pad", 0))))
    return [sums / torch.as_tensor(divisor, dtype=x.dtype, device=x.device)]


def _max_pool(node, args, ctx):
    x = args[0]
    rank = len(attr(node, "kernel_shape"))
    geometry = _pool_geometry(node, list(x.shape[2:]))
    framed = _pool_frame(x, geometry, -math.inf)
    return [_MAX_POOL[rank](framed, [g[0] for g in geometry], stride=[g[1] for g in geometry], padding=0,
                            dilation=[g[2] for g in geometry])]


def _global_average_pool(node, args, ctx):
    x = args[0]
    return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]


def _reduce(function):
    def handler(node, args, ctx):
        x = args[0]
        axes = attr(node, "axes")
        if axes is None:
            axes = ints(arg(args, 1))
        keepdims = bool(int(attr(node, "keepdims", 1)))
        if not axes:
            if int(attr(node, "noop_with_empty_axes", 0)):
                return [x]
            axes = list(range(x.dim()))
        dims = tuple(sorted({normalize_axis(a, x.dim()) for a in axes}))
        return [function(x, dim=dims, keepdim=keepdims)]
    return handler


def _pool_reason(node: gs.Node) -> str | None:
    reason = auto_pad_reason(node)
    kernel = attr(node, "kernel_shape")
    if reason is None and (kernel is None or not 1 <= len(kernel) <= 3):
        return f"{node.op} needs a 1-D to 3-D kernel_shape"
    return reason


def _max_pool_reason(node: gs.Node) -> str | None:
    reason = _pool_reason(node)
    if reason is None and len(node.outputs) > 1 and used(node.outputs[1]):
        return "MaxPool's Indices output is not supported"
    return reason


REASONS: dict[str, Reason] = {"AveragePool": _pool_reason, "MaxPool": _max_pool_reason}
HANDLERS: dict[str, Handler] = {"AveragePool": _average_pool, "GlobalAveragePool": _global_average_pool,
                                "MaxPool": _max_pool, "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum)}
