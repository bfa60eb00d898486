"""Check-input values for graph inputs that are op parameters: valid by the op's constraints, so the original runs.

Random integers in 0..3 are fine data but poor parameters: a Reshape shape must keep the element count, Gather
indices must lie in [-dim, dim), Split sizes must sum to the dim, a divisor must not be 0. For a graph input read
directly as one of the parameters below, `draw_parameters` replaces the seeded values by values drawn within the
op's constraints (r is the data's rank, d the size of the axis concerned):

| op (input)                                   | values drawn                                                  |
|----------------------------------------------|---------------------------------------------------------------|
| Reshape (shape)                              | 1, ..., 1, -1 (any element count)                             |
| Expand (shape)                               | all 1 (the data's own shape by broadcasting)                  |
| Tile (repeats), CenterCropPad (shape)        | in 1..2 / 1..d                                                |
| Gather, GatherElements, Scatter(Elements) (indices) | in [-d, d) on the `axis` attribute                     |
| GatherND, ScatterND (indices)                | per last-axis position k in [-d_k, d_k) (after batch_dims)    |
| Reduce* , Unsqueeze, Slice, Pad (axes)       | distinct axes in [-r, r) (Unsqueeze: of the output's rank)     |
| Squeeze (axes)                               | distinct axes of size-1 dims                                  |
| Slice (steps)                                | in {-1, 1, 2}                                                 |
| Split (split)                                | non-negative sizes summing to d                               |
| Resize / Upsample (scales, sizes)            | 1 (or the dim) on leading axes, in {0.5, 1.5, 2} (or 1..2d) on the last two |
| CumSum (axis)                                | in [-r, r)                                                    |
| Div, Mod of integers (divisor)               | in {-3..3} without 0                                          |
| TopK (K)                                     | in 1..d                                                       |
| ReverseSequence (sequence_lens)              | in 1..d on the time axis                                      |

Data shapes come from the feed (graph inputs), initializers or ONNX shape inference. An integer input read
elsewhere keeps its 0..3 values; if the original then fails, `unknown_parameter_inputs` names it and the check asks
for `inputs=` / `--inputs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from cnnc.ir.weightless import weightless_copy

# Ops whose `axes` input (index 1) is a list of axes, since the opset where axes became an input.
AXES_INPUT_OPS = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                  "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "Unsqueeze", "Squeeze"}
INDEX_OPS = {"Gather": 1, "GatherElements": 1, "Scatter": 1, "ScatterElements": 1}


@dataclass(frozen=True)
class Role:
    """Graph input `name` is input `index` of node `node` (whose data input is `data`)."""

    node: onnx.NodeProto
    index: int

    @property
    def op(self) -> str:
        return self.node.op_type


def parameter_roles(model: onnx.ModelProto) -> dict[str, Role]:
    """Graph inputs read as an op parameter this module knows how to draw, by name (the first such reader)."""
    inputs = {value.name for value in model.graph.input}
    roles: dict[str, Role] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in inputs and name not in roles and _drawable(node, index):
                roles[name] = Role(node, index)
    return roles


def _drawable(node: onnx.NodeProto, index: int) -> bool:
    op = node.op_type
    return ((op, index) in {("Reshape", 1), ("Expand", 1), ("Tile", 1), ("CenterCropPad", 1), ("GatherND", 1),
                            ("ScatterND", 1), ("Split", 1), ("CumSum", 1), ("TopK", 1), ("ReverseSequence", 1),
                            ("Upsample", 1), ("Div", 1), ("Mod", 1)}
            or INDEX_OPS.get(op) == index or (op in AXES_INPUT_OPS and index == 1)
            or (op == "Slice" and index in (3, 4)) or (op == "Pad" and index == 3)
            or (op == "Resize" and index in (2, 3)))


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Shapes known without running: initializers and ONNX shape inference's fully static value_info."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(weightless_copy(model), strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is a help here: without it only feeds and initializers count
        return shapes
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes.setdefault(value.name, tuple(d.dim_value for d in dims))
    return shapes


def draw_parameters(roles: dict[str, Role], feed: dict[str, np.ndarray], known: dict[str, tuple],
                    rng: np.random.Generator) -> None:
    """Replace, in `feed`, each role input's values by valid ones (when the data's shape is known)."""
    for name, role in roles.items():
        if name not in feed:
            continue
        value = _draw(role, feed[name], feed, known, rng)
        if value is not None:
            feed[name] = np.asarray(value).astype(feed[name].dtype).reshape(feed[name].shape)


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _draw(role: Role, current: np.ndarray, feed: dict, known: dict, rng: np.random.Generator):
    node, op, size = role.node, role.op, current.size
    shape = _shape_of(node.input[0], feed, known)
    if op == "Reshape":
        return [1] * (size - 1) + [-1] if size else None
    if op == "Expand":
        return np.ones(size)
    if op == "Tile":
        return rng.integers(1, 3, size=size)
    if op in ("Div", "Mod"):
        return rng.choice([-3, -2, -1, 1, 2, 3], size=size) if current.dtype.kind in "iu" else None
    if shape is None:
        return None
    rank = len(shape)
    if op in INDEX_OPS:
        axis = int(_attr(node, "axis", 0)) % max(rank, 1)
        return _indices(rng, shape[axis] if rank else 0, size)
    if op in ("GatherND", "ScatterND"):
        batch = int(_attr(node, "batch_dims", 0))
        depth = current.shape[-1] if current.ndim else 0
        if depth > rank - batch:
            return None
        columns = [_indices(rng, shape[batch + k], size // max(depth, 1)) for k in range(depth)]
        return None if any(c is None for c in columns) else np.stack(columns, axis=-1)
    if op in AXES_INPUT_OPS or (op == "Slice" and role.index == 3) or (op == "Pad" and role.index == 3):
        return _axes(rng, op, shape, size)
    if op == "Slice":
        return rng.choice([-1, 1, 2], size=size)
    if op == "Split":
        axis = int(_attr(node, "axis", 0)) % max(rank, 1)
        return _partition(rng, shape[axis], size) if rank else None
    if op in ("Resize", "Upsample"):
        return _resize(rng, role, shape, size)
    if op == "CumSum":
        return rng.integers(-rank, rank, size=size) if rank else None
    if op == "TopK":
        axis = int(_attr(node, "axis", -1)) % max(rank, 1)
        return rng.integers(1, shape[axis] + 1, size=size) if rank and shape[axis] else None
    if op == "ReverseSequence":
        time_axis = int(_attr(node, "time_axis", 0))
        return rng.integers(1, shape[time_axis] + 1, size=size) if rank > time_axis and shape[time_axis] else None
    if op == "CenterCropPad":
        return rng.integers(1, 4, size=size)
    return None


def _shape_of(name: str, feed: dict, known: dict) -> tuple | None:
    if name in feed:
        return tuple(feed[name].shape)
    return known.get(name)


def _indices(rng: np.random.Generator, dim: int, size: int):
    return rng.integers(-dim, dim, size=size) if dim > 0 else None


def _axes(rng: np.random.Generator, op: str, shape: tuple, size: int):
    if op == "Squeeze":
        ones = [axis for axis, dim in enumerate(shape) if dim == 1]
        return rng.permutation(ones)[:size] if len(ones) >= size else None
    rank = len(shape) + (size if op == "Unsqueeze" else 0)
    if size > rank:
        return None
    axes = rng.permutation(rank)[:size]
    return np.where(rng.random(size) < 0.5, axes - rank, axes)  # negative axes too: both forms are valid


def _partition(rng: np.random.Generator, total: int, parts: int):
    if parts == 0:
        return None
    cuts = np.sort(rng.integers(0, total + 1, size=parts - 1))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def _resize(rng: np.random.Generator, role: Role, shape: tuple, size: int):
    """Scales or sizes: leading axes unchanged (onnxruntime's linear and cubic modes scale only the last two of a
    4-D input), the last two (or all, for ranks 1-2) varied."""
    axes = _attr(role.node, "axes", None)
    dims = [shape[a] for a in axes] if axes else list(shape)
    if len(dims) != size:
        return None
    varied = range(max(size - 2, 0), size)
    is_sizes = role.op == "Resize" and role.index == 3
    values = list(dims) if is_sizes else [1.0] * size
    for k in varied:
        if is_sizes:
            values[k] = int(rng.integers(1, 2 * dims[k] + 1)) if dims[k] else 0
        else:
            values[k] = float(rng.choice([1.0, 2.0] if role.op == "Upsample" else [0.5, 1.5, 2.0]))
    return values


def unknown_parameter_inputs(model: onnx.ModelProto, roles: dict[str, Role]) -> list[str]:
    """Integer or bool graph inputs whose values this module does not draw, each with the ops that read it."""
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    found = []
    for value in model.graph.input:
        elem = value.type.tensor_type.elem_type
        if value.name in roles or not elem:
            continue
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
        if dtype.kind in "iub":
            ops = ", ".join(dict.fromkeys(readers.get(value.name, ["a subgraph"])))
            found.append(f"'{value.name}' (read by {ops})")
    return found
