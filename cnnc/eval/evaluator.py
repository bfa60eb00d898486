"""A float64 evaluator: a set of onnx-graphsurgeon nodes as a differentiable torch function (DESIGN §2).

`collapse` takes exact Jacobians of linear machines through it (torch.func.vjp / jvp / vmap, or batched autograd),
`explain` takes gradients with respect to inputs and biases, and `analyze` reads intermediate activations.

Semantics are onnxruntime's (CPU provider), op by op, including attribute defaults; where the ONNX text and
onnxruntime disagree, onnxruntime wins, because the collapsed model must equal the original *as onnxruntime runs it*:
- Conv / pooling `auto_pad=SAME_*`: pad_needed = (ceil(in/s) − 1)·s + k − in, with the undilated kernel k,
  split as head = pad_needed/2 (SAME_UPPER) or (pad_needed+1)/2 (SAME_LOWER); a negative pad_needed (stride above
  kernel) means no padding for Conv and is refused for pooling; onnxruntime refuses SAME with dilation for Conv.
  The evaluator does the same in each case.
- ConvTranspose: with `output_shape`, or with SAME_* (target in·s), the total padding is split with the larger half
  at the tail for SAME_UPPER and at the head otherwise (NOTSET, VALID, SAME_LOWER), as the ONNX text says and
  onnxruntime 1.31 does (older onnxruntime sources did the opposite: measured, not assumed).
- Pooling `ceil_mode`: out = ceil((in + pads − dilated_k)/s) + 1, minus one when the last window would start in the
  end padding (PyTorch's rule, which onnxruntime follows). AveragePool's divisor counts the window's overlap with the
  input (count_include_pad=0) or with input and explicit pads (=1), never the overhang that ceil_mode adds.
- Resize / Upsample: source coordinates are computed in float32 with onnxruntime's formulas; round_prefer_* take a
  coordinate within 1e-6 of a half-integer as the tie, floor/ceil use it as is. When no output size differs from the
  input's, the input is copied whatever the scales; otherwise every axis with scale ≠ 1 is remapped, even one whose
  size does not change. Output sizes from scales are trunc(float32(scale)·in). Linear interpolation uses
  onnxruntime's clamped two-tap weights, in float64. (Measured on onnxruntime 1.31 over every coordinate mode and
  nearest mode, thousands of geometries each.)
Float tensors are evaluated in `dtype` (float64 by default); integer tensors (shapes, axes, indices) stay int64.

Shapes come from the torch values at call time, never from the graph's stored shapes, so one function serves any
batch size or spatial size. Parameters such as pads, axes, target shapes and scales are read with `.tolist()` when
the node runs: they must be constants or computed from constants or from `Shape`, never from batched data.
`unsupported_reason(node)` names every op or attribute combination the evaluator would not reproduce exactly; the
constructor refuses such nodes instead of evaluating them wrongly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F

from cnnc.ir import constant_value, is_empty_input

_NEAREST_TIE_TOLERANCE = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Attribute helpers


def _attr(node: gs.Node, name: str, default=None):
    value = node.attrs.get(name, default)
    if isinstance(value, bytes):
        return value.decode()
    return value


def _ints(tensor: torch.Tensor | None) -> list[int] | None:
    """A parameter tensor (pads, axes, shape...) as Python ints; None for an absent or empty optional input."""
    if tensor is None:
        return None
    return [int(v) for v in tensor.reshape(-1).tolist()]


def _floats32(tensor: torch.Tensor) -> np.ndarray:
    """A float parameter (Resize scales) back in float32, exactly as onnxruntime reads it."""
    return np.asarray(tensor.detach().reshape(-1).tolist(), dtype=np.float64).astype(np.float32)


def _arg(args: list, index: int):
    return args[index] if index < len(args) else None


def _normalize_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    return axis % rank


def _trunc_div(a: int, b: int) -> int:
    """C++ integer division (rounds toward zero), as onnxruntime's shape arithmetic uses."""
    quotient = abs(a) // abs(b)
    return quotient if (a >= 0) == (b > 0) else -quotient


