"""A strided ConvTranspose as a stride-1 Conv over its input, then DepthToSpace and a crop (destride, seed 004).

Maths (per spatial axis, stride s, kernel k): the phases of the output are
y[s·j + r] = Σ_{c,b} x[c, j − (k' − 1) + b] · W[c, o, s(k' − 1 − b) + r],   k' = ⌈k/s⌉,
a stride-1 conv with ΠS·O output channels and pads k' − 1; DepthToSpace interleaves the phases and a Slice removes
the transpose's pads. Every weight of the new kernel is a copy of one weight or 0, so the rewrite is exact.
Preconditions (else the reason is returned): constant float weight and bias, dilation 1, auto_pad NOTSET, no
output_shape, static input spatial lengths of rank 1–3.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from cnnc import ir
from cnnc.linear import polyphase as network
from cnnc.linear.polyphase import CHANNEL_MAJOR, PHASE_MAJOR, Builder, expand_channels


def transpose_weight(weight: np.ndarray, group: int, strides, taps, layout: str) -> np.ndarray:
    """The stride-1 Conv weight (O·ΠS × C/g × k'…) whose output phases are a ConvTranspose's (module docstring)."""
    d, c_in, o_per_group, kernel = len(strides), weight.shape[0], weight.shape[1], weight.shape[2:]
    conv_form = weight.reshape(group, c_in // group, o_per_group, *kernel).swapaxes(1, 2).reshape(
        group * o_per_group, c_in // group, *kernel)
    selections = []
    for s, t, k in zip(strides, taps, kernel):  # T[r, b, u] = 1 where u = s·(k'−1−b) + r
        r, b, u = np.ix_(np.arange(s), np.arange(t), np.arange(k))
        selections.append((u == s * (t - 1 - b) + r) * 1.0)
    r, b, u = "GHI"[:d], "JKL"[:d], "PQR"[:d]
    w = np.einsum(f"oc{u}," + ",".join(f"{r[i]}{b[i]}{u[i]}" for i in range(d)) + f"->o{r}c{b}",
                  conv_form.astype(np.float64), *selections)
    if layout == PHASE_MAJOR:
        w = np.moveaxis(w, 0, d)
    return w.reshape(-1, c_in // group, *taps).astype(weight.dtype)


def destride_conv_transpose(builder: Builder, node: gs.Node) -> dict | str:
    """Rewrite a strided ConvTranspose as stride-1 Conv -> DepthToSpace -> Slice; returns stats or the reason not."""
    weight, _ = ir.float_constant(node, 1)
    bias, bias_why = ir.float_constant(node, 2)
    if weight is None or bias_why:
        return "weight or bias is not a float constant"
    geometry, x = ir.conv_geometry(node), node.inputs[0]
    lengths = network.spatial_lengths(x)
    if any(d != 1 for d in geometry.dilations):
        return "dilation > 1: the taps of a dilated kernel are not a polyphase split of a dense kernel"
    if geometry.auto_pad != "NOTSET" or "output_shape" in node.attrs:
        return "auto_pad or output_shape set: the pads they imply are not resolved here"
    if lengths is None:
        return "input spatial shape unknown: the polyphase grid is computed from it"
    rank, group, strides, kernel = len(lengths), geometry.group, geometry.strides, weight.shape[2:]
    if not 1 <= rank <= 3 or rank != geometry.spatial_rank:
        return f"spatial rank {rank} is not 1-3"
    extra = [int(v) for v in node.attrs.get("output_padding", [0] * rank)]
    pads, taps = geometry.pads, [-(-k // s) for k, s in zip(kernel, strides)]
    out_lengths = [s * (n - 1) + e + k - pads[i] - pads[rank + i]
                   for i, (n, s, e, k) in enumerate(zip(lengths, strides, extra, kernel))]
    if any(n < 1 for n in out_lengths):
        return "the output is empty"
    # Conv output rows j cover the full output positions s·j + r; enough of them to reach begin pad + output.
    rows = [max(n, -(-(pads[i] + o) // s)) for i, (n, o, s) in enumerate(zip(lengths, out_lengths, strides))]
    layout = PHASE_MAJOR if group == 1 else CHANNEL_MAJOR
    new_weight = transpose_weight(weight, group, strides, taps, layout)
    out, outs, phases = node.outputs[0], weight.shape[1] * group, int(np.prod(strides))
    label = node.name or out.name
    hint = label + "_destride"
    node.inputs.clear()
    node.outputs.clear()
    inputs = [x, builder.const(hint + "_W", new_weight)]
    if bias is not None:
        inputs.append(builder.const(hint + "_B", expand_channels(bias, phases, layout).astype(bias.dtype)))
    y = builder.op("Conv", inputs, hint, {"kernel_shape": taps, "strides": [1] * rank, "group": group,
                                          "pads": [t - 1 for t in taps] + [r - n for r, n in zip(rows, lengths)]},
                   dtype=x.dtype)
    full = [r * s for r, s in zip(rows, strides)]
    cropped = any(pads[i] or full[i] != out_lengths[i] for i in range(rank))
    y = builder.reassemble(y, outs, full, strides, layout, hint + "_d2s", out=None if cropped else out)
    if cropped:
        builder.slice(y, list(pads[:rank]), [p + o for p, o in zip(pads, out_lengths)], [i + 2 for i in range(rank)],
                      [1] * rank, hint + "_crop", out=out)
    bias_size = 0 if bias is None else bias.size
    return {"node": label, "op": "ConvTranspose", "strides": list(strides), "kernel": list(kernel),
            "kernel_after": taps, "factor_in": [1] * rank, "factor_out": list(strides),
            "macs_before": int(np.prod(lengths)) * weight.size, "macs_after": int(np.prod(rows)) * new_weight.size,
            "params_before": weight.size + bias_size, "params_after": new_weight.size + bias_size * phases}
