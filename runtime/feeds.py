"""Inputs for latency measurement: concrete input shapes at a batch size, seeded feeds, and static output shapes.

Built on `cnnc.runtime.inputs` (graph inputs, `--input-shape` parsing, random arrays) and on the one symbolic-dim
rule of `cnnc.ir.shapes`. Feeds are N(0, 1) floats: unit-scale data, so that no subnormal input slows a model down
for reasons unrelated to its graph.
"""

from __future__ import annotations

import numpy as np
import onnx

from cnnc.errors import UsageError
from cnnc.ir.shapes import concrete_shape, is_fixed
from cnnc.runtime.inputs import graph_inputs, parse_input_shapes, random_array, shape_hint
from cnnc.runtime.parameter_inputs import draw_parameters, parameter_roles, static_shapes


def concrete_inputs(model: onnx.ModelProto, batch: int | None, input_shapes=None) -> dict[str, tuple]:
    """{input name: (shape, dtype)}. The leading dim is the batch: `batch` replaces it when it is symbolic (default
    1); a fixed leading dim must equal `batch`. Other symbolic dims come from `input_shapes` (name -> dims, whose
    leading entry is replaced by the batch where that dim is symbolic)."""
    given = parse_input_shapes(input_shapes)
    specs = [spec for spec in graph_inputs(model) if not spec.has_default]  # timed on their defaults
    unknown = set(given) - {spec.name for spec in specs}
    if unknown:
        raise UsageError(f"--input-shape names unknown input(s) {', '.join(sorted(unknown))}")
    result = {}
    for spec in specs:
        declared = list(spec.dims)
        if spec.name in given:
            shape = list(given[spec.name])
            if len(shape) != len(declared) or any(is_fixed(d) and d != g
                                                  for d, g in list(zip(declared, shape))[1:]):
                raise UsageError(f"--input-shape {spec.name}:{tuple(shape)} does not fit its declared shape "
                                 f"{tuple(declared)}")
            declared = [d if is_fixed(d) else g for d, g in zip(declared, shape)]
            if shape and not is_fixed(spec.dims[0]):
                declared[0] = "batch"
        if declared and is_fixed(declared[0]) and batch is not None and declared[0] != batch:
            raise UsageError(f"input '{spec.name}' has a fixed batch of {declared[0]}; it cannot run at batch {batch}")
        shape = concrete_shape(spec.name, declared, batch or 1, shape_hint(spec.name))
        result[spec.name] = (shape, spec.dtype)
    return result


def make_feeds(shapes: dict[str, tuple], seed: int = 0, model: onnx.ModelProto | None = None) -> dict[str, np.ndarray]:
    """Seeded N(0, 1) floats (unit-scale data: no subnormal inputs), small non-negative integers, random booleans;
    with `model`, inputs that are op parameters (axes, shapes, indices...) are drawn valid, as for the check."""
    rng = np.random.default_rng(seed)
    feeds = {name: random_array(rng, shape, dtype, normal=True) for name, (shape, dtype) in shapes.items()}
    roles = parameter_roles(model) if model is not None else {}
    if roles:
        draw_parameters(roles, feeds, static_shapes(model), rng)
    return feeds


def static_output_shapes(model: onnx.ModelProto, shapes: dict[str, tuple]) -> dict[str, tuple] | None:
    """Output shapes by ONNX shape inference at these input shapes, or None when any output stays symbolic."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in copy.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, shapes[value.name][0]):
                dim.Clear()
                dim.dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(copy, strict_mode=False)
    except Exception:  # noqa: BLE001 - models above 2 GB or ops unknown to onnx: the outputs are allocated by onnxruntime instead
        return None
    result = {}
    for output in inferred.graph.output:
        tensor_type = output.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if not tensor_type.HasField("shape") or any(d is None for d in dims):  # 0 is a real, empty size
            return None
        result[output.name] = (tuple(dims), np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)))
    return result
