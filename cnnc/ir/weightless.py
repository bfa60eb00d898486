"""Weightless views of a model, so that checking, shape inference and saving never copy the weights.

onnx's checker and shape inference take a serialized model (one copy of every weight in Python, another in C++)
and refuse anything over protobuf's 2 GB limit. Neither needs the values of a large float weight, only its name,
type and shape, so they are given a *weightless copy*: the same model in which every initializer of at least
`min_bytes` is declared as a graph input of that type and shape instead (IR ≥ 4 allows inputs that are not
initializers). Small initializers stay, since shape inference reads the values of shape-like constants (Reshape
targets, Pad amounts, Resize scales). The checks the checker would make on a removed initializer's own fields (a
data type, exactly one value field) are made here instead.

`without_data(tensor)` is a TensorProto's metadata without its values (the backend points it at external data).
Python's protobuf copies a bytes field on every read, so a large `raw_data` is read once per use, never copied
wholesale with its model.
"""

from __future__ import annotations

import functools

import onnx
from onnx import TensorProto

from cnnc.errors import ModelError

# Initializers at least this large leave the weightless copy.
WEIGHTLESS_MIN_BYTES = 1 << 20

VALUE_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _is_repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)
    return repeated if repeated is not None else field.label == field.LABEL_REPEATED


def copy_fields(source, target, skip: tuple[str, ...] = ()) -> None:
    """Copy every set field of `source` into `target` except those named in `skip`, without reading skipped ones."""
    for field in source.DESCRIPTOR.fields:
        if field.name in skip:
            continue
        value = getattr(source, field.name)
        if _is_repeated(field):
            if len(value):
                getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            if source.HasField(field.name):
                getattr(target, field.name).CopyFrom(value)
        elif source.HasField(field.name):
            setattr(target, field.name, value)


def _value_field_count(tensor: TensorProto) -> int:
    count = sum(1 for name in VALUE_FIELDS if name != "raw_data" and len(getattr(tensor, name)))
    return count + int(tensor.HasField("raw_data"))


def tensor_nbytes(tensor: TensorProto) -> int:
    """The size of a tensor's values from its type and shape (no value is read)."""
    if tensor.data_type in (0, TensorProto.STRING):
        return 0
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * _itemsize(tensor.data_type)


@functools.cache
def _itemsize(data_type: int) -> int:  # (onnx's lookup costs ~2 µs: once per type, not per tensor)
    return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


def without_data(tensor: TensorProto) -> TensorProto:
    """A copy of `tensor` with every field but its values (name, type, dims, doc string, metadata)."""
    light = TensorProto()
    copy_fields(tensor, light, skip=VALUE_FIELDS + ("external_data", "data_location"))
    return light


def is_large(tensor: TensorProto, min_bytes: int = WEIGHTLESS_MIN_BYTES) -> bool:
    return tensor.data_location != TensorProto.EXTERNAL and tensor_nbytes(tensor) >= min_bytes and \
        tensor.data_type != TensorProto.STRING


def weightless_copy(model: onnx.ModelProto, min_bytes: int = WEIGHTLESS_MIN_BYTES) -> onnx.ModelProto:
    """`model` with its large initializers declared as graph inputs (see the module docstring)."""
    copy = onnx.ModelProto()
    copy_fields(model, copy, skip=("graph",))
    graph = model.graph
    copy_fields(graph, copy.graph, skip=("initializer", "input"))
    kept_inputs = list(graph.input)
    for tensor in graph.initializer:
        if not is_large(tensor, min_bytes):
            copy.graph.initializer.append(tensor)
            continue
        if not tensor.data_type:
            raise ModelError(f"initializer '{tensor.name}' has no data type")
        if _value_field_count(tensor) != 1:
            raise ModelError(f"initializer '{tensor.name}' must hold its values in exactly one field")
        # IR < 4 lists initializers among the inputs too: the declaration replaces that entry.
        kept_inputs = [value for value in kept_inputs if value.name != tensor.name]
        kept_inputs.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    copy.graph.input.extend(kept_inputs)
    copy.ir_version = max(copy.ir_version, 4)  # inputs that are not initializers need IR ≥ 4
    return copy


def releasable_values(model: onnx.ModelProto, min_bytes: int = WEIGHTLESS_MIN_BYTES) -> set[str]:
    """The large initializers whose values `valueless_copy` leaves out: not graph inputs too (an input's default,
    or an IR < 4 constant listed as an input, keeps its values)."""
    inputs = {value.name for value in model.graph.input}
    return {t.name for t in model.graph.initializer if is_large(t, min_bytes) and t.name not in inputs}


def valueless_copy(model: onnx.ModelProto, min_bytes: int = WEIGHTLESS_MIN_BYTES) -> tuple[onnx.ModelProto, set[str]]:
    """(`model` without the values of `releasable_values`, their names). Each such tensor keeps its name, type and
    dims and holds an empty `raw_data`, so that everything read from the model without its values (inputs, outputs,
    `weightless_copy`, `serialized_size`, statistics) is as before; a runtime given it fails on the sizes. For a
    caller that lets go of `model` and reads the weights elsewhere (cnnc.api: onnxruntime reads them from the file)."""
    copy = onnx.ModelProto()
    copy_fields(model, copy, skip=("graph",))
    copy_fields(model.graph, copy.graph, skip=("initializer",))
    released = releasable_values(model, min_bytes)
    for tensor in model.graph.initializer:
        if tensor.name not in released:
            copy.graph.initializer.append(tensor)
            continue
        light = without_data(tensor)
        light.raw_data = b""
        copy.graph.initializer.append(light)
    return copy, released


def serialized_size(model: onnx.ModelProto, light: onnx.ModelProto | None = None) -> int:
    """About `model.ByteSize()` (to within a few bytes per large tensor), without serializing its weights, which
    Python's protobuf does to compute ByteSize (a full copy, and an error past 2 GB). `light`: `weightless_copy(model)`
    when the caller has made it already."""
    light = weightless_copy(model) if light is None else light
    return light.ByteSize() + sum(tensor_nbytes(t) for t in model.graph.initializer if is_large(t))
