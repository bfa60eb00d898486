"""Sample inputs for the analysis tools: seeded random samples or a .npy file for a graph's single input, and the
graph's tensors evaluated on them in float64 (`cnnc.eval`), in chunks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import torch

from cnnc.errors import ModelError, UsageError
from cnnc.eval import SubgraphFunction, topological_order
from cnnc.ir.shapes import concrete_shape


def single_float_input(graph: gs.Graph) -> gs.Variable:
    """The graph's one input; analysis tools read one image tensor."""
    if len(graph.inputs) != 1:
        raise UsageError(f"the model has {len(graph.inputs)} inputs; the analysis tools need exactly one")
    return graph.inputs[0]


def sample_inputs(graph: gs.Graph, n: int, seed: int = 0) -> np.ndarray:
    """`n` seeded uniform [0, 1) samples (the pixel range of the papers' data sets) for the graph's input."""
    tensor = single_float_input(graph)
    shape = list(tensor.shape or [])
    if not shape:
        raise UsageError(f"input '{tensor.name}' has no known shape; give sample inputs as a .npy file")
    shape = concrete_shape(tensor.name, shape, n, "give sample inputs as a .npy file")
    if n < 1:
        raise UsageError(f"need at least one random sample, got {n}")
    return np.random.default_rng(seed).random([n, *shape[1:]]).astype(np.float32)


def load_samples(graph: gs.Graph, path: str | Path) -> np.ndarray:
    """Samples from a .npy file (never unpickled): a batch on axis 0, or one sample without the batch axis."""
    tensor = single_float_input(graph)
    try:
        array = np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read sample inputs {path}: {error}") from None
    shape = list(tensor.shape or [])
    if shape and array.ndim == len(shape) - 1:
        array = array[None]
    if shape and array.ndim != len(shape):
        raise UsageError(f"{path} has shape {array.shape}; input '{tensor.name}' has rank {len(shape)}")
    for axis, (dim, got) in enumerate(zip(shape[1:], array.shape[1:]), start=1):
        if isinstance(dim, int) and dim > 0 and dim != got:
            raise UsageError(f"{path} has shape {array.shape}; input '{tensor.name}' needs {dim} at axis {axis}")
    if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
        raise UsageError(f"{path} must hold finite floating-point samples")
    if array.shape[0] < 1:
        raise UsageError(f"{path} holds no samples")
    return array


def evaluate_tensors(graph: gs.Graph, names: list[str], samples: np.ndarray, chunk: int = 16):
    """Yield (start, {name: float64 tensor}) for `names` over `samples` in chunks (no gradients)."""
    nodes = topological_order(list(graph.nodes))
    tensors = graph.tensors()
    opset = graph.opset if isinstance(graph.opset, int) else None
    try:
        function = SubgraphFunction(nodes, [single_float_input(graph)], [tensors[n] for n in names], opset=opset)
    except ValueError as error:  # an op or attribute the float64 evaluator does not reproduce exactly
        raise ModelError(f"cannot evaluate the model in float64: {error}") from None
    with torch.no_grad():
        for start in range(0, samples.shape[0], chunk):
            values = function(torch.from_numpy(np.ascontiguousarray(samples[start:start + chunk])))
            yield start, dict(zip(names, values))
