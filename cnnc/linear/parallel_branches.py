"""The kernel of a parallel-branch machine computed from its weights (RepVGG / MobileOne / ACNet merges), no probing.

A machine whose branches each read the machine input through at most one Conv, followed by per-channel affine ops
(BatchNormalization, Mul/Add/Sub/Div by a per-channel constant, Identity, Dropout), and are summed (Add/Sub), is
one conv whose kernel is the sum of the branch kernels, each zero-padded to the common window and aligned by its
begin pad, an identity branch being a delta kernel (Ding et al., RepVGG, 2021). Each tensor of the machine is
carried as (K, b): K of shape (C, Cin, e_h, e_w) on that tensor's window (`conv_equivalent.Window`), b of shape (C,):
- the machine input: K = δ (C = Cin, extent 1×1), b = 0;
- Conv on the machine input, weight W (groups expanded to a dense Cout × Cin kernel), bias B: K = W, b = B;
- per-channel affine y = s·x + t: K ← s·K, b ← s·b + t (BN: s = γ/√(σ² + ε), t = β − μ·s);
- Add/Sub of two tensors with the same stride: each K embedded at offset P − p in the output's extent, then added.
Anything else (a conv of a conv, pooling, padding) returns None and `conv_equivalent.extract_conv` reads the kernel by
VJPs instead. This is only a faster way to the same candidate: `extract_conv` proves it against the machine in float64
at the real size, borders included, before anything uses it.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from cnnc import ir

_PASS_THROUGH = ("Identity", "Dropout")


def _per_channel(value: np.ndarray, channels: int) -> np.ndarray | None:
    """A constant as one value per channel (C,), when it broadcasts so over an N×C×H×W tensor."""
    value = np.asarray(value, dtype=np.float64)
    if value.size == 1:
        return np.full(channels, float(value.reshape(-1)[0]))
    if value.ndim >= 3 and value.shape[-2:] == (1, 1) and value.size == channels and value.shape[-3] == channels:
        return value.reshape(-1)
    return None


def _conv_kernel(node: gs.Node, cin: int) -> tuple[np.ndarray, np.ndarray] | None:
    weight = ir.constant_value(node.inputs[1])
    if weight is None or weight.ndim != 4 or any(d != 1 for d in ir.conv_geometry(node).dilations):
        return None
    bias = ir.constant_value(node.inputs[2]) if len(node.inputs) > 2 and not ir.is_empty_input(node.inputs[2]) \
        else np.zeros(weight.shape[0])
    if bias is None:
        return None
    group = int(node.attrs.get("group", 1))
    cout, per_group = weight.shape[0], cin // group
    dense = np.zeros((cout, cin) + weight.shape[2:])
    for g in range(group):
        rows = slice(g * (cout // group), (g + 1) * (cout // group))
        dense[rows, g * per_group:(g + 1) * per_group] = weight[rows]
    return dense, np.asarray(bias, dtype=np.float64).reshape(-1)


def _affine(node: gs.Node, kernel: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(K, b) after a per-channel affine node whose first input is the variable one."""
    channels = kernel.shape[0]
    if node.op == "BatchNormalization":
        params = [ir.constant_value(t) for t in node.inputs[1:5]]
        if any(p is None for p in params):
            return None
        gamma, beta, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
        scale = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
        return kernel * scale[:, None, None, None], bias * scale + beta - mean * scale
    constant = ir.constant_value(node.inputs[1])
    if constant is None or ir.constant_value(node.inputs[0]) is not None:
        return None  # the constant must be the second operand (x op c)
    c = _per_channel(constant, channels)
    if c is None or (node.op == "Div" and np.any(c == 0)):
        return None
    if node.op == "Mul":
        return kernel * c[:, None, None, None], bias * c
    if node.op == "Div":
        return kernel / c[:, None, None, None], bias / c
    return kernel, bias + c if node.op == "Add" else bias - c


def _embed(kernel: np.ndarray, window, target) -> np.ndarray:
    """`kernel` on `window` placed inside the larger `target` window (same stride; begin pads aligned)."""
    out = np.zeros(kernel.shape[:2] + tuple(target.extent))
    top, left = (target.pad[a] - window.pad[a] for a in range(2))
    out[:, :, top:top + kernel.shape[2], left:left + kernel.shape[3]] = kernel
    return out


def compose_parallel(nodes: list[gs.Node], source: gs.Tensor, target: gs.Tensor, windows: dict
                     ) -> tuple[np.ndarray, np.ndarray] | None:
    """(dense kernel Cout × Cin × E_h × E_w on the target's window, bias) or None (module docstring)."""
    cin = source.shape[1]
    values = {id(source): (np.eye(cin).reshape(cin, cin, 1, 1), np.zeros(cin))}
    for node in nodes:
        variable = [t for t in node.inputs if not ir.is_empty_input(t) and ir.constant_value(t) is None]
        if any(id(t) not in values for t in variable) or len(node.outputs) != 1:
            return None
        if node.op == "Conv":
            if len(variable) != 1 or variable[0] is not source:
                return None  # a conv of a conv is a chain: read by VJPs
            result = _conv_kernel(node, cin)
        elif node.op in _PASS_THROUGH and len(variable) == 1:
            result = values[id(variable[0])]
        elif node.op in ("Add", "Sub") and len(variable) == 2:
            (ka, ba), (kb, bb) = values[id(variable[0])], values[id(variable[1])]
            out = windows[id(node.outputs[0])]
            ka, kb = _embed(ka, windows[id(variable[0])], out), _embed(kb, windows[id(variable[1])], out)
            result = (ka + kb, ba + bb) if node.op == "Add" else (ka - kb, ba - bb)
        elif node.op in ("BatchNormalization", "Mul", "Add", "Sub", "Div") and len(variable) == 1 \
                and node.inputs[0] is variable[0]:
            result = _affine(node, *values[id(variable[0])])
        else:
            return None
        if result is None:
            return None
        values[id(node.outputs[0])] = result
    if id(target) not in values:
        return None
    kernel, bias = values[id(target)]
    window = windows[id(target)]
    if kernel.shape[2:] != tuple(window.extent):
        return None
    return kernel, bias