def _pad_nd(x: torch.Tensor, begins: Sequence[int], ends: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Constant-pad (negative values crop) the trailing len(begins) axes of x."""
    if not any(begins) and not any(ends):
        return x
    torch_order: list[int] = []
    for begin, end in zip(reversed(begins), reversed(ends)):
        torch_order += [begin, end]
    return F.pad(x, torch_order, mode="constant", value=value)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


# ----------------------------------------------------------------------------------------------------------------
# Convolution


def same_pads(in_size: int, stride: int, kernel: int, auto_pad: str, pooling: bool = False) -> tuple[int, int]:
    """onnxruntime's SAME padding for Conv and pooling (legacy: undilated kernel, C++ division).

    When the stride exceeds the kernel the padding needed is negative: Conv then pads nothing, pooling refuses.
    """
    target = _trunc_div(in_size + stride - 1, stride)
    needed = (target - 1) * stride + kernel - in_size
    if needed < 0:
        if pooling:
            raise ValueError(f"auto_pad {auto_pad} with stride {stride} > kernel {kernel} on an axis of {in_size}: "
                             f"negative padding (onnxruntime refuses it)")
        needed = 0
    head = _trunc_div(needed + 1, 2) if auto_pad == "SAME_LOWER" else _trunc_div(needed, 2)
    return head, needed - head


def _conv_pads(node: gs.Node, in_sizes, kernel, strides) -> tuple[list[int], list[int]]:
    rank = len(kernel)
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pairs = [same_pads(in_sizes[i], strides[i], kernel[i], auto_pad) for i in range(rank)]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    if auto_pad == "VALID":
        return [0] * rank, [0] * rank
    pads = list(_attr(node, "pads", [0] * (2 * rank)))
    return pads[:rank], pads[rank:]


def _conv(node, args, ctx):
    x, weight, bias = args[0], args[1], _arg(args, 2)
    rank = weight.dim() - 2
    kernel = list(weight.shape[2:])
    strides = list(_attr(node, "strides", [1] * rank))
    dilations = list(_attr(node, "dilations", [1] * rank))
    heads, tails = _conv_pads(node, list(x.shape[2:]), kernel, strides)
    if heads == tails and min(heads, default=0) >= 0:
        padding = heads
    else:  # asymmetric pads: pad explicitly, then convolve unpadded
        x, padding = _pad_nd(x, heads, tails), [0] * rank
    y = _CONV[rank](x, weight, bias, stride=strides, padding=padding, dilation=dilations,
                    groups=int(_attr(node, "group", 1)))
    return [y]


def _conv_transpose(node, args, ctx):
    x, weight, bias = args[0], args[1], _arg(args, 2)
    rank = weight.dim() - 2
    kernel = list(weight.shape[2:])
    strides = list(_attr(node, "strides", [1] * rank))
    dilations = list(_attr(node, "dilations", [1] * rank))
    output_padding = list(_attr(node, "output_padding", [0] * rank))
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    explicit = list(_attr(node, "pads", [0] * (2 * rank)))
    output_shape = list(_attr(node, "output_shape", []))
    if output_shape and len(output_shape) != rank:  # ONNX shape inference refuses other lengths too
        raise ValueError(f"ConvTranspose '{node.name}': output_shape {output_shape} for {rank} spatial axes")
    in_sizes = list(x.shape[2:])

    full = [(in_sizes[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 for i in range(rank)]
    begins, ends = [], []
    for i in range(rank):
        natural = full[i] + output_padding[i]
        if output_shape or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            target = output_shape[i] if output_shape else in_sizes[i] * strides[i]
            if output_shape and target > natural:
                raise ValueError(f"ConvTranspose '{node.name}': output_shape {output_shape} exceeds what the "
                                 f"transposed convolution produces (onnxruntime refuses it)")
            total = max(0, natural - target)  # SAME with a too-small kernel: no padding, a shorter output
            head = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            tail = total - head
            out = target if output_shape else natural - total
        else:
            head, tail = (0, 0) if auto_pad == "VALID" else (explicit[i], explicit[rank + i])
            out = natural - head - tail
        if out <= 0:
            raise ValueError(f"ConvTranspose '{node.name}': output size {out} along spatial axis {i}")
        begins.append(-head)
        ends.append(out - full[i] + head)  # beyond the full output: output_padding (zeros, then the bias)
    y = _CONV_TRANSPOSE[rank](x, weight, None, stride=strides, padding=0, output_padding=0,
                              groups=int(_attr(node, "group", 1)), dilation=dilations)
    y = _pad_nd(y, begins, ends)
    if bias is not None:
        y = y + bias.reshape([-1] + [1] * rank)
    return [y]


# ----------------------------------------------------------------------------------------------------------------
# Pooling


def _pool_geometry(node: gs.Node, in_sizes: Sequence[int]):
    """Per spatial axis: (kernel, stride, dilation, pad_head, pad_tail, out) with onnxruntime's rules."""
    kernel = list(_attr(node, "kernel_shape"))
    rank = len(kernel)
    strides = list(_attr(node, "strides", [1] * rank))
    dilations = list(_attr(node, "dilations", [1] * rank))
    ceil_mode = int(_attr(node, "ceil_mode", 0))
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    explicit = list(_attr(node, "pads", [0] * (2 * rank)))
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
            out = _trunc_div(span, strides[i]) + 1
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
    return _pad_nd(x, begins, ends, fill)


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
    rank = len(_attr(node, "kernel_shape"))
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
        sums = _CONV[rank](framed, ones, None, stride=strides, dilation=dilations, groups=channels)
    divisor = _average_pool_divisor(tuple(x.shape[2:]), geometry, bool(int(_attr(node, "count_include_pad", 0))))
    return [sums / torch.as_tensor(divisor, dtype=x.dtype, device=x.device)]


def _max_pool(node, args, ctx):
    x = args[0]
    rank = len(_attr(node, "kernel_shape"))
    geometry = _pool_geometry(node, list(x.shape[2:]))
    framed = _pool_frame(x, geometry, -math.inf)
    return [_MAX_POOL[rank](framed, [g[0] for g in geometry], stride=[g[1] for g in geometry], padding=0,
                            dilation=[g[2] for g in geometry])]


def _global_average_pool(node, args, ctx):
    x = args[0]
    return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]


