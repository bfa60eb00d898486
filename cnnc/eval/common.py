"""What every handler family of the evaluator shares: the handler signature, attribute and parameter readers, and
the integer arithmetic of onnxruntime's shape code.

A handler is `handler(node, args, ctx) -> list of outputs`: `args` holds the torch values of the node's inputs in
order (None for an omitted optional input), `ctx` the evaluation's float dtype and the graph's opset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F

from cnnc.ir import is_empty_input


@dataclass(frozen=True)
class Context:
    dtype: torch.dtype  # floats are evaluated in this dtype; integers stay int64
    opset: int | None  # the graph's default-domain opset, when known (only Softmax needs it)


Handler = Callable[[gs.Node, list, Context], list]
# An op's precondition check: None when the evaluator reproduces the node exactly, otherwise why not.
Reason = Callable[[gs.Node], "str | None"]


def attr(node: gs.Node, name: str, default=None):
    value = node.attrs.get(name, default)
    if isinstance(value, bytes):
        return value.decode()
    return value


def ints(tensor: torch.Tensor | None) -> list[int] | None:
    """A parameter tensor (pads, axes, shape...) as Python ints; None for an absent or empty optional input."""
    if tensor is None:
        return None
    return [int(v) for v in tensor.reshape(-1).tolist()]


def floats32(tensor: torch.Tensor) -> np.ndarray:
    """A float parameter (Resize scales) back in float32, exactly as onnxruntime reads it."""
    return np.asarray(tensor.detach().reshape(-1).tolist(), dtype=np.float64).astype(np.float32)


def arg(args: list, index: int):
    return args[index] if index < len(args) else None


def used(tensor: gs.Tensor) -> bool:
    """Whether an optional input or output is present (ONNX marks an omitted one with an empty name)."""
    return not is_empty_input(tensor)


def normalize_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    return axis % rank


def trunc_div(a: int, b: int) -> int:
    """C++ integer division (rounds toward zero), as onnxruntime's shape arithmetic uses."""
    quotient = abs(a) // abs(b)
    return quotient if (a >= 0) == (b > 0) else -quotient


def pad_nd(x: torch.Tensor, begins: Sequence[int], ends: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Constant-pad (negative values crop) the trailing len(begins) axes of x."""
    if not any(begins) and not any(ends):
        return x
    torch_order: list[int] = []
    for begin, end in zip(reversed(begins), reversed(ends)):
        torch_order += [begin, end]
    return F.pad(x, torch_order, mode="constant", value=value)
