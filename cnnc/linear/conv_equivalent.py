"""The single Conv that a linear machine equals, when there is one (collapse's branch-merge and chain strategies).

Geometry. Every tensor of the machine gets the window of machine-input pixels that one of its pixels reads, per
spatial axis: output pixel o reads input rows [o·S − P, o·S − P + K). Composition rules:
- Conv / AveragePool (kernel k, stride s, dilation d, begin pad p):  S' = S·s,  K' = K + (k−1)·d·S,  P' = P + p·S;
- zero Pad with begin pad p:  P' = P + p·S;
- per-channel affine ops (BN, Mul/Add/Sub/Div by a per-channel constant), Identity, Dropout: unchanged;
- Add/Sub of two branches with the same S:  P' = max P_i,  K' = max(K_i − P_i) + P'  (kernels padded to the largest
  and aligned, the RepVGG/DBB/ACNet merge; an identity branch is a delta kernel).
Anything else (resampling, reshapes, spatially varying constants) has no single-conv form.

Weights. Parallel branches off the machine input are composed from their weights (`cnnc.linear.parallel_branches`).
Anything else is read off the machine itself: the vector-Jacobian product of one interior output pixel per output
channel (seed 003's adjoint) gives W[o, :, :, :] on the window, and f(0) there gives the bias, on a probe map the
size of that pixel's window (the machine is translation-invariant), or on the real map when that fails.

Proof. A chain whose inner convs pad with zeros is *not* a conv at the border (the border reads 0 where the chain
reads the inner bias; DBB issue 9 measured 0.11 max error), and the geometry rules above do not see that. So the
candidate conv is always checked against the machine in float64 on random inputs of the real size, borders included,
and rejected unless it matches to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import torch

from cnnc import ir
from cnnc.eval import same_pads
from cnnc.linear.parallel_branches import compose_parallel

PER_CHANNEL_OPS = ("BatchNormalization", "Mul", "Add", "Sub", "Div")


@dataclass(frozen=True)
class Window:
    stride: tuple[int, int]
    pad: tuple[int, int]  # begin pads
    extent: tuple[int, int]


@dataclass(frozen=True)
class ConvForm:
    weight: np.ndarray  # Cout × Cin/group × Kh × Kw, float64
    bias: np.ndarray  # Cout, float64
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    group: int


def _spatial(tensor: gs.Tensor) -> tuple[int, int] | None:
    shape = tensor.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return None
    return shape[2], shape[3]


def _per_channel_constant(value: np.ndarray) -> bool:
    return value.size == 1 or (value.ndim >= 3 and all(d == 1 for d in value.shape[-2:]))


def _begin_pads(node: gs.Node, size: tuple[int, int]) -> tuple[int, int]:
    """Begin pads as onnxruntime applies them (SAME_* resolved by the evaluator's own rule, not re-derived here)."""
    geometry = ir.conv_geometry(node)
    if geometry.auto_pad in ("NOTSET", "VALID"):
        return (0, 0) if geometry.auto_pad == "VALID" else geometry.pads[:2]
    return tuple(same_pads(size[axis], geometry.strides[axis], geometry.kernel_shape[axis], geometry.auto_pad,
                           pooling=node.op != "Conv")[0] for axis in range(2))


def machine_window(nodes: list[gs.Node], source: gs.Tensor) -> tuple[Window | None, str]:
    """The window of `source` pixels that one pixel of each node output reads; (None, reason) if not conv-like."""
    windows = {id(source): Window((1, 1), (0, 0), (1, 1))}
    for node in nodes:
        op = node.op
        variable = [t for t in node.inputs if not ir.is_empty_input(t) and ir.constant_value(t) is None]
        if any(id(t) not in windows for t in variable):
            return None, f"{op} '{node.name}' reads a tensor that does not come from the machine input"
        if op in ("Conv", "AveragePool"):
            if op == "AveragePool" and (int(node.attrs.get("ceil_mode", 0))
                                        or (any(ir.conv_geometry(node).pads)
                                            and not int(node.attrs.get("count_include_pad", 0)))):
                return None, "AveragePool with ceil_mode or count_include_pad=0 divides by a varying count"
            size = _spatial(node.inputs[0])
            if size is None or len(ir.conv_geometry(node).kernel_shape) != 2:
                return None, f"{op} '{node.name}' is not 2-D with a known input size"
            geometry = ir.conv_geometry(node)
            begin = _begin_pads(node, size)
            w = windows[id(node.inputs[0])]
            windows[id(node.outputs[0])] = Window(
                tuple(w.stride[a] * geometry.strides[a] for a in range(2)),
                tuple(w.pad[a] + begin[a] * w.stride[a] for a in range(2)),
                tuple(w.extent[a] + (geometry.kernel_shape[a] - 1) * geometry.dilations[a] * w.stride[a]
                      for a in range(2)))
        elif op == "Pad":
            pads = ir.constant_value(node.inputs[1])
            value = ir.constant_value(node.inputs[2]) if len(node.inputs) > 2 and not ir.is_empty_input(
                node.inputs[2]) else np.zeros(1)
            axes_given = len(node.inputs) > 3 and not ir.is_empty_input(node.inputs[3])
            if str(node.attrs.get("mode", "constant")) != "constant" or np.any(value != 0) or axes_given \
                    or pads is None or len(pads) != 8 or np.any(pads[[0, 1, 4, 5]] != 0) or np.any(pads < 0):
                return None, "only a zero, non-negative, spatial Pad keeps the conv form"
            w = windows[id(node.inputs[0])]
            windows[id(node.outputs[0])] = Window(w.stride, (w.pad[0] + int(pads[2]) * w.stride[0],
                                                             w.pad[1] + int(pads[3]) * w.stride[1]), w.extent)
        elif op in ("Identity", "Dropout", "BatchNormalization") or (op in PER_CHANNEL_OPS and len(variable) == 1):
            constants = [ir.constant_value(t) for t in node.inputs if ir.constant_value(t) is not None]
            if op in PER_CHANNEL_OPS[1:] and not all(_per_channel_constant(c) for c in constants):
                return None, f"{op} '{node.name}' has a spatially varying constant"
            windows[id(node.outputs[0])] = windows[id(variable[0])]
        elif op in ("Add", "Sub") and len(variable) == 2:
            a, b = windows[id(variable[0])], windows[id(variable[1])]
            if a.stride != b.stride:
                return None, f"{op} '{node.name}' joins branches of different strides"
            pad = tuple(max(a.pad[i], b.pad[i]) for i in range(2))
            windows[id(node.outputs[0])] = Window(a.stride, pad, tuple(
                max(a.extent[i] - a.pad[i], b.extent[i] - b.pad[i]) + pad[i] for i in range(2)))
        else:
            return None, f"{op} has no single-conv form"
    return windows, ""


def extract_conv(function, nodes, source: gs.Tensor, target: gs.Tensor, chunk: int = 64
                 ) -> tuple[ConvForm | None, str]:
    """The conv equal to `function` (source -> target), read off by VJPs (`chunk` output channels per backward
    pass, to bound memory) and proven on random inputs."""
    in_size, out_size = _spatial(source), _spatial(target)
    if in_size is None or out_size is None:
        return None, "machine input or output is not a 4-D tensor of known size"
    windows, why = machine_window(nodes, source)
    if windows is None:
        return None, why
    window = windows.get(id(target))
    if window is None:
        return None, "machine output is not reached from its input"
    cin, cout = source.shape[1], target.shape[1]
    pixel, end_pads, probe_size = [], [], []
    for a in range(2):
        s, p, k, n, out = window.stride[a], window.pad[a], window.extent[a], in_size[a], out_size[a]
        o = -(-p // s)  # the first output pixel whose window starts inside the input
        end = max(0, (out - 1) * s + k - n - p)
        if (n + p + end - k) // s + 1 != out:
            return None, "output size does not match the composed geometry"
        pixel.append(o)
        end_pads.append(end)
        # The kernel is read off output pixel o, whose window needs the first o·s − p + k input pixels. The
        # machine's ops are translation-invariant (machine_window admits no other), so a map of that size plus one
        # stride reads the same kernel: cheaper than the real map when that is larger (a 32×32 map probed as 7×7 is
        # 20× cheaper), and possible when the real map is too small to have an interior pixel (a 3×3 branch on a
        # 2×2 map). The form is then proven at the real size, border pixels included (_conv_form_error).
        probe_size.append(o * s - p + k + s)
    rows = slice(pixel[0] * window.stride[0] - window.pad[0], pixel[0] * window.stride[0] - window.pad[0]
                 + window.extent[0])
    cols = slice(pixel[1] * window.stride[1] - window.pad[1], pixel[1] * window.stride[1] - window.pad[1]
                 + window.extent[1])
    interior = all(o * s - p + k <= n for o, s, p, k, n in zip(pixel, window.stride, window.pad, window.extent,
                                                                 in_size))
    pads = (window.pad[0], window.pad[1], end_pads[0], end_pads[1])
    # The probe map first; the real map when the machine does not run on the probe map, or when the form read there
    # fails the proof (a padding that depends on the map size, as auto_pad SAME with a stride, shifts the kernel).
    sizes = [tuple(probe_size)] + ([tuple(in_size)] if interior and tuple(probe_size) != tuple(in_size) else [])
    error = math.inf
    # Parallel branches off the machine input (RepVGG, MobileOne) compose from their weights with no probing; the
    # result is proven below like any read kernel, and anything else is read by VJPs.
    for size in [None] + sizes:
        if size is None:
            composed = compose_parallel(nodes, source, target, windows)
            if composed is None:
                continue
            dense, bias = composed
        else:
            try:
                dense, bias = _read_kernel(function, cin, cout, size, pixel, rows, cols, window.extent, chunk)
            except (RuntimeError, ValueError, IndexError):  # the machine does not run on a map of that size
                continue
        group = _largest_group(dense)
        weight = np.concatenate([dense[g * (cout // group):(g + 1) * (cout // group),
                                       g * (cin // group):(g + 1) * (cin // group)] for g in range(group)], axis=0)
        form = ConvForm(weight, bias.copy(), window.stride, pads, group)
        error = _conv_form_error(function, form, source)
        if error <= 1e-9:
            return form, ""
    if math.isinf(error) and not interior:
        return None, f"no interior output pixel to read a {window.extent}-wide kernel from (input {in_size})"
    return None, f"no single conv reproduces it at the borders (max rel. deviation {error:.2g})"


def _read_kernel(function, cin: int, cout: int, size: tuple[int, int], pixel, rows: slice, cols: slice, extent,
                 chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """The dense kernel (cout, cin, *extent) and bias at output `pixel`, by VJPs on a zero input of `size`."""
    dense = np.empty((cout, cin, extent[0], extent[1]))
    for start in range(0, cout, chunk):  # one batch element per output channel probed
        channels = torch.arange(start, min(start + chunk, cout))
        x = torch.zeros((len(channels), cin) + tuple(size), dtype=torch.float64, requires_grad=True)
        y = function(x)[0]
        probes = torch.zeros_like(y)
        probes[torch.arange(len(channels)), channels, pixel[0], pixel[1]] = 1.0
        (grad,) = torch.autograd.grad(y, x, grad_outputs=probes)
        dense[channels.numpy()] = grad[:, :, rows, cols].detach().numpy()
    with torch.no_grad():
        bias = function(torch.zeros((1, cin) + tuple(size), dtype=torch.float64))[0][0, :, pixel[0], pixel[1]].numpy()
    return dense, bias


def _largest_group(dense: np.ndarray) -> int:
    cout, cin = dense.shape[:2]
    for group in sorted((g for g in range(1, min(cin, cout) + 1) if cin % g == 0 and cout % g == 0), reverse=True):
        mask = np.kron(np.eye(group, dtype=bool), np.ones((cout // group, cin // group), dtype=bool))
        if not np.any(dense[~mask]):
            return group
    return 1


def _conv_form_error(function, form: ConvForm, source: gs.Tensor) -> float:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((2,) + tuple(source.shape[1:]), dtype=torch.float64, generator=generator)
    with torch.no_grad():
        expected = function(x)[0]
        padded = torch.nn.functional.pad(x, (form.pads[1], form.pads[3], form.pads[0], form.pads[2]))
        got = torch.nn.functional.conv2d(padded, torch.from_numpy(form.weight), torch.from_numpy(form.bias),
                                         stride=form.strides, groups=form.group)
    if got.shape != expected.shape:
        return math.inf
    return float((got - expected).abs().max()) / max(1.0, float(expected.abs().max()))