# ----------------------------------------------------------------------------------------------------------------
# Dense and normalisation


def _gemm(node, args, ctx):
    a, b, c = args[0], args[1], _arg(args, 2)
    if int(_attr(node, "transA", 0)):
        a = a.transpose(0, 1)
    if int(_attr(node, "transB", 0)):
        b = b.transpose(0, 1)
    y = float(_attr(node, "alpha", 1.0)) * torch.matmul(a, b)
    if c is not None:
        y = y + float(_attr(node, "beta", 1.0)) * c
    return [y]


def _batch_norm(node, args, ctx):
    x, scale, bias, mean, var = args[:5]
    shape = [-1] + [1] * (x.dim() - 2)
    epsilon = float(_attr(node, "epsilon", 1e-5))
    y = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + epsilon) * scale.reshape(shape) \
        + bias.reshape(shape)
    return [y]


def _binary(function):
    return lambda node, args, ctx: [function(args[0], args[1])]


def _div(a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")  # C++ integer division
    return a / b


def _softmax(node, args, ctx):
    x = args[0]
    rank = x.dim()
    if "axis" in node.attrs:
        axis = _normalize_axis(int(_attr(node, "axis")), rank)
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
        low, high = _attr(node, "min"), _attr(node, "max")
        low = None if low is None else torch.as_tensor(float(low), dtype=x.dtype)
        high = None if high is None else torch.as_tensor(float(high), dtype=x.dtype)
    else:
        low, high = _arg(args, 1), _arg(args, 2)
    if low is not None:
        x = torch.maximum(x, low.to(x.dtype))
    if high is not None:
        x = torch.minimum(x, high.to(x.dtype))  # min > max gives max everywhere, as in onnxruntime
    return [x]


def _dropout(node, args, ctx):
    x = args[0]
    outputs = [x]
    if len(node.outputs) > 1:
        outputs.append(torch.ones(x.shape, dtype=torch.bool, device=x.device))  # inference mask: all kept
    return outputs


# ----------------------------------------------------------------------------------------------------------------
# Padding and resampling


def _pad_parameters(node, args, rank) -> tuple[list[int], list[int], float]:
    if "pads" in node.attrs:  # opset < 11
        pads, value, axes = list(_attr(node, "pads")), float(_attr(node, "value", 0.0)), None
    else:
        pads = _ints(args[1])
        constant = _arg(args, 2)
        value = float(constant.reshape(-1)[0]) if constant is not None and constant.numel() else 0.0
        axes = _ints(_arg(args, 3))
    begins, ends = [0] * rank, [0] * rank
    axes = list(range(rank)) if axes is None else [_normalize_axis(a, rank) for a in axes]
    if len(pads) != 2 * len(axes):
        raise ValueError(f"Pad '{node.name}': {len(pads)} pads for {len(axes)} axes")
    for i, axis in enumerate(axes):
        begins[axis], ends[axis] = pads[i], pads[len(axes) + i]
    return begins, ends, value


@functools.lru_cache(maxsize=1024)
def _border_indices(size: int, begin: int, end: int, mode: str) -> np.ndarray:
    positions = np.arange(-begin, size + end)
    if mode == "edge":
        return np.clip(positions, 0, size - 1)
    if begin > size - 1 or end > size - 1:
        raise ValueError(f"reflect padding of {max(begin, end)} needs an axis longer than {size}")
    positions = np.abs(positions)
    return np.where(positions > size - 1, 2 * (size - 1) - positions, positions)


def _pad(node, args, ctx):
    x = args[0]
    rank = x.dim()
    begins, ends, value = _pad_parameters(node, args, rank)
    mode = _attr(node, "mode", "constant")
    if mode == "constant":
        return [_pad_nd(x, begins, ends, value)]
    # reflect / edge: crop the negative pads first (as onnxruntime does), then gather the border indices.
    x = _pad_nd(x, [min(b, 0) for b in begins], [min(e, 0) for e in ends])
    for axis in range(rank):
        begin, end = max(begins[axis], 0), max(ends[axis], 0)
        if begin or end:
            index = _border_indices(int(x.shape[axis]), begin, end, mode)
            x = torch.index_select(x, axis, torch.as_tensor(index, device=x.device))
    return [x]


def _original_coordinates(out_size: int, in_size: int, scale: np.float32, mode: str) -> np.ndarray:
    """onnxruntime's GetOriginalCoordinate, in float32 with its operation order."""
    f32 = np.float32
    x = np.arange(out_size, dtype=np.float32)
    half = f32(0.5)
    if mode == "asymmetric":
        return x / scale
    if mode == "half_pixel":
        return (x + half) / scale - half
    if mode == "pytorch_half_pixel":
        return (x + half) / scale - half if out_size > 1 else np.zeros(out_size, dtype=np.float32)
    if mode == "tf_half_pixel_for_nn":
        return (x + half) / scale
    if mode == "align_corners":
        if out_size == 1:
            return np.zeros(1, dtype=np.float32)
        return x * (f32(in_size) - f32(1)) / (f32(out_size) - f32(1))
    if mode == "half_pixel_symmetric":
        adjustment = f32(out_size) / (scale * f32(in_size))
        offset = (f32(in_size) / f32(2)) * (f32(1) - adjustment)
        # float + (float + double 0.5) / float - double 0.5: evaluated in double, then rounded to float
        return (np.float64(offset) + (x.astype(np.float64) + 0.5) / np.float64(scale) - 0.5).astype(np.float32)
    raise ValueError(f"coordinate_transformation_mode {mode} is not supported")


@functools.lru_cache(maxsize=1024)
def _nearest_indices(out_size: int, in_size: int, scale: float, mode: str, nearest_mode: str) -> np.ndarray:
    scale32 = np.float32(scale)
    if scale32 == 1:
        return np.arange(out_size)
    coordinate = _original_coordinates(out_size, in_size, scale32, mode).astype(np.float64)  # exact widening
    if nearest_mode == "floor":
        index = np.floor(coordinate)
    elif nearest_mode == "ceil":
        index = np.ceil(coordinate)
    elif nearest_mode in ("round_prefer_floor", "round_prefer_ceil"):
        # onnxruntime 1.31 treats a float32 coordinate within 1e-6 of a half-integer as the tie (measured: 3.4999991
        # and 3.500001 are ties, 3.4999988 and 3.5000012 are not); floor and ceil modes have no such tolerance.
        below = np.floor(coordinate)
        tie = np.abs(coordinate - (below + 0.5)) < _NEAREST_TIE_TOLERANCE
        nearest = np.where(coordinate - below < 0.5, below, below + 1)
        index = np.where(tie, below if nearest_mode == "round_prefer_floor" else below + 1, nearest)
    elif nearest_mode == "simple":  # Resize-10 and Upsample: ceil when downsampling, else truncation
        index = np.ceil(coordinate) if scale32 < 1 else np.trunc(coordinate)
    else:
        raise ValueError(f"nearest_mode {nearest_mode} is not supported")
    return np.clip(index, 0, in_size - 1).astype(np.int64)


@functools.lru_cache(maxsize=1024)
def _linear_taps(out_size: int, in_size: int, scale: float, mode: str):
    """(index_low, index_high, weight_low, weight_high) of onnxruntime's clamped two-tap linear interpolation."""
    scale32 = np.float32(scale)
    coordinate = _original_coordinates(out_size, in_size, scale32, mode).astype(np.float64)
    coordinate = np.clip(coordinate, 0.0, in_size - 1)
    low = np.minimum(np.floor(coordinate).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    weight_low, weight_high = np.abs(coordinate - high), np.abs(coordinate - low)
    same = low == high
    weight_low[same], weight_high[same] = 0.5, 0.5
    return low, high, weight_low, weight_high


def _resample(x: torch.Tensor, out_sizes: list[int], scales: np.ndarray, mode: str, transform: str,
              nearest_mode: str) -> torch.Tensor:
    """Separable nearest or linear resampling of every axis whose scale is not exactly 1."""
    if [int(s) for s in x.shape] == [int(s) for s in out_sizes]:
        return x  # onnxruntime copies the input when no output size changes, whatever the scales (measured)
    for axis in range(x.dim()):
        in_size, out_size, scale = int(x.shape[axis]), int(out_sizes[axis]), float(scales[axis])
        if np.float32(scale) == 1:
            continue
        if mode == "nearest":
            index = _nearest_indices(out_size, in_size, scale, transform, nearest_mode)
            x = torch.index_select(x, axis, torch.as_tensor(index, device=x.device))
        else:
            low, high, weight_low, weight_high = _linear_taps(out_size, in_size, scale, transform)
            shape = [1] * x.dim()
            shape[axis] = out_size
            w_low = torch.as_tensor(weight_low, dtype=x.dtype, device=x.device).reshape(shape)
            w_high = torch.as_tensor(weight_high, dtype=x.dtype, device=x.device).reshape(shape)
            x = torch.index_select(x, axis, torch.as_tensor(low, device=x.device)) * w_low + \
                torch.index_select(x, axis, torch.as_tensor(high, device=x.device)) * w_high
    return x


def _resize(node, args, ctx):
    x = args[0]
    rank = x.dim()
    in_sizes = [int(s) for s in x.shape]
    mode = _attr(node, "mode", "nearest")
    if node.op == "Upsample" or len(node.inputs) <= 2:  # Upsample-7/9 and Resize-10: scales only, asymmetric
        scales_tensor = args[1] if len(args) > 1 else None
        scales = (np.asarray(_attr(node, "scales"), dtype=np.float32) if scales_tensor is None
                  else _floats32(scales_tensor))
        transform, nearest_mode = "asymmetric", "simple"
        sizes = None
    else:
        transform = _attr(node, "coordinate_transformation_mode", "half_pixel")
        nearest_mode = _attr(node, "nearest_mode", "round_prefer_floor")
        scales_tensor, sizes_tensor = _arg(args, 2), _arg(args, 3)
        scales = _floats32(scales_tensor) if scales_tensor is not None and scales_tensor.numel() else None
        sizes = _ints(sizes_tensor) if sizes_tensor is not None and sizes_tensor.numel() else None
    axes = [_normalize_axis(a, rank) for a in _attr(node, "axes", list(range(rank)))]
    if sizes is not None:
        out_sizes = list(in_sizes)
        for axis, size in zip(axes, sizes):
            out_sizes[axis] = size
        full_scales = np.array([np.float32(o) / np.float32(i) for o, i in zip(out_sizes, in_sizes)],
                               dtype=np.float32)
        policy = _attr(node, "keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            chosen = [full_scales[a] for a in axes]
            common = np.float32(min(chosen) if policy == "not_larger" else max(chosen))
            for axis in range(rank):
                full_scales[axis] = common if axis in axes else np.float32(1)
                out_sizes[axis] = int(np.round(np.float32(common * np.float32(in_sizes[axis])))) \
                    if axis in axes else in_sizes[axis]
    else:
        if scales is None:
            raise ValueError(f"Resize '{node.name}' has neither scales nor sizes")
        full_scales = np.ones(rank, dtype=np.float32)
        for axis, scale in zip(axes, scales):
            full_scales[axis] = scale
        out_sizes = [int(np.float32(s) * np.float32(i)) for s, i in zip(full_scales, in_sizes)]
    return [_resample(x, out_sizes, full_scales, mode, transform, nearest_mode)]


# ----------------------------------------------------------------------------------------------------------------
# Reductions and data movement


def _reduce(function):
    def handler(node, args, ctx):
        x = args[0]
        axes = _attr(node, "axes")
        if axes is None:
            axes = _ints(_arg(args, 1))
        keepdims = bool(int(_attr(node, "keepdims", 1)))
        if not axes:
            if int(_attr(node, "noop_with_empty_axes", 0)):
                return [x]
            axes = list(range(x.dim()))
        dims = tuple(sorted({_normalize_axis(a, x.dim()) for a in axes}))
        return [function(x, dim=dims, keepdim=keepdims)]
    return handler


def _concat(node, args, ctx):
    values = [a for a in args if a is not None]
    return [torch.cat(values, dim=_normalize_axis(int(_attr(node, "axis")), values[0].dim()))]


def _split(node, args, ctx):
    x = args[0]
    axis = _normalize_axis(int(_attr(node, "axis", 0)), x.dim())
    size = int(x.shape[axis])
    split = _attr(node, "split")
    if split is None:
        split = _ints(_arg(args, 1))
    count = len(node.outputs)
    if not split:
        if "num_outputs" in node.attrs:  # opset 18: chunks of ceil(size / n), the last one smaller
            count = int(_attr(node, "num_outputs"))
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
        starts, ends = list(_attr(node, "starts")), list(_attr(node, "ends"))
        axes, steps = _attr(node, "axes"), None
    else:
        starts, ends, axes, steps = _ints(args[1]), _ints(args[2]), _ints(_arg(args, 3)), _ints(_arg(args, 4))
    axes = list(range(len(starts))) if axes is None else list(axes)
    steps = [1] * len(starts) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _normalize_axis(axis, x.dim())
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
    x, shape = args[0], _ints(args[1])
    if not int(_attr(node, "allowzero", 0)):
        shape = [int(x.shape[i]) if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _flatten(node, args, ctx):
    x = args[0]
    axis = int(_attr(node, "axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


def _transpose(node, args, ctx):
    x = args[0]
    perm = _attr(node, "perm")
    return [x.permute(list(perm) if perm is not None else list(reversed(range(x.dim()))))]


def _squeeze(node, args, ctx):
    x = args[0]
    axes = _attr(node, "axes")
    if axes is None:
        axes = _ints(_arg(args, 1))
    if axes is None:
        return [x.squeeze()]
    axes = [_normalize_axis(a, x.dim()) for a in axes]
    for axis in axes:
        if x.shape[axis] != 1:
            raise ValueError(f"Squeeze '{node.name}': axis {axis} has size {x.shape[axis]}")
    return [x.squeeze(tuple(axes))] if axes else [x]


def _unsqueeze(node, args, ctx):
    x = args[0]
    axes = _attr(node, "axes")
    if axes is None:
        axes = _ints(args[1])
    rank = x.dim() + len(axes)
    for axis in sorted(_normalize_axis(a, rank) for a in axes):
        x = x.unsqueeze(axis)
    return [x]


def _space_to_depth(node, args, ctx):
    x = args[0]
    b = int(_attr(node, "blocksize"))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * b * b, h // b, w // b)]


def _depth_to_space(node, args, ctx):
    x = args[0]
    b = int(_attr(node, "blocksize"))
    n, c, h, w = x.shape
    if _attr(node, "mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return [y.reshape(n, c // (b * b), h * b, w * b)]


def _shape(node, args, ctx):
    dims = list(args[0].shape)
    start, end = int(_attr(node, "start", 0)), _attr(node, "end")
    dims = dims[start:] if end is None else dims[start:int(end)]
    return [torch.tensor(dims, dtype=torch.int64)]


def _gather(node, args, ctx):
    data, indices = args[0], args[1]
    axis = _normalize_axis(int(_attr(node, "axis", 0)), data.dim())
    size = int(data.shape[axis])
    flat = indices.reshape(-1)
    flat = torch.where(flat < 0, flat + size, flat)
    y = torch.index_select(data, axis, flat)
    return [y.reshape(list(data.shape[:axis]) + list(indices.shape) + list(data.shape[axis + 1:]))]


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
              onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


def _cast(node, args, ctx):
    x, to = args[0], int(_attr(node, "to"))
    if to in _FLOAT_TYPES:
        return [x.to(ctx.dtype)]
    if to in _INT_TYPES:
        return [x.to(torch.int64)]  # float -> int truncates toward zero, as static_cast does
    return [x.to(torch.bool)]


def _constant_of_shape(node, args, ctx):
    shape = _ints(args[0])
    value = _attr(node, "value")
    array = np.zeros(1, dtype=np.float32) if value is None else np.asarray(getattr(value, "values", value)).reshape(-1)
    return [_to_torch(np.full(shape, array[0], dtype=array.dtype), ctx.dtype)]


# ----------------------------------------------------------------------------------------------------------------
# The op table and its preconditions


class _Context:
    def __init__(self, dtype: torch.dtype, opset: int | None):
        self.dtype, self.opset = dtype, opset


_Handler = Callable[[gs.Node, list, _Context], list]

_HANDLERS: dict[str, _Handler] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "BatchNormalization": _batch_norm,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Pad": _pad,
    "Resize": _resize,
    "Upsample": _resize,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool,
    "MaxPool": _max_pool,
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
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
    "Relu": lambda node, args, ctx: [torch.relu(args[0])],
    "LeakyRelu": lambda node, args, ctx: [F.leaky_relu(args[0], float(_attr(node, "alpha", 0.01)))],
    "Sigmoid": lambda node, args, ctx: [torch.sigmoid(args[0])],
    "Tanh": lambda node, args, ctx: [torch.tanh(args[0])],
    "Clip": _clip,
    "Softmax": _softmax,
    "Shape": _shape,
    "Gather": _gather,
    "Cast": _cast,
    "ConstantOfShape": _constant_of_shape,
    "Constant": None,  # its value is read once, with the other constants
}

SUPPORTED_OPS: frozenset[str] = frozenset(_HANDLERS)

_RESIZE_TRANSFORMS = ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                      "half_pixel_symmetric")
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _used(tensor: gs.Tensor) -> bool:
    return not is_empty_input(tensor)


def _reason(node: gs.Node) -> str | None:
    op = node.op
    if op in ("Conv", "ConvTranspose", "AveragePool", "MaxPool"):
        auto_pad = _attr(node, "auto_pad", "NOTSET")
        if auto_pad not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
            return f"auto_pad {auto_pad!r} is not an ONNX value"
        dilations = list(_attr(node, "dilations", []))
        if op == "Conv" and auto_pad.startswith("SAME") and any(d != 1 for d in dilations):
            return "Conv with auto_pad SAME and dilation > 1 (onnxruntime refuses it)"
        if op in ("Conv", "ConvTranspose") and len(node.inputs) > 1:
            weight = constant_value(node.inputs[1])
            if weight is not None and not 3 <= weight.ndim <= 5:
                return f"{op} with a {weight.ndim - 2}-D kernel (1-D to 3-D are supported)"
        if op in ("AveragePool", "MaxPool"):
            kernel = _attr(node, "kernel_shape")
            if kernel is None or not 1 <= len(kernel) <= 3:
                return f"{op} needs a 1-D to 3-D kernel_shape"
    if op == "MaxPool" and len(node.outputs) > 1 and _used(node.outputs[1]):
        return "MaxPool's Indices output is not supported"
    if op == "BatchNormalization":
        if int(_attr(node, "training_mode", 0)) or any(_used(t) for t in node.outputs[1:]):
            return "BatchNormalization in training mode"
        if not int(_attr(node, "is_test", 1)) and "is_test" in node.attrs:
            return "BatchNormalization with is_test=0 (training)"
        if not int(_attr(node, "spatial", 1)):
            return "BatchNormalization with spatial=0"
    if op == "Dropout":
        if "is_test" in node.attrs and not int(_attr(node, "is_test")):
            return "Dropout with is_test=0 (training)"
        if len(node.inputs) > 2 and _used(node.inputs[2]):
            training = constant_value(node.inputs[2])
            if training is None:
                return "Dropout with a non-constant training_mode"
            if bool(np.asarray(training).reshape(-1)[0]):
                return "Dropout in training mode"
    if op == "Pad":
        mode = _attr(node, "mode", "constant")
        if mode not in ("constant", "reflect", "edge"):
            return f"Pad mode {mode!r} is not supported"
    if op in ("Resize", "Upsample"):
        mode = _attr(node, "mode", "nearest")
        if mode not in ("nearest", "linear"):
            return f"{op} mode {mode!r} is not supported"
        if op == "Resize" and len(node.inputs) > 2:
            transform = _attr(node, "coordinate_transformation_mode", "half_pixel")
            if transform not in _RESIZE_TRANSFORMS:
                return f"Resize coordinate_transformation_mode {transform!r} is not supported"
            if mode == "nearest" and _attr(node, "nearest_mode", "round_prefer_floor") not in _NEAREST_MODES:
                return f"Resize nearest_mode {_attr(node, 'nearest_mode')!r} is not supported"
            if mode == "linear" and int(_attr(node, "antialias", 0)):
                return "Resize linear with antialias=1 is not supported"
            if _attr(node, "keep_aspect_ratio_policy", "stretch") not in ("stretch", "not_larger", "not_smaller"):
                return f"Resize keep_aspect_ratio_policy {_attr(node, 'keep_aspect_ratio_policy')!r}"
    if op == "DepthToSpace" and _attr(node, "mode", "DCR") not in ("DCR", "CRD"):
        return f"DepthToSpace mode {_attr(node, 'mode')!r}"
    if op == "Cast":
        to = int(_attr(node, "to", 0))
        if to not in _FLOAT_TYPES | _INT_TYPES | {onnx.TensorProto.BOOL}:
            return f"Cast to {onnx.TensorProto.DataType.Name(to) if to else 'nothing'} is not supported"
    if op == "Constant" and _constant_node_value(node) is None:
        return "Constant node of a kind the evaluator cannot read (sparse or string)"
    return None


def unsupported_reason(node: gs.Node) -> str | None:
    """None when the evaluator reproduces `node` exactly (op and attributes); otherwise why it cannot."""
    if node.domain not in ("", "ai.onnx", None):
        return f"{node.op} is in custom domain {node.domain!r}"
    if node.op not in SUPPORTED_OPS:
        return f"{node.op} is not supported by the float64 evaluator"
    return _reason(node)


# ----------------------------------------------------------------------------------------------------------------
# Constants and the function


def _to_torch(value: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    array = np.asarray(value)
    if array.dtype.kind == "f":
        return torch.from_numpy(np.array(array, dtype=np.float64)).to(dtype)
    if array.dtype.kind in "iu":
        return torch.from_numpy(np.array(array, dtype=np.int64))
    if array.dtype == np.bool_:
        return torch.from_numpy(np.array(array))
    raise ValueError(f"constant of dtype {array.dtype} is not supported")


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        return np.asarray(value.values) if isinstance(value, gs.Constant) else np.asarray(value)
    for name, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                        ("value_ints", np.int64)):
        if name in attrs:
            return np.asarray(attrs[name], dtype=dtype)
    return None


def topological_order(nodes: list[gs.Node]) -> list[gs.Node]:
    """Nodes ordered so that each comes after the producers of its inputs (graph order breaks ties)."""
    produced_by = {t.name: i for i, node in enumerate(nodes) for t in node.outputs}
    order, state = [], {}

    def visit(i: int) -> None:
        stack = [(i, False)]
        while stack:
            index, done = stack.pop()
            if done:
                state[index] = 2
                order.append(nodes[index])
                continue
            if state.get(index) == 2:
                continue
            if state.get(index) == 1:
                raise ValueError(f"the graph has a cycle through node '{nodes[index].name}'")
            state[index] = 1
            stack.append((index, True))
            for tensor in reversed(nodes[index].inputs):
                producer = produced_by.get(tensor.name)
                if producer is not None and state.get(producer) != 2:
                    if state.get(producer) == 1:
                        raise ValueError(f"the graph has a cycle through node '{nodes[producer].name}'")
                    stack.append((producer, False))

    for i in range(len(nodes)):
        if state.get(i) != 2:
            visit(i)
    return order


class SubgraphFunction:
    """`nodes` (topological order) as a function from the values of `inputs` to those of `outputs`.

    Every non-constant input of a node must be one of `inputs` or an output of an earlier node. Constants
    (gs.Constant, Constant-node outputs, and nodes computed only from constants) are converted to torch once:
    floats in `dtype`, integers as int64. `opset` is the graph's default-domain opset; only Softmax needs it, and
    without it a Softmax is evaluated only where the opset cannot change the result.
    """

    def __init__(self, nodes: list[gs.Node], inputs: list[gs.Tensor], outputs: list[gs.Tensor],
                 dtype: torch.dtype = torch.float64, opset: int | None = None):
        self.dtype = dtype
        self.input_names = [t.name for t in inputs]
        self.output_names = [t.name for t in outputs]
        self._context = _Context(dtype, opset)
        problems = [f"{n.op} '{n.name}': {r}" for n in nodes if (r := unsupported_reason(n)) is not None]
        if problems:
            raise ValueError("the evaluator cannot run: " + "; ".join(problems))

        self._constants: dict[str, torch.Tensor] = {}
        available = set(self.input_names)
        steps: list[tuple[gs.Node, _Handler, list[str], list[str]]] = []
        for node in nodes:
            if node.op == "Constant":
                self._constants[node.outputs[0].name] = _to_torch(_constant_node_value(node), dtype)
                available.add(node.outputs[0].name)
                continue
            input_names = []
            for tensor in node.inputs:
                if is_empty_input(tensor):
                    input_names.append("")
                    continue
                if tensor.name not in available and tensor.name not in self._constants:
                    value = constant_value(tensor)
                    if value is None:
                        raise ValueError(f"input '{tensor.name}' of {node.op} '{node.name}' is neither a function "
                                         f"input, a constant, nor produced by an earlier node")
                    self._constants[tensor.name] = _to_torch(value, dtype)
                input_names.append(tensor.name)
            output_names = [t.name for t in node.outputs]
            steps.append((node, _HANDLERS[node.op], input_names, output_names))
            available.update(name for name in output_names if name)
        for name in self.output_names:
            if name not in available and name not in self._constants:
                raise ValueError(f"output '{name}' is not computed by the given nodes")
        self._steps = self._fold_constant_steps(steps)

    def _fold_constant_steps(self, steps):
        """Evaluate once the nodes that read only constants (exporters' shape and pad arithmetic)."""
        remaining = []
        self._folded_names: list[str] = []
        for step in steps:
            node, handler, input_names, output_names = step
            if node.op != "Shape" and all(name == "" or name in self._constants for name in input_names):
                with torch.no_grad():
                    values = handler(node, [self._constants[n] if n else None for n in input_names],
                                     self._context)
                for name, value in zip(output_names, values):
                    if name:
                        self._constants[name] = value
                        self._folded_names.append(name)
            else:
                remaining.append(step)
        return remaining

    def _run(self, values: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(values) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs ({self.input_names}), got {len(values)}")
        env: dict[str, torch.Tensor] = {}
        for name, value in zip(self.input_names, values):
            value = torch.as_tensor(value)
            env[name] = value.to(self.dtype) if value.is_floating_point() else value
        for node, handler, input_names, output_names in self._steps:
            args = [(env[n] if n in env else self._constants[n]) if n else None for n in input_names]
            results = handler(node, args, self._context)
            for name, value in zip(output_names, results):
                if name:
                    env[name] = value
        return env

    def __call__(self, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env = self._run(values)
        return tuple(env[n] if n in env else self._constants[n] for n in self.output_names)

    def trace(self, *values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tensor of the evaluation by name: the inputs and each node's outputs (folded ones included)."""
        env = self._run(values)
        return {**{name: self._constants[name] for name in self._folded_names}, **env}


def evaluate_graph(graph: gs.Graph, feeds: dict[str, np.ndarray], dtype: torch.dtype = torch.float64,
                   ) -> dict[str, np.ndarray]:
    """Evaluate a whole graph in `dtype` (no gradients); returns every graph output by name as a numpy array."""
    missing = [t.name for t in graph.inputs if t.name not in feeds]
    if missing:
        raise ValueError(f"no value fed for graph input(s) {missing}")
    opset = graph.opset if isinstance(graph.opset, int) else None
    function = SubgraphFunction(topological_order(list(graph.nodes)), list(graph.inputs), list(graph.outputs),
                                dtype=dtype, opset=opset)
    with torch.no_grad():
        outputs = function(*[torch.from_numpy(np.asarray(feeds[t.name])) for t in graph.inputs])
    return {name: value.detach().cpu().numpy() for name, value in zip(function.output_names, outputs)}
