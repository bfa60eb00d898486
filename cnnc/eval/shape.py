"""Shapes, indices, casts and constants: Shape, Gather, Cast, ConstantOfShape and Constant, and how a constant
becomes a torch value (floats in the evaluation dtype, integers as int64, booleans as bool).

Constant has no handler: `SubgraphFunction` reads its value once, with the graph's other constants.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from cnnc.eval.common import Handler, Reason, attr, ints, normalize_axis


def to_torch(value: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A constant as a torch value: floats in `dtype`, integers as int64, booleans as bool."""
    array = np.asarray(value)
    if array.dtype.kind == "f":
        return torch.from_numpy(np.array(array, dtype=np.float64)).to(dtype)
    if array.dtype.kind in "iu":
        return torch.from_numpy(np.array(array, dtype=np.int64))
    if array.dtype == np.bool_:
        return torch.from_numpy(np.array(array))
    raise ValueError(f"constant of dtype {array.dtype} is not supported")


def constant_node_value(node: gs.Node) -> np.ndarray | None:
    """The value of a Constant node, or None for a kind the evaluator cannot read (sparse or string)."""
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        return np.asarray(value.values) if isinstance(value, gs.Constant) else np.asarray(value)
    for name, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                        ("value_ints", np.int64)):
        if name in attrs:
            return np.asarray(attrs[name], dtype=dtype)
    return None


def _shape(node, args, ctx):
    dims = list(args[0].shape)
    start, end = int(attr(node, "start", 0)), attr(node, "end")
    dims = dims[start:] if end is None else dims[start:int(end)]
    return [torch.tensor(dims, dtype=torch.int64)]


def _gather(node, args, ctx):
    data, indices = args[0], args[1]
    axis = normalize_axis(int(attr(node, "axis", 0)), data.dim())
    size = int(data.shape[axis])
    flat = indices.reshape(-1)
    flat = torch.where(flat < 0, flat + size, flat)
    y = torch.index_select(data, axis, flat)
    return [y.reshape(list(data.shape[:axis]) + list(indices.shape) + list(data.shape[axis + 1:]))]


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
              onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


def _cast(node, args, ctx):
    x, to = args[0], int(attr(node, "to"))
    if to in _FLOAT_TYPES:
        return [x.to(ctx.dtype)]
    if to in _INT_TYPES:
        return [x.to(torch.int64)]  # float -> int truncates toward zero, as static_cast does
    return [x.to(torch.bool)]


def _constant_of_shape(node, args, ctx):
    shape = ints(args[0])
    value = attr(node, "value")
    array = np.zeros(1, dtype=np.float32) if value is None else np.asarray(getattr(value, "values", value)).reshape(-1)
    return [to_torch(np.full(shape, array[0], dtype=array.dtype), ctx.dtype)]



def _cast_reason(node: gs.Node) -> str | None:
    to = int(attr(node, "to", 0))
    if to not in _FLOAT_TYPES | _INT_TYPES | {onnx.TensorProto.BOOL}:
        return f"Cast to {onnx.TensorProto.DataType.Name(to) if to else 'nothing'} is not supported"
    return None


def _constant_reason(node: gs.Node) -> str | None:
    if constant_node_value(node) is None:
        return "Constant node of a kind the evaluator cannot read (sparse or string)"
    return None


HANDLERS: dict[str, Handler | None] = {
    "Shape": _shape,
    "Gather": _gather,
    "Cast": _cast,
    "ConstantOfShape": _constant_of_shape,
    "Constant": None,  # its value is read once, with the other constants
}
REASONS: dict[str, Reason] = {"Cast": _cast_reason, "Constant": _constant_reason}
