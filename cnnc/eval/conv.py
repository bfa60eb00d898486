"""Conv and ConvTranspose (1-D to 3-D kernels), and onnxruntime's SAME padding rule, which pooling shares.

- Conv / pooling `auto_pad=SAME_*`: pad_needed = (ceil(in/s) − 1)·s + k − in, with the undilated kernel k,
  split as head = pad_needed/2 (SAME_UPPER) or (pad_needed+1)/2 (SAME_LOWER); a negative pad_needed (stride above
  kernel) means no padding for Conv and is refused for pooling; onnxruntime refuses SAME with dilation for Conv.
  The evaluator does the same in each case.
- ConvTranspose: with `output_shape`, or with SAME_* (target in·s), the total padding is split with the larger half
  at the tail for SAME_UPPER and at the head otherwise (NOTSET, VALID, SAME_LOWER), as the ONNX text says and
  onnxruntime 1.31 does (older onnxruntime sources did the opposite: measured, not assumed).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs
import torch.nn.functional as F

from cnnc.eval.common import Handler, Reason, arg, attr, pad_nd, trunc_div
from cnnc.ir import constant_value

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_SAME = ("SAME_UPPER", "SAME_LOWER")


def same_pads(in_size: int, stride: int, kernel: int, auto_pad: str, pooling: bool = False) -> tuple[int, int]:
    """onnxruntime's SAME padding for Conv and pooling (legacy: undilated kernel, C++ division).

    When the stride exceeds the kernel the padding needed is negative: Conv then pads nothing, pooling refuses.
    """
    target = trunc_div(in_size + stride - 1, stride)
    needed = (target - 1) * stride + kernel - in_size
    if needed < 0:
        if pooling:
            raise ValueError(f"auto_pad {auto_pad} with stride {stride} > kernel {kernel} on an axis of {in_size}: "
                             f"negative padding (onnxruntime refuses it)")
        needed = 0
    head = trunc_div(needed + 1, 2) if auto_pad == "SAME_LOWER" else trunc_div(needed, 2)
    return head, needed - head


def _conv_pads(node: gs.Node, in_sizes, kernel, strides) -> tuple[list[int], list[int]]:
    rank = len(kernel)
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if auto_pad in _SAME:
        pairs = [same_pads(in_sizes[i], strides[i], kernel[i], auto_pad) for i in range(rank)]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    if auto_pad == "VALID":
        return [0] * rank, [0] * rank
    pads = list(attr(node, "pads", [0] * (2 * rank)))
    return pads[:rank], pads[rank:]


def _weighted(node: gs.Node, args: list):
    """(x, weight, bias, kernel, strides, dilations) of a Conv or ConvTranspose, ONNX defaults resolved."""
    weight = args[1]
    rank = weight.dim() - 2
    return (args[0], weight, arg(args, 2), list(weight.shape[2:]), list(attr(node, "strides", [1] * rank)),
            list(attr(node, "dilations", [1] * rank)))


def _conv(node, args, ctx):
    x, weight, bias, kernel, strides, dilations = _weighted(node, args)
    rank = len(kernel)
    heads, tails = _conv_pads(node, list(x.shape[2:]), kernel, strides)
    if heads == tails and min(heads, default=0) >= 0:
        padding = heads
    else:  # asymmetric pads: pad explicitly, then convolve unpadded
        x, padding = pad_nd(x, heads, tails), [0] * rank
    y = CONV[rank](x, weight, bias, stride=strides, padding=padding, dilation=dilations,
                   groups=int(attr(node, "group", 1)))
    return [y]


def _conv_transpose(node, args, ctx):
    x, weight, bias, kernel, strides, dilations = _weighted(node, args)
    rank = len(kernel)
    output_padding = list(attr(node, "output_padding", [0] * rank))
    auto_pad = attr(node, "auto_pad", "NOTSET")
    explicit = list(attr(node, "pads", [0] * (2 * rank)))
    output_shape = list(attr(node, "output_shape", []))
    if output_shape and len(output_shape) != rank:  # ONNX shape inference refuses other lengths too
        raise ValueError(f"ConvTranspose '{node.name}': output_shape {output_shape} for {rank} spatial axes")
    in_sizes = list(x.shape[2:])

    full = [(in_sizes[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 for i in range(rank)]
    begins, ends = [], []
    for i in range(rank):
        natural = full[i] + output_padding[i]
        if output_shape or auto_pad in _SAME:
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
                              groups=int(attr(node, "group", 1)), dilation=dilations)
    y = pad_nd(y, begins, ends)
    if bias is not None:
        y = y + bias.reshape([-1] + [1] * rank)
    return [y]


def auto_pad_reason(node: gs.Node) -> str | None:
    """Conv, ConvTranspose and pooling: auto_pad must be an ONNX value."""
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", *_SAME):
        return f"auto_pad {auto_pad!r} is not an ONNX value"
    return None


def _kernel_reason(node: gs.Node) -> str | None:
    if len(node.inputs) > 1:
        weight = constant_value(node.inputs[1])
        if weight is not None and not 3 <= weight.ndim <= 5:
            return f"{node.op} with a {weight.ndim - 2}-D kernel (1-D to 3-D are supported)"
    return None


def _conv_reason(node: gs.Node) -> str | None:
    reason = auto_pad_reason(node)
    if reason is None and attr(node, "auto_pad", "NOTSET") in _SAME and \
            any(d != 1 for d in attr(node, "dilations", [])):
        return "Conv with auto_pad SAME and dilation > 1 (onnxruntime refuses it)"
    return reason or _kernel_reason(node)


def _conv_transpose_reason(node: gs.Node) -> str | None:
    return auto_pad_reason(node) or _kernel_reason(node)


HANDLERS: dict[str, Handler] = {"Conv": _conv, "ConvTranspose": _conv_transpose}
REASONS: dict[str, Reason] = {"Conv": _conv_reason, "ConvTranspose": _conv_transpose_reason}
