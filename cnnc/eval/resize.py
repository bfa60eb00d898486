"""Padding and resampling: Pad (constant, reflect, edge), Resize and Upsample (nearest and linear).

- Pad crops with negative pads; reflect and edge crop first, as onnxruntime does, then gather the border indices.
- Resize / Upsample: source coordinates are computed in float32 with onnxruntime's formulas; round_prefer_* take a
  coordinate within 1e-6 of a half-integer as the tie, floor/ceil use it as is. When no output size differs from the
  input's, the input is copied whatever the scales; otherwise every axis with scale ≠ 1 is remapped, even one whose
  size does not change. Output sizes from scales are trunc(float32(scale)·in). Linear interpolation uses
  onnxruntime's clamped two-tap weights, in float64. (Measured on onnxruntime 1.31 over every coordinate mode and
  nearest mode, thousands of geometries each.)
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_graphsurgeon as gs
import torch

from cnnc.eval.common import Handler, Reason, arg, attr, floats32, ints, normalize_axis, pad_nd

_NEAREST_TIE_TOLERANCE = 1e-6
_RESIZE_TRANSFORMS = ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                      "half_pixel_symmetric")
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _pad_parameters(node, args, rank) -> tuple[list[int], list[int], float]:
    if "pads" in node.attrs:  # opset < 11
        pads, value, axes = list(attr(node, "pads")), float(attr(node, "value", 0.0)), None
    else:
        pads = ints(args[1])
        constant = arg(args, 2)
        value = float(constant.reshape(-1)[0]) if constant is not None and constant.numel() else 0.0
        axes = ints(arg(args, 3))
    begins, ends = [0] * rank, [0] * rank
    axes = list(range(rank)) if axes is None else [normalize_axis(a, rank) for a in axes]
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
    mode = attr(node, "mode", "constant")
    if mode == "constant":
        return [pad_nd(x, begins, ends, value)]
    # reflect / edge: crop the negative pads first (as onnxruntime does), then gather the border indices.
    x = pad_nd(x, [min(b, 0) for b in begins], [min(e, 0) for e in ends])
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
    mode = attr(node, "mode", "nearest")
    if node.op == "Upsample" or len(node.inputs) <= 2:  # Upsample-7/9 and Resize-10: scales only, asymmetric
        scales_tensor = args[1] if len(args) > 1 else None
        scales = (np.asarray(attr(node, "scales"), dtype=np.float32) if scales_tensor is None
                  else floats32(scales_tensor))
        transform, nearest_mode = "asymmetric", "simple"
        sizes = None
    else:
        transform = attr(node, "coordinate_transformation_mode", "half_pixel")
        nearest_mode = attr(node, "nearest_mode", "round_prefer_floor")
        scales_tensor, sizes_tensor = arg(args, 2), arg(args, 3)
        scales = floats32(scales_tensor) if scales_tensor is not None and scales_tensor.numel() else None
        sizes = ints(sizes_tensor) if sizes_tensor is not None and sizes_tensor.numel() else None
    axes = [normalize_axis(a, rank) for a in attr(node, "axes", list(range(rank)))]
    if sizes is not None:
        out_sizes = list(in_sizes)
        for axis, size in zip(axes, sizes):
            out_sizes[axis] = size
        full_scales = np.array([np.float32(o) / np.float32(i) for o, i in zip(out_sizes, in_sizes)],
                               dtype=np.float32)
        policy = attr(node, "keep_aspect_ratio_policy", "stretch")
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


def _pad_reason(node: gs.Node) -> str | None:
    mode = attr(node, "mode", "constant")
    if mode not in ("constant", "reflect", "edge"):
        return f"Pad mode {mode!r} is not supported"
    return None


def _resize_reason(node: gs.Node) -> str | None:
    op = node.op
    mode = attr(node, "mode", "nearest")
    if mode not in ("nearest", "linear"):
        return f"{op} mode {mode!r} is not supported"
    if op == "Resize" and len(node.inputs) > 2:
        transform = attr(node, "coordinate_transformation_mode", "half_pixel")
        if transform not in _RESIZE_TRANSFORMS:
            return f"Resize coordinate_transformation_mode {transform!r} is not supported"
        if mode == "nearest" and attr(node, "nearest_mode", "round_prefer_floor") not in _NEAREST_MODES:
            return f"Resize nearest_mode {attr(node, 'nearest_mode')!r} is not supported"
        if mode == "linear" and int(attr(node, "antialias", 0)):
            return "Resize linear with antialias=1 is not supported"
        if attr(node, "keep_aspect_ratio_policy", "stretch") not in ("stretch", "not_larger", "not_smaller"):
            return f"Resize keep_aspect_ratio_policy {attr(node, 'keep_aspect_ratio_policy')!r}"
    return None


HANDLERS: dict[str, Handler] = {"Pad": _pad, "Resize": _resize, "Upsample": _resize}
REASONS: dict[str, Reason] = {"Pad": _pad_reason, "Resize": _resize_reason, "Upsample": _resize_reason}
