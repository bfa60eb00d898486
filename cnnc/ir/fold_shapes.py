"""Shape reads folded to constants, exactly: `Shape(x)` (with Shape-15's `start`/`end`) and `Gather` / `Slice` of it.

onnx-graphsurgeon 0.6.1's `fold_constants(fold_shapes=True)` returns the whole input shape for a Shape node and
ignores `start`/`end` (torch's dynamo exporter writes them), and its Gather/Slice folds read the Shape's input the
same way. cnnc never lets it fold shapes; this module does, on what it can prove:

- `Shape(x, start=s, end=e)` is `dims(x)[s:e]`, where a negative `s` or `e` counts from the rank and both clamp to
  [0, rank] (ONNX's rule, which is Python's slice rule). It folds when every selected dim is known (an int >= 0: a
  zero-size dim is a real size, never symbolic).
- `Gather(Shape(x), i)` with constant indices in [-n, n) (n the Shape's length) folds to the selected dims when
  they are all known; the output has the indices' shape.
- `Slice(Shape(x), starts, ends[, axes[, steps]])` with constant one-element parameters on axis 0 and a non-zero
  step folds to `dims[start:end:step]` (ONNX's clamping for a 1-D slice is again Python's) when all are known.

The known dims are the annotations of x (declared graph input shapes, which onnxruntime enforces, or ONNX shape
inference's), in the main graph and If branches, never in Loop or Scan bodies. A folded tensor becomes a Constant in place (its name and readers kept); the producer is dropped by
the next cleanup. Each fold is checked against onnxruntime in tests/test_fold_shapes.py.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def fold_shape_reads(graph: gs.Graph) -> int:
    """Fold what this module can prove in `graph` and its If branches; the number of tensors folded. Loop and Scan
    bodies are left alone: a loop-carried tensor may change shape from one iteration to the next, whatever the
    body's declared input shape says."""
    folded = 0
    for node in list(graph.nodes):
        if node.op == "If":
            for subgraph in node.subgraphs():
                folded += fold_shape_reads(subgraph)
        if node.op != "Shape" or not node.inputs or not node.outputs:
            continue
        dims = shape_read(node)
        if dims is None:
            continue
        if all(_known(d) for d in dims):
            _to_constant(node.outputs[0], np.array(dims, dtype=np.int64))
            folded += 1
            continue
        for reader in list(node.outputs[0].outputs):
            value = _gather(reader, dims) if reader.op == "Gather" else _slice(reader, dims) \
                if reader.op == "Slice" else None
            if value is not None and reader.inputs[0] is node.outputs[0]:
                _to_constant(reader.outputs[0], value)
                folded += 1
    return folded


def shape_read(node: gs.Node) -> list | None:
    """The dims a Shape node reads (`start`/`end` applied; None entries are unknown), or None when the rank is not
    known."""
    shape = node.inputs[0].shape
    if shape is None:
        return None
    dims = [d if _known(d) else None for d in shape]
    start = int(node.attrs.get("start", 0))
    end = node.attrs.get("end")
    return dims[start:] if end is None else dims[start:int(end)]


def _known(dim) -> bool:
    return isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) and dim >= 0


def _constant(tensor: gs.Tensor) -> np.ndarray | None:
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def _gather(node: gs.Node, dims: list) -> np.ndarray | None:
    if len(node.inputs) != 2 or int(node.attrs.get("axis", 0)) not in (0, -1):
        return None
    indices = _constant(node.inputs[1])
    if indices is None or indices.dtype.kind not in "iu":
        return None
    n = len(dims)
    if np.any(indices < -n) or np.any(indices >= n):
        return None  # out of range: onnxruntime raises, and so must the folded graph's original
    picked = [dims[int(i)] for i in indices.reshape(-1)]
    if not all(_known(d) for d in picked):
        return None
    return np.array(picked, dtype=np.int64).reshape(indices.shape)


def _slice(node: gs.Node, dims: list) -> np.ndarray | None:
    if not 3 <= len(node.inputs) <= 5:
        return None  # Slice-1's attribute form is not folded
    params = [_constant(t) for t in node.inputs[1:]]
    if any(p is None or p.size != 1 or p.dtype.kind not in "iu" for p in params):
        return None
    start, end = int(params[0].reshape(-1)[0]), int(params[1].reshape(-1)[0])
    axis = int(params[2].reshape(-1)[0]) if len(params) > 2 else 0
    step = int(params[3].reshape(-1)[0]) if len(params) > 3 else 1
    if axis not in (0, -1) or step == 0:
        return None
    picked = dims[start:end:step]
    if not all(_known(d) for d in picked):
        return None
    return np.array(picked, dtype=np.int64)


def _to_constant(tensor: gs.Tensor, value: np.ndarray) -> None:
    """`tensor` becomes a Constant holding `value`, in place: its name and its readers stay."""
    tensor.to_constant(value)
    tensor.inputs.clear()
