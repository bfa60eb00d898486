"""How far an approximate rewrite moves a model's outputs, measured on onnxruntime: the runtime that deploys.

Both approximate passes (remove-skip-approx, drop-blocks) report this one measure. The original and the rewritten
model (graphsurgeon graphs or ModelProtos) run on the same feeds, on the CPU provider with graph optimisations off
(as the equivalence check runs them), and the deviation is, over every feed and output,

    max_abs = max |after − before|,    max_rel = max over outputs of  max_abs(output) / max |before(output)|

(relative to each output's scale, as in `cnnc.runtime.equivalence`; 0 when nothing moved, inf when an all-zero
output moved). Random feeds come from `cnnc.runtime.inputs`, float inputs only: random integers would be made-up
indices or labels, so a model with a non-float input gets a TypeError instead of an invented number.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from cnnc.io import backend, target
from cnnc.io.precision import is_float
from cnnc.runtime.inputs import graph_inputs, make_input_batches
from cnnc.runtime.session import make_session

Feeds = list[dict[str, np.ndarray]]


def as_model(source: gs.Graph | onnx.ModelProto) -> onnx.ModelProto:
    """A ModelProto onnxruntime accepts for `source` (a graph is exported; neither is modified)."""
    if isinstance(source, gs.Graph):
        # backend's export: graphsurgeon's own writes renamed constants' names into the imported TensorProtos,
        # i.e. into the caller's model (an If branch's weights, renamed when the If is inlined)
        return backend.to_model(source)
    return target.runnable(source)


def random_float_feeds(source: gs.Graph | onnx.ModelProto, n: int = 2, seed: int = 0) -> Feeds:
    """Seeded uniform and normal feeds (batch 1, and 3 when the batch is dynamic); TypeError for non-float inputs."""
    model = as_model(source)
    for spec in graph_inputs(model):
        if not is_float(spec.dtype):  # bfloat16 included (numpy kind 'V')
            raise TypeError(f"input {spec.name} is tensor({spec.dtype.name}): no random float inputs for it")
    return make_input_batches(model, n=n, seed=seed)


def run_outputs(source: gs.Graph | onnx.ModelProto, feeds: Feeds) -> list[dict[str, np.ndarray]]:
    """{output name: value} per feed, on onnxruntime's CPU provider with graph optimisations disabled."""
    session = make_session(as_model(source), "cpu", "disabled")
    names = [output.name for output in session.get_outputs()]
    return [dict(zip(names, session.run(names, feed))) for feed in feeds]


def deviation(before: list[dict[str, np.ndarray]], after: list[dict[str, np.ndarray]]) -> dict:
    """{"max_abs", "max_rel"} between two runs on the same feeds (see the module docstring)."""
    worst_abs, worst_rel = 0.0, 0.0
    for name in before[0] if before else ():
        error = max((float(np.max(np.abs(np.asarray(b[name], np.float64) - a[name]), initial=0.0))
                     for a, b in zip(before, after)), default=0.0)
        scale = max(float(np.max(np.abs(a[name]), initial=0.0)) for a in before)
        worst_abs = max(worst_abs, error)
        worst_rel = max(worst_rel, error / scale if scale > 0 else (0.0 if error == 0 else float("inf")))
    return {"max_abs": worst_abs, "max_rel": worst_rel}


def output_deviation(original: gs.Graph | onnx.ModelProto, candidate: gs.Graph | onnx.ModelProto,
                     feeds: Feeds) -> dict:
    """{"max_abs", "max_rel"} of `candidate`'s outputs from `original`'s on `feeds`, both run on onnxruntime."""
    return deviation(run_outputs(original, feeds), run_outputs(candidate, feeds))
