"""The graph and the samples that `cnnc analyze` and `cnnc explain` work on.

`load_graph` is also what scripts and tests use to get the graph these commands see: the canonical graphsurgeon
graph, with BN folded by the fold-bn pass for explain (seed 003, Eq. 7).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from cnnc import ir
from cnnc.analysis.samples import load_samples, sample_inputs
from cnnc.errors import ModelError, UsageError
from cnnc.io.frontend import load_model
from cnnc.passes.fold_bn import FoldBatchNorm
from cnnc.pipeline.manager import run_pipeline


def load_graph(model: str | Path | onnx.ModelProto, fold_bn: bool) -> gs.Graph:
    """The model as a canonical graphsurgeon graph (constants folded, shapes inferred), with BN folded by the
    fold-bn pass when `fold_bn`; a BN that cannot be folded stays, and explain then refuses it by name."""
    proto = load_model(model) if not isinstance(model, onnx.ModelProto) else model
    try:
        graph = ir.import_model(proto)
    except Exception as error:  # noqa: BLE001 — graphsurgeon raises many types on untrusted models
        raise ModelError(f"cannot import the model into the IR: {error}") from None
    graph, _ = run_pipeline(graph, [FoldBatchNorm()] if fold_bn else [], strict=True)
    return graph


def samples(graph: gs.Graph, inputs: str | None, random: int | None, seed: int, default: int) -> np.ndarray:
    """The --inputs file, or --random (else `default`) seeded uniform [0,1) samples; not both."""
    if inputs and random:
        raise UsageError("give --inputs or --random, not both")
    return load_samples(graph, inputs) if inputs else sample_inputs(graph, random or default, seed)
